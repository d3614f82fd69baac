"""`syphon:NAME`: Syphon servers and clients through syphon-python's Metal classes (macOS only).

Written against syphon-python 0.2.0 (cansik/syphon-python: syphon/server.py, client.py,
server_directory.py, utils/raw.py, utils/numpy.py), using only what every 0.2.0 revision has:
SyphonMetalServer(name, device=).publish_frame_texture(texture, is_flipped=) / .stop(),
SyphonServerDirectory().servers (SyphonServerDescription: uuid, name, app_name, raw) with
`run_loop_interval`, SyphonMetalClient(description, device=) with is_valid, has_new_frame,
new_frame_image, stop(), and the raw/numpy texture helpers. The OpenGL classes are not used
(deprecated on macOS); Metal needs no context bound to a thread, so the calls may come from any
thread (Syphon documents its Metal server as safe across threads).

Pixels travel as BGRA, the layout of Syphon's surfaces (SyphonMetalServer.m draws into a
BGRA8Unorm IOSurface; clients get BGRA8Unorm textures). Row 0 is the top: the sink copies a BGRA
texture unflipped (Syphon's blit path) and the source reads rows as they come; `flip` turns the
picture upside down for apps that draw bottom-up.

Discovery: Syphon announces and retires servers with distributed notifications, which macOS
delivers on the main thread's run loop only (syphon-python's `servers` runs the calling
thread's run loop; its examples run on the main thread). A source opened on the main thread
(as `sdbridge run` opens its first one) runs that loop until its server shows up, at most
DISCOVERY_SECONDS; elsewhere it reads the directory as the main thread last saw it. Servers that
appear later, and other apps' requests to list ours, are seen while the main thread runs
`run_main_run_loop`: the runtime's wait on the main thread does (transports.base.needs_main_thread),
so a source reopened on the capture thread finds a server started after the bridge. A
client's frames and its server's retirement come on Syphon's own threads. Threads without an
AppKit event loop drain no autorelease pool by themselves: each pass of a worker runs inside
`objc.autorelease_pool()` (Metal's command buffers and the directory's lists are autoreleased).

Names: Syphon allows two servers of one name (it never renames); clients tell them apart by
app name. `syphon:NAME` picks the first server whose name is NAME, else whose "APP - NAME" is
NAME, else whose app is NAME; `syphon:` (no name) the first server listed.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..frames import Frame
from ..slots import LatestSlot
from .base import DeviceThread, Source, SourceLost, TransportUnavailable, WorkerSink, claim_close, needs_main_thread

POLL_SECONDS = 1.0 / 240  # how often the client asks for a new frame
FIND_SECONDS = 0.1  # how often a source without a server looks at the directory again
DIRECTORY_CHECK_SECONDS = 0.5  # how often a connected source checks its server is still listed
DISCOVERY_SECONDS = 1.0  # how long a source opened on the main thread waits for its server to be announced
RUN_LOOP_SECONDS = 0.05  # the most one look at the directory runs the calling thread's run loop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyphonModules:
    """The imported syphon-python pieces the adapters use."""

    syphon: Any  # the `syphon` package (SyphonMetalServer, SyphonMetalClient, SyphonServerDirectory)
    metal: Any  # PyObjC's Metal (MTLCreateSystemDefaultDevice, pixel format constants)
    autorelease_pool: Callable  # PyObjC's objc.autorelease_pool(): a context manager draining what Cocoa autoreleased
    create_mtl_texture: Callable  # syphon.utils.raw
    copy_image_to_mtl_texture: Callable  # syphon.utils.numpy: (H, W, 4) uint8 -> texture, bytes as they are
    copy_mtl_texture_to_image: Callable  # syphon.utils.numpy: texture -> (H, W, 4) uint8, bytes as they are


_loaded: SyphonModules | None = None  # set by the first successful import (run_main_run_loop needs it)


def import_syphon() -> SyphonModules:
    """syphon-python, or one clear line saying why not."""
    global _loaded
    try:
        import Metal
        import objc
        import syphon
        from syphon.utils.numpy import copy_image_to_mtl_texture, copy_mtl_texture_to_image
        from syphon.utils.raw import create_mtl_texture
    except ImportError:
        if sys.platform != "darwin":
            raise TransportUnavailable("Syphon is macOS-only; use NDI to share video on other systems") from None
        raise TransportUnavailable("Syphon needs syphon-python: pip install 'sdbridge[syphon]'") from None
    except Exception as exc:  # the framework bundle failed to load
        raise TransportUnavailable(f"syphon-python failed to load: {type(exc).__name__}: {exc}") from None
    _loaded = SyphonModules(syphon, Metal, objc.autorelease_pool, create_mtl_texture, copy_image_to_mtl_texture,
                            copy_mtl_texture_to_image)
    needs_main_thread(run_main_run_loop)  # the runtime's wait runs it: servers announced later are seen
    return _loaded


def metal_device(modules: SyphonModules):
    """The system's default Metal device, or TransportUnavailable."""
    device = modules.metal.MTLCreateSystemDefaultDevice()
    if device is None:
        raise TransportUnavailable("Syphon needs a Metal GPU, and macOS reports none (MTLCreateSystemDefaultDevice)")
    return device


