"""The `window` preview sink against a real X server (Xvfb started here): pixels sent are the
pixels on screen, `send` never waits for the window, closing it by hand stops only the preview,
and every way it cannot open is one line."""

import importlib.util
import logging
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from bridge import framecode
from bridge.frames import Frame, resize, swizzle
from bridge.runtime import Runtime, RuntimeConfig
from bridge.transports import TransportUnavailable, open_sink, parse_spec
from bridge.transports.base import Sink, run_main_thread_work
from bridge.transports.testpattern import TestPatternSource
from bridge.transports.window import WindowSink, check_display

XVFB = shutil.which("Xvfb")
THREAD_NAME = "sdbridge-window"


def tkinter_missing() -> bool:
    return importlib.util.find_spec("_tkinter") is None  # tkinter's C half: python3-tk on Debian


def wait_until(predicate, seconds=3.0, step=0.01) -> bool:
    """True as soon as `predicate()` is; False after `seconds` (at most seconds/step tries)."""
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / step) + 1):
        if predicate():
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(step)
    return bool(predicate())


def window_threads() -> list:
    return [thread for thread in threading.enumerate() if thread.name == THREAD_NAME and thread.is_alive()]


def picture(height, width, seed) -> np.ndarray:
    """(H, W, 3) RGB noise, different for every seed."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def numbered(index, height=24, width=32) -> Frame:
    """A frame carrying `index` in its first pixel."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[0, 0] = (index % 256, index // 256, 7)
    return Frame(pixels, "RGB", sequence=index)


def shows(sink, expected) -> bool:
    shown = sink.shown_picture()
    return shown.shape == expected.shape and np.array_equal(shown, expected)


def _read_display_number(read_end, process, seconds) -> str:
    """Xvfb writes its display number to the -displayfd pipe once it accepts connections."""
    received, deadline = b"", time.monotonic() + seconds
    while b"\n" not in received and time.monotonic() < deadline:
        ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(read_end, 64)
        if not chunk:  # Xvfb exited
            break
        received += chunk
    if b"\n" not in received:
        raise RuntimeError(f"Xvfb did not start within {seconds} s (exit status {process.poll()})")
    return received.decode().strip()


