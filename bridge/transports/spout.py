"""`spout:NAME`: Spout senders and receivers through SpoutGL (Windows only).

Spout shares OpenGL/DirectX textures, so every SpoutGL call happens on one worker thread that
creates its own OpenGL context (`createOpenGL`) and keeps it for its whole life. Frames cross
to and from that thread through newest-frame-wins slots. Pixels travel as BGRA, Spout's
native layout. A sender name already registered on the machine is an error at start: Spout
would otherwise silently rename us to NAME_1 and every receiver would lose us.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

import numpy as np

from ..frames import Frame
from ..slots import LatestSlot
from .base import DeviceThread, Source, SourceLost, TransportUnavailable, WorkerSink, claim_close

POLL_SECONDS = 1.0 / 240  # how often the receiver asks for a new frame

log = logging.getLogger(__name__)


def import_spoutgl():
    """The SpoutGL module, or one clear line saying why not."""
    try:
        import SpoutGL
    except ImportError:
        if sys.platform != "win32":
            raise TransportUnavailable("Spout is Windows-only; use NDI to share video with other machines") from None
        raise TransportUnavailable("Spout needs SpoutGL: pip install SpoutGL PyOpenGL") from None
    return SpoutGL


class SpoutSink(WorkerSink):
    """Publishes frames under the sender name `name`, each at its own size (receivers follow a
    size change), as BGRA (other pixel formats are converted)."""

    def __init__(self, *, name: str) -> None:
        if not name:
            raise ValueError("name: a Spout sender name is needed, as in spout:sdbridge")
        self._spoutgl = import_spoutgl()
        self.name = name
        self.what = f"Spout sender {name!r}"
        self.format = None  # any size and pixel format
        self.frames_sent = 0
        self._start_queue()
        self._worker = DeviceThread(f"spout sender {name}", self._open_sender, self._send_loop)

    def _open_sender(self):
        spoutgl = self._spoutgl
        with spoutgl.SpoutReceiver() as probe:  # only to see which names are taken
            taken = list(probe.getSenderList())
        if self.name in taken:
            raise TransportUnavailable(
                f"a Spout sender named {self.name!r} already exists; close it or choose another name "
                "(Spout would silently rename this one)"
            )
        sender = spoutgl.SpoutSender()
        if not sender.createOpenGL():
            sender.releaseSender()
            raise TransportUnavailable("Spout: could not create an OpenGL context")
        sender.setSenderName(self.name)
        return sender

    def _send_loop(self, sender, stop: threading.Event) -> None:
        """Publishes each frame; a frame SpoutGL fails on (an exception, or sendImage returning
        False: the sender or its OpenGL context is gone, as after a GPU driver reset) is kept in
        `_failed` for the next `send` to raise, and the sender goes on with the next one (the
        runtime opens a new sender once every send has failed for a while: bridge.lanes)."""
        gl_bgra = self._spoutgl.enums.GL_BGRA_EXT
        try:
            for frame in self._queued(stop):
                try:
                    pixels = np.ascontiguousarray(frame.pixels)  # (H, W, 4) BGRA
                    if not sender.sendImage(pixels, frame.width, frame.height, gl_bgra, False, 0):
                        raise RuntimeError("sendImage failed (the sender or its OpenGL context is gone)")
                    self.frames_sent += 1
                    sender.setFrameSync(self.name)
                except Exception as exc:
                    self._failed = exc
        finally:
            sender.releaseSender()
            sender.closeOpenGL()


class SpoutSource(Source):
    """Receives from the Spout sender `name`. While the sender is away `read` returns None and
    the receiver reconnects by itself when it comes back; its size may change at any time. An
    error from SpoutGL ends the receiver thread (its OpenGL context may be gone): `read` then
    raises SourceLost, and the runtime opens a new receiver."""

    def __init__(self, *, name: str) -> None:
        if not name:
            raise ValueError("name: a Spout sender name is needed, as in spout:TDSyphonSpoutOut")
        self._spoutgl = import_spoutgl()
        self.name = name
        self.format = None  # the sender decides the size; always BGRA
        self._slot: LatestSlot[Frame] = LatestSlot()
        self._sequence = 0
        self._lock = threading.Lock()
        self._closed = False
        self._thread = DeviceThread(f"spout receiver {name}", self._open_receiver, self._receive_loop)

    def _open_receiver(self):
        receiver = self._spoutgl.SpoutReceiver()
        if not receiver.createOpenGL():
            receiver.releaseReceiver()
            raise TransportUnavailable("Spout: could not create an OpenGL context")
        receiver.setReceiverName(self.name)
        return receiver

    def _receive_loop(self, receiver, stop: threading.Event) -> None:
        gl_bgra = self._spoutgl.enums.GL_BGRA_EXT
        buffer = None  # (H, W, 4) uint8, reallocated whenever the sender's size changes
        try:
            while not stop.is_set():
                received = receiver.receiveImage(buffer, gl_bgra, False, 0)
                if receiver.isUpdated():  # first connection or a new size: the next receive fills it
                    buffer = np.zeros((receiver.getSenderHeight(), receiver.getSenderWidth(), 4), np.uint8)
                elif received and buffer is not None and receiver.isFrameNew():
                    self._slot.put(Frame(buffer.copy(), "BGRA", time.monotonic(), self._sequence))
                    self._sequence += 1
                stop.wait(POLL_SECONDS)
        finally:
            receiver.releaseReceiver()
            receiver.closeOpenGL()

    def read(self, timeout: float = 0.1) -> Frame | None:
        if self._closed:
            raise SourceLost("Spout receiver closed")
        if self._thread.died is not None:  # a SpoutGL error ended the receiver: reopen for a new one
            raise SourceLost(f"Spout receiver failed: {type(self._thread.died).__name__}: {self._thread.died}")
        return self._slot.take(timeout)

    def close(self) -> None:
        if not claim_close(self):
            return
        self._slot.close()
        self._thread.stop()
