"""`window[:TITLE]`: an on-screen preview of the output in a Tk window (standard library only).

Tk is used from one thread only. On Windows and Linux a daemon thread started by the sink
creates the interpreter, the window and its picture, runs Tk's event loop, and looks for a new
frame every few milliseconds (`after`). macOS creates windows on the main thread only (a window
made from any other thread aborts the process), so there the sink has no thread of its own: it
asks for the main thread (transports.base.needs_main_thread), which `sdbridge run` keeps free
while frames flow, and there creates the window at its first turn and pumps Tk's events and the
newest frame in each turn (`main_thread=True`). Either way `send` only leaves the frame in a
newest-wins slot and returns, so a slow or stuck window never holds the output. Closing the
window by hand stops the preview, not the show: `send` keeps accepting frames and the other
sinks keep getting them.

Where: Windows, Linux with an X server (X11 or XWayland), macOS (not yet run on a Mac). When
the X server goes away under the window, only the preview ends (`_survive_a_lost_display`).
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time

import numpy as np

from ..frames import Frame, resize, swizzle
from ..slots import LatestSlot
from .base import Sink, TransportUnavailable, claim_close, needs_main_thread, release_main_thread

log = logging.getLogger(__name__)

POLL_MILLISECONDS = 8  # how often the GUI thread looks for a new frame (about 120 times a second)
OPEN_TIMEOUT_SECONDS = 5.0  # longest wait for the window to appear (or fail) in the constructor
CLOSE_TIMEOUT_SECONDS = 1.0  # longest wait for the GUI thread to end in `close`
MAX_SCALE = 8.0


def check_display(platform: str | None = None, environ=None) -> None:
    """Raise TransportUnavailable when this OS or session has nowhere to show a window."""
    platform = platform or sys.platform
    environ = os.environ if environ is None else environ
    if platform in ("win32", "darwin"):  # (macOS: Aqua, no X server needed)
        return
    if not environ.get("DISPLAY") and not environ.get("WAYLAND_DISPLAY"):
        raise TransportUnavailable("window: no display to open a window on ($DISPLAY is not set)")


_display_lost = threading.Event()  # the X server went away (see _survive_a_lost_display)
_io_error_handler = None  # the handler given to Xlib, kept alive for the process's life


def _survive_a_lost_display() -> None:
    """On X11, when the X server goes away under the window (a logout, `ssh -X` dropped), Xlib
    calls its I/O error handler, then exits the process: the show and every other sink with it.
    Installs (once, process-wide: only Tk uses Xlib here) a handler that never returns: it logs,
    marks the display lost, and parks the window's thread for good, so only the preview ends."""
    global _io_error_handler
    if sys.platform in ("win32", "darwin") or _io_error_handler is not None:
        return
    import ctypes
    import ctypes.util

    library = ctypes.util.find_library("X11")
    try:
        xlib = ctypes.CDLL(library or "libX11.so.6")  # the one Tk has loaded already
    except OSError:
        return

    def on_io_error(display) -> int:
        log.error("window: the X display went away; the preview stops, the show goes on")
        _display_lost.set()
        threading.Event().wait()  # never returns: after its handler returns, Xlib exits the process
        return 0

    _io_error_handler = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(on_io_error)
    xlib.XSetIOErrorHandler(_io_error_handler)


def import_tkinter():
    """The tkinter module, or one clear line saying why not."""
    try:
        import tkinter
    except ImportError:
        message = "window: tkinter is not installed (Debian/Ubuntu: apt-get install python3-tk)"
        raise TransportUnavailable(message) from None
    return tkinter


def ppm_bytes(pixels: np.ndarray, pixel_format: str, scale: float = 1.0) -> bytes:
    """(H, W, C) pixels in any of the frame pixel formats as a binary PPM (P6) picture, scaled
    smoothly (bilinear, as the sinks of their own size); Tk's photo images read PPM natively."""
    rgb = swizzle(pixels, pixel_format, "RGB")  # (H, W, 3)
    if scale != 1.0:
        height, width = rgb.shape[:2]
        rgb = resize(rgb, max(1, round(width * scale)), max(1, round(height * scale)))
    height, width = rgb.shape[:2]
    return b"P6\n%d %d\n255\n" % (width, height) + np.ascontiguousarray(rgb).tobytes()


def _new_root(tkinter):
    """A Tk main window that, unlike tkinter.Tk, runs no ~/.sdbridge.py or ~/.sdbridge.tcl."""

    class Root(tkinter.Tk):
        def readprofile(self, baseName, className):  # noqa: N803 (tkinter's names)
            pass

    return Root(className="sdbridge")


class _View:
    """The Tk objects; created, used and destroyed on the GUI thread only."""

    def __init__(self, tkinter, root, title: str, first_picture: bytes) -> None:
        self.root = root
        self.photo = tkinter.PhotoImage(master=root, data=first_picture, format="PPM")
        self.label = tkinter.Label(root, image=self.photo, borderwidth=0, highlightthickness=0)
        self.label.pack()
        root.title(title)
        self.destroyed = False

    def show(self, picture: bytes) -> None:
        self.photo.configure(data=picture, format="PPM")  # the label follows the new size

    def destroy(self) -> None:
        if not self.destroyed:
            self.destroyed = True
            self.root.destroy()