def run_main_run_loop(seconds: float) -> bool:
    """On the main thread, once a Syphon transport was opened: run the main run loop for `seconds`,
    which lets macOS deliver Syphon's directory changes (servers announced or retired) and other
    apps' requests to list our servers. False, at once, anywhere else (the caller waits its own way)."""
    if _loaded is None or threading.current_thread() is not threading.main_thread():
        return False
    directory = _loaded.syphon.SyphonServerDirectory()
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        directory.run_loop_interval = remaining
        started = time.monotonic()
        with _loaded.autorelease_pool():  # no AppKit event loop drains one on this thread
            directory.update_run_loop()  # returns after one event, or at once when nothing is scheduled
        if time.monotonic() - started < 0.001:
            time.sleep(min(remaining, 0.01))
    return True


def server_label(description) -> str:
    """A server as the bridge names it (in messages and in `syphon:APP - NAME`): "APP - NAME", or
    the app alone for an unnamed server."""
    if not description.name:
        return description.app_name
    return f"{description.app_name} - {description.name}" if description.app_name else description.name


def matching_servers(servers: Sequence, target: str) -> list:
    """The servers `target` names, in the directory's order: by name, else "APP - NAME", else app name;
    all of them for an empty target."""
    if not target:
        return list(servers)
    for matches in (lambda s: s.name == target, lambda s: server_label(s) == target, lambda s: s.app_name == target):
        found = [server for server in servers if matches(server)]
        if found:
            return found
    return []


class SyphonSink(WorkerSink):
    """Publishes frames as the Syphon server `name`, each at its own size (the texture is made
    again when the size changes), as BGRA (other pixel formats are converted). `flip`: publish
    upside down."""

    def __init__(self, *, name: str, flip: bool = False) -> None:
        if not name:
            raise ValueError("name: a Syphon server name is needed, as in syphon:sdbridge")
        modules = import_syphon()
        device = metal_device(modules)
        self.name = name
        self.what = f"Syphon server {name!r}"
        self.flip = flip
        self.format = None  # any size and pixel format
        self.frames_sent = 0
        self._modules = modules
        self._start_queue()
        self._server = modules.syphon.SyphonMetalServer(name, device=device)  # announced now
        self._worker = DeviceThread(f"syphon server {name}", lambda: None, lambda _, stop: self._publish_loop(stop))

    def _publish_loop(self, stop: threading.Event) -> None:
        """Publishes each frame; a frame syphon-python fails on is kept in `_failed` for the next
        `send` to raise, and the server goes on with the next one."""
        modules, texture = self._modules, None
        try:
            for frame in self._queued(stop):
                try:
                    with modules.autorelease_pool():  # Metal's command buffers are autoreleased: drained each frame
                        # 1. a texture of the frame's size (made again when the size changes)
                        if texture is None or (texture.width(), texture.height()) != (frame.width, frame.height):
                            texture = modules.create_mtl_texture(self._server.device, frame.width, frame.height,
                                                                 modules.metal.MTLPixelFormatBGRA8Unorm)
                        # 2. the pixels into it, row 0 at the top, then published (copied by Syphon)
                        modules.copy_image_to_mtl_texture(np.ascontiguousarray(frame.pixels), texture)  # (H, W, 4) BGRA
                        self._server.publish_frame_texture(texture, is_flipped=self.flip)
                    self.frames_sent += 1
                except Exception as exc:
                    self._failed = exc
        finally:
            self._server.stop()