def _private_x_server():
    """(Xvfb process, its display) on a free display number; skips where Xvfb or tkinter is missing."""
    if XVFB is None:
        pytest.skip("Xvfb not installed: apt-get install xvfb")
    if tkinter_missing():
        pytest.skip("tkinter not installed: apt-get install python3-tk")
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [XVFB, "-displayfd", str(write_end), "-screen", "0", "640x480x24", "-nolisten", "tcp"],
        pass_fds=(write_end,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    try:
        return process, ":" + _read_display_number(read_end, process, seconds=10.0)
    except BaseException:
        _stop(process)
        raise
    finally:
        os.close(read_end)


def _stop(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@pytest.fixture(scope="module")
def x_server():
    """A private X server on a free display number, for this module only."""
    process, display = _private_x_server()
    try:
        yield display
    finally:
        _stop(process)


@pytest.fixture
def display(x_server, monkeypatch):
    monkeypatch.setenv("DISPLAY", x_server)
    return x_server


@pytest.fixture
def window(display):
    sink = WindowSink(title="sdbridge test", width=32, height=24)
    yield sink
    sink.close()


# --- frames reach the window


@pytest.mark.parametrize("pixel_format", ["RGB", "BGR", "RGBA", "BGRA"])
def test_frames_sent_are_the_pixels_on_screen_in_rgb(window, pixel_format):
    rgb = picture(48, 64, seed=len(pixel_format) * 10 + pixel_format.startswith("B"))
    window.send(Frame(swizzle(rgb, "RGB", pixel_format), pixel_format))
    assert wait_until(lambda: shows(window, rgb)), "the window never showed the frame sent"
    assert window.frames_sent == 1 and window.frames_shown == 1


def test_the_window_follows_every_size_change(window):
    assert window.shown_picture().shape == (24, 32, 3) and not window.shown_picture().any()  # black until a frame
    for seed, (height, width) in enumerate([(48, 64), (20, 30), (80, 100)]):
        rgb = picture(height, width, seed)
        window.send(Frame(rgb))
        assert wait_until(lambda: shows(window, rgb)), f"{width}x{height} never shown"


@pytest.mark.parametrize("scale", [2.0, 0.5])
def test_scale_resizes_smoothly(display, scale):
    rgb = picture(12, 16, seed=3)
    with WindowSink(scale=scale, width=16, height=12) as sink:
        sink.send(Frame(rgb))
        expected = resize(rgb, int(16 * scale), int(12 * scale), "bilinear")
        assert wait_until(lambda: shows(sink, expected))
        assert sink.shown_picture().shape == (int(12 * scale), int(16 * scale), 3)


# --- send never waits for the window


def test_send_never_waits_for_a_stuck_window_and_only_the_newest_frame_is_shown(window, monkeypatch):
    release, entered = threading.Event(), threading.Event()
    show = window._show

    def stuck_show(view, frame):  # runs on the GUI thread: holds it until released (at most 3 s)
        entered.set()
        release.wait(3.0)
        show(view, frame)

    monkeypatch.setattr(window, "_show", stuck_show)
    window.send(numbered(0))
    assert entered.wait(2.0), "the window thread never took the first frame"
    started = time.monotonic()
    for index in range(1, 200):
        window.send(numbered(index))
    elapsed = time.monotonic() - started
    release.set()
    assert elapsed < 2.0, f"199 sends to a stuck window took {elapsed:.2f} s"
    newest = numbered(199).pixels
    assert wait_until(lambda: shows(window, newest)), "the newest frame never reached the window"
    assert window.frames_shown == 2  # the one it was stuck on, then the newest: nothing in between
    assert window.frames_sent == 200 and window.frames_dropped == 198


def test_a_slow_window_shows_the_newest_frame_without_building_a_queue(window, monkeypatch):
    show = window._show
    monkeypatch.setattr(window, "_show", lambda view, frame: (time.sleep(0.05), show(view, frame)))
    started = time.monotonic()
    for index in range(200):
        window.send(numbered(index))
        time.sleep(0.001)
    assert time.monotonic() - started < 2.0
    assert wait_until(lambda: shows(window, numbered(199).pixels))
    assert window.frames_shown < 100 and window.frames_shown + window.frames_dropped == 200


# --- closing


def close_by_hand(sink) -> None:
    """What the window manager's close button does: Tk calls the WM_DELETE_WINDOW handler."""
    sink.call_in_window(lambda view: view.root.tk.call(view.root.protocol("WM_DELETE_WINDOW")))


def test_closing_the_window_by_hand_stops_only_the_preview(window, caplog):
    window.send(numbered(1))
    with caplog.at_level(logging.INFO, logger="bridge.transports.window"):
        close_by_hand(window)
        assert wait_until(lambda: not window.running, 2.0), "the window thread did not end"
    assert window.user_closed
    assert [record.levelname for record in caplog.records] == ["INFO"]
    assert "closed by the user" in caplog.records[0].getMessage()
    for index in range(50):
        window.send(numbered(index))  # the show goes on
    assert window.frames_sent == 51
    with pytest.raises(RuntimeError, match="closed"):
        window.shown_picture()
    window.close()
    window.close()


def test_close_twice_is_safe_and_ends_the_thread(display):
    before = len(window_threads())
    with WindowSink(width=16, height=16) as sink:
        sink.send(numbered(1, 16, 16))
        assert sink.running and len(window_threads()) == before + 1
        started = time.monotonic()
        sink.close()
        assert time.monotonic() - started < 1.5
        assert not sink.running and len(window_threads()) == before
        sink.close()
        sink.send(numbered(2, 16, 16))  # after close: accepted, dropped
    assert sink.frames_sent == 2


# --- one line when it cannot open


def test_no_display_is_one_line(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(TransportUnavailable) as caught:
        WindowSink()
    if sys.platform.startswith("linux"):
        assert str(caught.value) == "window: no display to open a window on ($DISPLAY is not set)"


def test_which_platforms_count_as_having_a_display():
    check_display(platform="linux", environ={"DISPLAY": ":0"})
    check_display(platform="linux", environ={"WAYLAND_DISPLAY": "wayland-0"})
    check_display(platform="win32", environ={})
    with pytest.raises(TransportUnavailable, match=r"\$DISPLAY is not set"):
        check_display(platform="linux", environ={})
    check_display(platform="darwin", environ={})  # Aqua: no X server (the window lives on the main thread)


@pytest.mark.skipif(tkinter_missing(), reason="tkinter not installed: apt-get install python3-tk")
def test_a_display_that_does_not_answer_is_one_line(monkeypatch):
    number = next(n for n in range(4000, 4100) if not os.path.exists(f"/tmp/.X11-unix/X{n}"))
    monkeypatch.setenv("DISPLAY", f":{number}")
    before = len(window_threads())
    with pytest.raises(TransportUnavailable) as caught:
        WindowSink()
    message = str(caught.value)
    assert message.startswith("window: cannot open a window: ") and f":{number}" in message and "\n" not in message
    assert wait_until(lambda: len(window_threads()) == before, 2.0)


def test_without_tkinter_says_how_to_install_it(monkeypatch):
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setitem(sys.modules, "tkinter", None)  # import tkinter raises ImportError
    with pytest.raises(TransportUnavailable) as caught:
        WindowSink()
    assert str(caught.value) == "window: tkinter is not installed (Debian/Ubuntu: apt-get install python3-tk)"


# --- the registry


def test_open_sink_by_name(display):
    assert parse_spec("window:Preview", role="sink").target == "Preview"
    with open_sink("window:Preview", width=64, height=48) as sink:
        assert isinstance(sink, WindowSink) and sink.format is None
        assert sink.call_in_window(lambda view: view.root.title()) == "Preview"
        assert sink.shown_picture().shape == (48, 64, 3)
    with open_sink("window?scale=0.5", width=64, height=48) as sink:
        assert sink.title == "sdbridge" and sink.shown_picture().shape == (24, 32, 3)


@pytest.mark.parametrize("text, message", [("window?colour=red", "unknown option"), ("window?scale=0", "scale"),
                                           ("window?scale=big", "scale")])
def test_bad_window_options_are_refused_before_any_window_opens(text, message):
    with pytest.raises(ValueError, match=message):
        open_sink(text, width=64, height=48)


# --- end to end


class IdentityEngine:
    """The engine API the runtime uses, returning its input."""

    def __init__(self, size):
        self.config = SimpleNamespace(width=size, height=size, mode="img2img", guidance_scale=1.2)
        self.stats = SimpleNamespace(frames_skipped=0, nonfinite_caught=0)

    def __call__(self, pixels):
        return np.ascontiguousarray(pixels)

    def update(self, **values):
        pass

    def set_prompt(self, prompt, negative_prompt=None):
        pass


class KeepingSink(Sink):
    """Keeps every frame sent, by sequence number."""

    def __init__(self):
        self.format = None
        self.frames = {}
        self.count = 0

    def send(self, frame):
        self.frames[frame.sequence % framecode.MODULUS] = frame.pixels
        self.count += 1

    def close(self):
        pass


def test_a_runtime_shows_its_output_in_the_window_and_goes_on_when_it_is_closed(display):
    window, keeping = WindowSink(width=128, height=128), KeepingSink()
    runtime = Runtime(engine=IdentityEngine(128), open_source=lambda: TestPatternSource(width=128, height=128, fps=30),
                      sinks=[window, keeping], config=RuntimeConfig(fps=30))
    with runtime:

        def shows_a_frame_sent():
            shown = window.shown_picture()
            sequence, _ = framecode.decode(shown)
            sent = keeping.frames.get(sequence)
            return shown.any() and sent is not None and np.array_equal(shown, sent)

        assert wait_until(shows_a_frame_sent, 5.0, 0.02), "no frame of the runtime reached the window"
        close_by_hand(window)
        sent_at_close = keeping.count
        assert wait_until(lambda: keeping.count >= sent_at_close + 5, 3.0), "the output stopped with the window"
        assert window.frames_sent >= sent_at_close + 5 and runtime.snapshot()["sink_errors"] == 0
    assert not window.running


# --- main-thread mode (how macOS must run Tk), here against the same X server


def turns(seconds, step=0.02):
    """The main thread's turns for about `seconds`, as the runtime's wait gives them."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        run_main_thread_work(step)


def test_main_thread_mode_opens_at_the_first_turn_and_shows_every_size(display):
    before = len(window_threads())
    sink = WindowSink(title="main thread", width=32, height=24, main_thread=True)
    try:
        assert len(window_threads()) == before  # no thread of its own
        with pytest.raises(RuntimeError, match="not open yet"):
            sink.shown_picture()
        turns(0.05)
        assert sink.call_in_window(lambda view: view.root.title()) == "main thread"
        assert shows(sink, np.zeros((24, 32, 3), np.uint8))
        for index, (height, width) in enumerate([(24, 32), (40, 56), (16, 16)]):
            expected = picture(height, width, index)
            sink.send(Frame(expected, "RGB"))
            turns(0.05)
            assert shows(sink, expected), (height, width)
        assert sink.frames_shown == 3 and sink.running
    finally:
        sink.close()
    assert not sink.running
    with pytest.raises(RuntimeError, match="closed"):
        sink.shown_picture()
    turns(0.03)  # released: its turns are over
    sink.close()


def test_main_thread_mode_under_a_runtime_shows_frames_and_survives_closing_by_hand(display):
    """The runtime's wait on the main thread is what drives the window (sdbridge run on macOS)."""
    window, keeping = WindowSink(width=128, height=128, main_thread=True), KeepingSink()
    runtime = Runtime(engine=IdentityEngine(128), open_source=lambda: TestPatternSource(width=128, height=128, fps=30),
                      sinks=[window, keeping], config=RuntimeConfig(fps=30))
    with runtime:

        def shows_a_frame_sent():
            runtime.wait(0.05)
            shown = window.shown_picture()
            sequence, _ = framecode.decode(shown)
            sent = keeping.frames.get(sequence)
            return shown.any() and sent is not None and np.array_equal(shown, sent)

        runtime.wait(0.1)
        assert wait_until(shows_a_frame_sent, 5.0, 0.001), "no frame of the runtime reached the window"
        close_by_hand(window)
        assert window.user_closed and not window.running
        sent_at_close = keeping.count
        runtime.wait(0.5)
        assert keeping.count >= sent_at_close + 5, "the output stopped with the window"
        assert window.frames_sent >= sent_at_close + 5 and runtime.snapshot()["sink_errors"] == 0


@pytest.mark.skipif(tkinter_missing(), reason="tkinter not installed: apt-get install python3-tk")
def test_main_thread_mode_that_cannot_open_logs_once_and_takes_frames(monkeypatch, caplog):
    number = next(n for n in range(4000, 4100) if not os.path.exists(f"/tmp/.X11-unix/X{n}"))
    monkeypatch.setenv("DISPLAY", f":{number}")
    sink = WindowSink(main_thread=True)  # opens at the first turn: nothing to raise yet
    with caplog.at_level(logging.WARNING, logger="bridge.transports.window"):
        turns(0.05)
        turns(0.05)
    assert [record.getMessage().startswith("window: cannot open a window: ") for record in caplog.records] == [True]
    assert not sink.running
    sink.send(numbered(1))  # the show goes on
    assert sink.frames_sent == 1
    sink.close()


X_GONE_PEER = r"""
import sys, time
import numpy as np
from bridge.frames import Frame
from bridge.transports.window import WindowSink
sink = WindowSink(title="x gone", width=64, height=48)
for index in range(10):
    sink.send(Frame(np.full((48, 64, 3), index, np.uint8)))
    time.sleep(0.02)
print("up", flush=True)
sys.stdin.readline()  # the test kills the X server, then says go on
for index in range(25):
    sink.send(Frame(np.full((48, 64, 3), index, np.uint8)))
    time.sleep(0.02)
print("running", sink.running, flush=True)
sink.close()
print("closed", flush=True)
"""


def test_the_x_server_going_away_ends_the_preview_not_the_process():
    """Xlib exits the process when its X server goes away (a logout, ssh -X dropped): with a
    window open that took the show and every other sink with it (run in a child: it was exit 1)."""
    from test_cli import REPO, child_env

    process, display = _private_x_server()
    child = None
    try:
        child = subprocess.Popen([sys.executable, "-c", X_GONE_PEER], cwd=REPO, env=dict(child_env(), DISPLAY=display),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "up"
    finally:
        _stop(process)
    child.stdin.write("\n")
    child.stdin.flush()
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert out.split("\n")[:2] == ["running False", "closed"]
    assert "the X display went away; the preview stops, the show goes on" in err
