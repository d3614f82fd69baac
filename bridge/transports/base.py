"""The two small interfaces every transport implements, and the errors they raise.

A Source produces frames, a Sink consumes them. Both are context managers, take keyword-only
constructor arguments, and may be closed any number of times (the first close releases the
device, sender name or port; later calls do nothing).
"""

from __future__ import annotations

import abc
from typing import Callable

from ..frames import Frame, FrameFormat, swizzle


_main_thread_work: list[Callable[[float], bool]] = []  # see run_main_thread_work


def needs_main_thread(work: Callable[[float], bool]) -> None:
    """Have `work(seconds)` run on the main thread whenever the runtime waits there (once per
    function): a transport whose platform delivers events to the main thread only (Syphon's
    directory on macOS). `work` returns False, at once, when it has nothing to do."""
    if work not in _main_thread_work:
        _main_thread_work.append(work)


def run_main_thread_work(seconds: float) -> bool:
    """On the main thread: what transports asked to run there, for about `seconds`; False, at
    once, when none did (the caller then waits its own way)."""
    return any(work(seconds) for work in list(_main_thread_work))


def claim_close(transport) -> bool:
    """True for the first `close()` of `transport` (which holds `_lock` and `_closed`), the one
    that releases the device; False for every later call, which must do nothing."""
    with transport._lock:
        if transport._closed:
            return False
        transport._closed = True
        return True


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

    @abc.abstractmethod
    def send(self, frame: Frame) -> None:
        """Publish one frame (already in `self.format` when that is set)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the device, sender name or file. Safe to call more than once."""
