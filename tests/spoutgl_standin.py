"""A stand-in for SpoutGL (Windows-only) with the wrapper's exact API, for tests on Linux.

Follows jlai/Python-SpoutGL's PySpoutGL.cpp: SpoutSender(setSenderName, releaseSender,
sendImage(buffer, width, height, glFormat, invert, hostFbo), setFrameSync, getFrame,
createOpenGL, closeOpenGL, context manager), SpoutReceiver(setReceiverName, releaseReceiver,
receiveImage(buffer | None, glFormat, invert, hostFbo), isUpdated, isConnected, isFrameNew,
getSenderWidth, getSenderHeight, getSenderList, createOpenGL, closeOpenGL), enums and helpers.
Senders live in one process-wide table, as they do in Spout's shared memory, and like Spout a
second sender asking for a taken name silently becomes NAME_1. Every call is checked to come
from the thread that called createOpenGL (recorded in `thread_violations`).
"""

from __future__ import annotations

import threading
import types
import weakref

import numpy as np

enums = types.SimpleNamespace(GL_RGBA=0x1908, GL_BGRA_EXT=0x80E1, GL_RGB=0x1907, GL_BGR_EXT=0x80E0)
_BYTES_PER_PIXEL = {enums.GL_RGBA: 4, enums.GL_BGRA_EXT: 4, enums.GL_RGB: 3, enums.GL_BGR_EXT: 3}


def _bytes_per_pixel(gl_format: int) -> int:
    if gl_format not in _BYTES_PER_PIXEL:
        raise ValueError("Unknown GL format")
    return _BYTES_PER_PIXEL[gl_format]


helpers = types.SimpleNamespace(getBytesPerPixel=_bytes_per_pixel)

_lock = threading.Lock()
senders: dict[str, dict] = {}  # name -> {"pixels": BGRA (H, W, 4), "width", "height", "frame"}
thread_violations: list[str] = []
gl_contexts_open = 0


_owners: weakref.WeakSet = weakref.WeakSet()  # every sender and receiver made, while it lives


def lose_gl_contexts() -> None:
    """What a GPU driver reset does to every OpenGL context open now: each sender made so far
    fails its sendImage from here on (returns False, as SpoutGL's does); new ones work."""
    for owner in list(_owners):
        owner.lost = True


def reset() -> None:
    global gl_contexts_open
    with _lock:
        senders.clear()
        thread_violations.clear()
        gl_contexts_open = 0


class _GLOwner:
    def __init__(self) -> None:
        self._gl_thread = None
        self.lost = False  # see lose_gl_contexts
        _owners.add(self)

    def _check_thread(self, method: str) -> None:
        if self._gl_thread is not None and threading.get_ident() != self._gl_thread:
            thread_violations.append(f"{type(self).__name__}.{method} called off the GL thread")

    def createOpenGL(self) -> bool:  # noqa: N802 (SpoutGL's names)
        global gl_contexts_open
        self._gl_thread = threading.get_ident()
        with _lock:
            gl_contexts_open += 1
        return True

    def closeOpenGL(self) -> bool:  # noqa: N802
        global gl_contexts_open
        self._check_thread("closeOpenGL")
        with _lock:
            gl_contexts_open -= 1
        return True


def _to_bgra(buffer, width: int, height: int, gl_format: int) -> np.ndarray:
    pixels = np.frombuffer(memoryview(buffer).cast("B"), np.uint8)[: width * height * _bytes_per_pixel(gl_format)]
    pixels = pixels.reshape(height, width, _bytes_per_pixel(gl_format))
    if gl_format == enums.GL_RGBA:
        pixels = pixels[..., [2, 1, 0, 3]]
    elif gl_format in (enums.GL_RGB, enums.GL_BGR_EXT):
        order = [2, 1, 0] if gl_format == enums.GL_RGB else [0, 1, 2]
        pixels = np.concatenate([pixels[..., order], np.full((height, width, 1), 255, np.uint8)], axis=2)
    return pixels.copy()


class SpoutSender(_GLOwner):
    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.releaseSender()

    def setSenderName(self, name: str) -> None:  # noqa: N802
        self._check_thread("setSenderName")
        with _lock:
            candidate, index = name, 1
            while candidate in senders:  # what Spout does: a silent NAME_1
                candidate, index = f"{name}_{index}", index + 1
            senders[candidate] = {"pixels": None, "width": 0, "height": 0, "frame": 0}
        self.name = candidate

    def releaseSender(self, msec: int = 0) -> None:  # noqa: N802
        self._check_thread("releaseSender")
        with _lock:
            if self.name is not None:
                senders.pop(self.name, None)
        self.name = None

    def sendImage(self, buffer, width: int, height: int, gl_format: int, invert: bool, host_fbo: int) -> bool:  # noqa: N802
        self._check_thread("sendImage")
        view = memoryview(buffer)
        if view.nbytes < width * height * _bytes_per_pixel(gl_format):
            raise BufferError("Buffer not large enough")
        if not view.c_contiguous:
            raise BufferError("Buffer must be contiguous")
        if self.name is None or self.lost:
            return False
        with _lock:
            entry = senders[self.name]
            entry.update(pixels=_to_bgra(buffer, width, height, gl_format), width=width, height=height)
            entry["frame"] += 1
        return True

    def setFrameSync(self, name: str) -> None:  # noqa: N802
        self._check_thread("setFrameSync")

    def getFrame(self) -> int:  # noqa: N802
        with _lock:
            return senders[self.name]["frame"] if self.name in senders else 0


class SpoutReceiver(_GLOwner):
    def __init__(self) -> None:
        super().__init__()
        self._name = ""
        self._width = self._height = 0
        self._connected = False
        self._updated = False
        self._last_frame = 0
        self._frame_new = False

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.releaseReceiver()

    def setReceiverName(self, name: str) -> None:  # noqa: N802
        self._check_thread("setReceiverName")
        self._name = name

    def releaseReceiver(self) -> None:  # noqa: N802
        self._check_thread("releaseReceiver")
        self._connected = False

    def getSenderList(self) -> list[str]:  # noqa: N802
        with _lock:
            return list(senders)

    def receiveImage(self, buffer, gl_format: int, invert: bool, host_fbo: int) -> bool:  # noqa: N802
        self._check_thread("receiveImage")
        with _lock:
            entry = senders.get(self._name)
            if entry is None or entry["pixels"] is None:
                self._connected = False
                return False
            if not self._connected or (entry["width"], entry["height"]) != (self._width, self._height):
                self._connected, self._updated = True, True
                self._width, self._height = entry["width"], entry["height"]
                return True
            if buffer is None or memoryview(buffer).nbytes == 0:
                return True
            target = np.frombuffer(memoryview(buffer).cast("B"), np.uint8)
            needed = self._width * self._height * _bytes_per_pixel(gl_format)
            if target.size < needed:
                raise BufferError("Buffer not large enough")
            target[:needed] = entry["pixels"].reshape(-1) if gl_format == enums.GL_BGRA_EXT else 0
            self._frame_new = entry["frame"] != self._last_frame
            self._last_frame = entry["frame"]
            return True

    def isUpdated(self) -> bool:  # noqa: N802
        self._check_thread("isUpdated")
        updated, self._updated = self._updated, False
        return updated

    def isConnected(self) -> bool:  # noqa: N802
        return self._connected

    def isFrameNew(self) -> bool:  # noqa: N802
        return self._frame_new

    def getSenderWidth(self) -> int:  # noqa: N802
        return self._width

    def getSenderHeight(self) -> int:  # noqa: N802
        return self._height
