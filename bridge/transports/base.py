"""The two small interfaces every transport implements, and the errors they raise.

A Source produces frames, a Sink consumes them. Both are context managers, take keyword-only
constructor arguments, and may be closed any number of times (the first close releases the
device, sender name or port; later calls do nothing).
"""

from __future__ import annotations

import abc
import logging
import threading
from typing import Callable

from ..frames import Frame, FrameFormat, swizzle
from ..slots import LatestSlot

log = logging.getLogger(__name__)


_main_thread_work: list[Callable[[float], bool]] = []  # see run_main_thread_work


def needs_main_thread(work: Callable[[float], bool]) -> None:
    """Have `work(seconds)` run on the main thread whenever the runtime waits there (once per
    function): a transport whose platform delivers events to the main thread only (Syphon's
    directory on macOS). `work` returns False, at once, when it has nothing to do."""
    if work not in _main_thread_work:
        _main_thread_work.append(work)


def release_main_thread(work: Callable[[float], bool]) -> None:
    """`work` no longer runs on the main thread (its transport closed)."""
    if work in _main_thread_work:
        _main_thread_work.remove(work)


def run_main_thread_work(seconds: float) -> bool:
    """On the main thread: what transports asked to run there, for about `seconds` in all
    (shared out: a Syphon directory and a preview window each get their turn); False, at once,
    when none did (the caller then waits its own way)."""
    works = list(_main_thread_work)
    return any([work(seconds / len(works)) for work in works]) if works else False


def claim_close(transport) -> bool:
    """True for the first `close()` of `transport` (which holds `_lock` and `_closed`), the one
    that releases the device; False for every later call, which must do nothing."""
    with transport._lock:
        if transport._closed:
            return False
        transport._closed = True
        return True


def close_quietly(transport) -> None:
    """Close a source or sink; a failure is logged, never raised (the caller is releasing it)."""
    try:
        transport.close()
    except Exception:
        log.exception("closing %s failed", type(transport).__name__)


def pixels_in(frame: Frame, format: FrameFormat):  # noqa: A002 (the Sink attribute's name)
    """`frame`'s pixels in `format`'s pixel format, for a sink of a fixed format: ValueError
    naming both when its size differs (the runtime letterboxes before; a library caller must)."""
    if (frame.width, frame.height) != (format.width, format.height):
        raise ValueError(f"frame: expected {format.width}x{format.height}, got {frame.width}x{frame.height}")
    return swizzle(frame.pixels, frame.pixel_format, format.pixel_format)


class TransportUnavailable(RuntimeError):
    """This transport cannot run on this machine; the message is one line a user can act on.

    Examples: "Spout is Windows-only", "no v4l2loopback device: run `modprobe v4l2loopback`".
    """


class SourceLost(RuntimeError):
    """The source went away (cable, sender, camera, end of file); the runtime reconnects."""


class SourceEnded(SourceLost):
    """The source finished for good (the end of a file played without looping); the runtime
    processes what it already has and stops instead of reconnecting."""


class _ClosedOnExit(abc.ABC):
    """A context manager whose exit is `close()`."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Source(_ClosedOnExit):
    """Produces frames. Guarantees: `read` never blocks longer than its timeout;
    `close` is safe to call twice; after `close`, `read` raises SourceLost."""

    #: what `read` returns; None when the source adapts to whatever arrives
    format: FrameFormat | None = None

    @abc.abstractmethod
    def read(self, timeout: float = 0.1) -> Frame | None:
        """The next new frame, or None when none arrived within `timeout` seconds.

        Raises SourceLost when the source is gone; the caller may close it and open a new one.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release the device or connection. Safe to call more than once."""


class Sink(_ClosedOnExit):
    """Consumes frames. Guarantees: `send` returns promptly (it never waits for a reader);
    `close` is safe to call twice."""

    #: what `send` accepts; the runtime converts frames to it before sending
    format: FrameFormat | None = None
    #: how the runtime fits a frame of another size into `format`: "letterbox" (all of it,
    #: between black bars), "crop" (its middle, filling the sink) or "stretch"
    fit: str = "letterbox"
    #: how the runtime scales it: "bilinear" (smooth) or "nearest" (blocky when enlarging, cheapest)
    filter: str = "bilinear"

    @abc.abstractmethod
    def send(self, frame: Frame) -> None:
        """Publish one frame (already in `self.format` when that is set)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the device, sender name or file. Safe to call more than once."""


class DeviceThread:
    """Runs `body(handle, stop_event)` on a daemon thread that owns a device, where `handle` is
    what `setup()` returned there (Spout's OpenGL context lives on the thread that made it); an
    error in `setup` is raised to the constructor's caller, and one that ends the body is kept in
    `died` and logged once (the transport then says so, never looks alive)."""

    def __init__(self, name: str, setup: Callable[[], object], body: Callable[[object, threading.Event], None]) -> None:
        self._setup = setup
        self._body = body
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.died: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join(1.0)
            raise self._error

    def _run(self) -> None:
        try:
            handle = self._setup()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._body(handle, self._stop)
        except BaseException as exc:  # kept for read/send to raise; logged once here
            self.died = exc
            log.error("%s stopped: %s: %s", self._thread.name, type(exc).__name__, exc)

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("%s did not stop within %.1f s", self._thread.name, timeout)


class WorkerSink(Sink):
    """A sink whose device lives on a worker thread of its own (Spout's OpenGL context, Syphon's
    server): `send` converts each frame to BGRA (a repeat of the last frame once) and leaves it in
    a newest-frame-wins slot for that thread, which publishes from `self._slot` and keeps in
    `self._failed` what the device raised on a frame; `send` reports that at its next call, and a
    worker that died (`self._worker.died`) at every call. `what` names it in those messages, as in
    "Spout sender 'x'". Subclasses call `_start_queue()` before starting `self._worker` (which has
    `died` and `stop()`), and take `self._lock` and `self._closed` from it."""

    what = "sink"

    def _start_queue(self) -> None:
        self._failed: Exception | None = None
        self._converted: tuple = (None, None)  # (the last frame sent, it in BGRA)
        self._slot = LatestSlot()
        self._lock = threading.Lock()
        self._closed = False

    def _queued(self, stop: threading.Event):
        """For the worker: each frame `send` queued (the newest, when several came meanwhile), until `stop`."""
        while not stop.is_set():
            frame = self._slot.take(0.1)
            if frame is not None:
                yield frame

    def send(self, frame: Frame) -> None:
        """Queue `frame` for the worker (any pixel format: BGRA is sent as it is). Raises what the
        device failed on since the last call, or that the worker has stopped."""
        if self._worker.died is not None:
            raise RuntimeError(f"{self.what} stopped: {self._worker.died}")
        failed, self._failed = self._failed, None
        if frame.pixel_format != "BGRA":
            if self._converted[0] is not frame:  # a repeat of the last frame is converted once
                bgra = Frame(swizzle(frame.pixels, frame.pixel_format, "BGRA"), "BGRA", frame.timestamp, frame.sequence)
                self._converted = (frame, bgra)
            frame = self._converted[1]
        self._slot.put(frame)
        if failed is not None:
            raise RuntimeError(f"{self.what} could not send a frame: {type(failed).__name__}: {failed}")

    def close(self) -> None:
        if not claim_close(self):
            return
        self._slot.close()
        self._worker.stop()