class SyphonSource(Source):
    """Receives from the Syphon server `name` (see the module docstring for how names match).

    Frames come out BGRA in the server's size, which may change at any time. `read` raises
    SourceLost when the server goes away (its client turns invalid, or it leaves the directory),
    when none matches within `timeout` seconds of opening, or when syphon-python fails; the
    runtime then opens a new source, which looks for the server again. `flip`: upside down."""

    def __init__(self, *, name: str = "", timeout: float = 5.0, flip: bool = False) -> None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
            raise ValueError(f"timeout: {timeout!r} must be a positive number of seconds")
        modules = import_syphon()
        self._device = metal_device(modules)
        self.name = name
        self.timeout = float(timeout)
        self.flip = flip
        self.format = None  # the server decides the size; always BGRA
        self.server: str | None = None  # "APP - NAME" once connected
        self._modules = modules
        metal = modules.metal
        self._pixel_formats = {metal.MTLPixelFormatBGRA8Unorm: "BGRA", metal.MTLPixelFormatRGBA8Unorm: "RGBA"}
        self._directory = modules.syphon.SyphonServerDirectory()
        self._directory.run_loop_interval = RUN_LOOP_SECONDS
        self._visible: list = []  # what the directory listed at the last look
        self._lost: str | None = None  # why the source is gone, for `read` to raise
        self._slot: LatestSlot[Frame] = LatestSlot()
        self._sequence = 0
        self._lock = threading.Lock()
        self._closed = False
        description = self._discover()
        self._worker = DeviceThread(f"syphon client {name or '(first server)'}", lambda: None,
                                    lambda _, stop: self._receive_loop(description, stop))

    def _find(self):
        """One look at the directory: the server to connect to, or None."""
        self._visible = self._directory.servers
        found = matching_servers(self._visible, self.name)
        if len(found) > 1:
            log.warning("Syphon: %d servers match %r (%s); using %r", len(found), self.name,
                        ", ".join(map(server_label, found)), server_label(found[0]))
        return found[0] if found else None

    def _discover(self):
        """The server, if it is listed; on the main thread the run loop runs (delivering Syphon's
        announcements) until it is, at most DISCOVERY_SECONDS."""
        on_main_thread = threading.current_thread() is threading.main_thread()
        deadline = time.monotonic() + (DISCOVERY_SECONDS if on_main_thread else 0.0)
        while True:
            started = time.monotonic()
            with self._modules.autorelease_pool():
                description = self._find()
            if description is not None or time.monotonic() >= deadline:
                return description
            if time.monotonic() - started < 0.001:  # a run loop with nothing to wait on returns at once
                time.sleep(0.01)

    def _receive_loop(self, description, stop: threading.Event) -> None:
        opened, client, next_check = time.monotonic(), None, 0.0
        try:
            while not stop.is_set():
                with self._modules.autorelease_pool():  # drained every pass: no run loop drains one on this thread
                    # 1. a client for the server, once the directory lists one
                    if client is None:
                        description = description or self._find()
                        if description is None:
                            if time.monotonic() - opened >= self.timeout:
                                return self._lose(self._not_found())
                            stop.wait(FIND_SECONDS)
                            continue
                        client = self._connect(description)
                        if client is None:
                            return
                    # 2. still there: a valid client, and listed (a crashed app is dropped from the list)
                    if not client.is_valid:
                        return self._lose(f"Syphon server {self.server!r} went away")
                    if time.monotonic() >= next_check:
                        next_check = time.monotonic() + DIRECTORY_CHECK_SECONDS
                        if description.uuid not in {listed.uuid for listed in self._directory.servers}:
                            return self._lose(f"Syphon server {self.server!r} left the Syphon directory")
                    # 3. the newest frame, if a new one came
                    if client.has_new_frame:
                        texture = client.new_frame_image
                        if texture is not None:
                            self._slot.put(self._frame(texture))
                stop.wait(POLL_SECONDS)
        finally:
            if client is not None:
                client.stop()

    def _not_found(self) -> str:
        visible = ", ".join(map(server_label, self._visible)) or "none"
        return f"Syphon server {self.name or '(any)'!r} not found within {self.timeout:g} s (visible: {visible})"

    def _connect(self, description):
        """A client for `description`, or None when syphon-python refuses (the source is then lost)."""
        self.server = server_label(description)
        try:
            client = self._modules.syphon.SyphonMetalClient(description, device=self._device)
        except Exception as exc:  # later 0.2.0 revisions raise RuntimeError when Syphon makes no client
            self._lose(f"Syphon server {self.server!r} could not be opened: {type(exc).__name__}: {exc}")
            return None
        log.info("Syphon source %r: connected to %r", self.name, self.server)
        return client

    def _frame(self, texture) -> Frame:
        pixel_format = self._pixel_formats.get(texture.pixelFormat())
        if pixel_format is None:
            raise ValueError(f"Syphon server {self.server!r} sent Metal pixel format {texture.pixelFormat()}, "
                             "expected BGRA8 or RGBA8")
        pixels = self._modules.copy_mtl_texture_to_image(texture)  # (H, W, 4), row 0 the top
        if self.flip:
            pixels = np.ascontiguousarray(pixels[::-1])
        frame = Frame(pixels, pixel_format, time.monotonic(), self._sequence)
        self._sequence += 1
        return frame

    def _lose(self, reason: str) -> None:
        self._lost = reason
        self._slot.close()  # a waiting read returns at once, and the next one raises

    def _check_alive(self) -> None:
        if self._closed:
            raise SourceLost("Syphon client closed")
        if self._worker.died is not None:  # a syphon-python error ended the client: reopen for a new one
            raise SourceLost(f"Syphon client failed: {type(self._worker.died).__name__}: {self._worker.died}")
        if self._lost is not None:
            raise SourceLost(self._lost)

    def read(self, timeout: float = 0.1) -> Frame | None:
        self._check_alive()
        frame = self._slot.take(timeout)
        if frame is None:
            self._check_alive()
        return frame

    def close(self) -> None:
        if not claim_close(self):
            return
        self._slot.close()
        self._worker.stop()