class _Request:
    """A function to run on the GUI thread and its outcome."""

    def __init__(self, function) -> None:
        self.function = function
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None


class WindowSink(Sink):
    """Shows every frame sent (any size, RGB/BGR/RGBA/BGRA) in a window titled `title`, scaled
    by `scale`; a black `width` x `height` picture until the first frame arrives.

    `frames_sent` counts `send` calls, `frames_shown` the pictures put on screen, and
    `frames_dropped` those replaced by a newer one before the window got to them.

    `main_thread` (default: on macOS only): drive the window from the main thread's turns
    (`transports.base.run_main_thread_work`) instead of a thread of its own; the window opens at
    the first turn, so a failure to open is logged then, not raised here.
    """

    def __init__(self, *, title: str = "sdbridge", scale: float = 1.0, width: int = 512, height: int = 512,
                 main_thread: bool | None = None) -> None:
        if not isinstance(title, str):
            raise ValueError(f"title: {title!r} must be a string")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= MAX_SCALE:
            raise ValueError(f"scale: {scale!r} must be a number in (0, {MAX_SCALE:g}]")
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: {value!r} must be a positive integer")
        check_display()
        tkinter = import_tkinter()
        self.format = None  # any size and pixel format: converted on the GUI thread
        self.title = title or "sdbridge"
        self.scale = float(scale)
        self.frames_sent = 0
        self.frames_shown = 0
        self._slot: LatestSlot[Frame] = LatestSlot()
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._user_closed = threading.Event()
        self._ready = threading.Event()
        self._open_error: str | None = None
        self._show_failed = False
        first_picture = ppm_bytes(np.zeros((height, width, 3), np.uint8), "RGB", self.scale)
        self._main_thread = sys.platform == "darwin" if main_thread is None else bool(main_thread)
        self._view: _View | None = None  # main-thread mode: the window, once its first turn made it
        if self._main_thread:
            self._tkinter, self._first_picture = tkinter, first_picture
            self._thread = None
            needs_main_thread(self._turn)
            return
        self._thread = threading.Thread(target=self._run, args=(tkinter, first_picture), name="sdbridge-window",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(OPEN_TIMEOUT_SECONDS):
            self._stop.set()
            raise TransportUnavailable(f"window: the window did not open within {OPEN_TIMEOUT_SECONDS:g} s")
        if self._open_error is not None:
            self._thread.join(CLOSE_TIMEOUT_SECONDS)
            raise TransportUnavailable(f"window: cannot open a window: {self._open_error}")

    @property
    def frames_dropped(self) -> int:
        return self._slot.overwritten

    @property
    def user_closed(self) -> bool:
        """True once the window was closed by hand (the sink still accepts frames)."""
        return self._user_closed.is_set()

    @property
    def running(self) -> bool:
        """True while the window can show frames (main-thread mode: until it is closed; before
        the first turn opens it too), or the GUI thread is alive, and its display is there."""
        if self._main_thread:
            return not (self._stop.is_set() or self._user_closed.is_set() or self._open_error is not None
                        or (self._view is not None and self._view.destroyed))
        return self._thread.is_alive() and not _display_lost.is_set()

    def send(self, frame: Frame) -> None:
        """Hand `frame` to the window and return at once; the window shows the newest one."""
        self.frames_sent += 1
        if self._closed or self._user_closed.is_set() or _display_lost.is_set():
            return
        self._slot.put(frame)

    def close(self) -> None:
        if not claim_close(self):
            return
        self._stop.set()
        self._slot.close()
        if self._main_thread:  # Tk only on the main thread: destroyed here if this is it, else at its next turn
            if threading.current_thread() is threading.main_thread():
                self._turn(0.0)
            return
        self._thread.join(0.0 if _display_lost.is_set() else CLOSE_TIMEOUT_SECONDS)
        if self._thread.is_alive() and not _display_lost.is_set():  # (parked for good when the display went)
            log.warning("window: the window thread did not end within %g s", CLOSE_TIMEOUT_SECONDS)

    def call_in_window(self, function, timeout: float = 1.0):
        """Run `function(view)` on the GUI thread and return what it returns (`view` has `root`,
        `photo`, `label`). For tests and diagnostics; raises TimeoutError or RuntimeError. In
        main-thread mode, called on the main thread it runs at once (the window must be open)."""
        if self._main_thread:
            if threading.current_thread() is threading.main_thread():
                if self._view is None or self._view.destroyed:
                    raise RuntimeError("window: the window is closed" if self._view else "window: not open yet")
                return function(self._view)
            if not self.running:
                raise RuntimeError("window: the window is closed")
        elif not self._thread.is_alive():
            raise RuntimeError("window: the window is closed")
        request = _Request(function)
        self._requests.put(request)
        if not request.done.wait(timeout):
            raise TimeoutError(f"window: no answer from the window thread within {timeout:g} s")
        if request.error is not None:
            raise request.error
        return request.result

    def shown_picture(self, timeout: float = 1.0) -> np.ndarray:
        """The picture on screen now, read back from the photo image: (H, W, 3) uint8 RGB."""
        data = self.call_in_window(lambda view: view.photo.tk.call(view.photo.name, "data", "-format", "ppm"), timeout)
        _magic, size, _maximum, pixels = bytes(data).split(b"\n", 3)  # P6, "W H", 255, RGB bytes
        width, height = (int(value) for value in size.split())
        return np.frombuffer(pixels, np.uint8).reshape(height, width, 3)

    # --- everything below runs on the GUI thread (main-thread mode: on the main thread)

    def _turn(self, seconds: float) -> bool:
        """Main-thread mode, the main thread's turn: open the window the first time, then for
        about `seconds` answer requests, show the newest frame and run Tk's events, every
        POLL_MILLISECONDS. False, at once, when there is nothing to do (closed, failed) or this
        is not the main thread (the runtime's wait may run anywhere; Tk must stay on one thread)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if self._stop.is_set():
            if self._view is not None:
                self._view.destroy()
            self._fail_requests()
            release_main_thread(self._turn)
            return False
        if self._open_error is not None or self._user_closed.is_set():
            return False
        view = self._view or self._open_on_main_thread()
        if view is None:
            return False
        deadline = time.monotonic() + seconds
        while not view.destroyed:
            try:
                self._serve_requests(view)
                frame = self._slot.take(timeout=0)
                if frame is not None:
                    self._show(view, frame)
                view.root.update()  # Tk's events: drawing, moves, the close button
            except self._tkinter.TclError as exc:  # the window went away under it
                if not view.destroyed:
                    log.warning("window: the window failed: %s", exc)
                    view.destroyed = True
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stop.is_set():
                break
            time.sleep(min(POLL_MILLISECONDS / 1000.0, remaining))
        if view.destroyed:
            self._fail_requests()
        return True

    def _open_on_main_thread(self) -> _View | None:
        tkinter, root = self._tkinter, None
        try:
            root = _new_root(tkinter)
            view = _View(tkinter, root, self.title, self._first_picture)
        except Exception as exc:  # (an Aqua or X failure): the preview is off, the show goes on
            if root is not None:
                try:
                    root.destroy()
                except tkinter.TclError:
                    pass
            self._open_error = " ".join(str(exc).split()) or type(exc).__name__
            log.warning("window: cannot open a window: %s; the output goes on to the other sinks", self._open_error)
            self._fail_requests()
            return None
        root.protocol("WM_DELETE_WINDOW", lambda: self._on_user_close(view))
        self._view = view
        return view

    def _run(self, tkinter, first_picture: bytes) -> None:
        try:
            root = _new_root(tkinter)
        except tkinter.TclError as exc:
            self._open_error = " ".join(str(exc).split()) or type(exc).__name__
            self._ready.set()
            return
        _survive_a_lost_display()
        view = None
        try:
            view = _View(tkinter, root, self.title, first_picture)
            root.protocol("WM_DELETE_WINDOW", lambda: self._on_user_close(view))
            root.after(POLL_MILLISECONDS, self._poll, view)
            self._ready.set()
            root.mainloop()
        except Exception as exc:
            if not self._ready.is_set():
                self._open_error = " ".join(str(exc).split()) or type(exc).__name__
            else:
                log.warning("window: the window failed: %s: %s", type(exc).__name__, exc)
        finally:
            try:
                if view is not None:
                    view.destroy()
                else:
                    root.destroy()
            except tkinter.TclError:
                pass
            self._ready.set()
            self._fail_requests()

    def _poll(self, view: _View) -> None:
        """One look: answer requests, show the newest frame, come back in POLL_MILLISECONDS."""
        try:
            self._serve_requests(view)
            if self._stop.is_set() and not view.destroyed:
                view.destroy()  # mainloop returns
            if not view.destroyed:
                frame = self._slot.take(timeout=0)
                if frame is not None:
                    self._show(view, frame)
        finally:
            if not view.destroyed:
                view.root.after(POLL_MILLISECONDS, self._poll, view)

    def _show(self, view: _View, frame: Frame) -> None:
        try:
            view.show(ppm_bytes(frame.pixels, frame.pixel_format, self.scale))
        except Exception as exc:  # a bad frame costs one picture, never the window
            if not self._show_failed:
                self._show_failed = True
                log.warning("window: cannot show a frame: %s: %s", type(exc).__name__, exc)
            return
        self.frames_shown += 1

    def _serve_requests(self, view: _View) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                if view.destroyed:
                    raise RuntimeError("window: the window is closed")
                request.result = request.function(view)
            except BaseException as exc:
                request.error = exc
            request.done.set()

    def _fail_requests(self) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            request.error = RuntimeError("window: the window is closed")
            request.done.set()

    def _on_user_close(self, view: _View) -> None:
        """WM_DELETE_WINDOW: the preview goes away, the sink keeps accepting frames."""
        if not self._user_closed.is_set():
            self._user_closed.set()
            log.info("window: %r closed by the user; the output goes on to the other sinks", self.title)
        view.destroy()
