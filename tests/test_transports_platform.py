"""Transports whose real peer cannot exist here: the virtual camera (through pyvirtualcam's own
register_backend) and Spout (through a stand-in with SpoutGL's exact API). Plus their
"not available here" errors."""

import sys
import time

import numpy as np
import pytest

import spoutgl_standin
from bridge.frames import Frame, swizzle
from bridge.transports import TransportUnavailable, open_sink, open_source
from bridge.transports.base import SourceLost

pyvirtualcam = pytest.importorskip("pyvirtualcam", reason="pyvirtualcam is not installed: pip install 'sdbridge[virtualcam]'")


class RecordingBackend:
    """A pyvirtualcam backend as its Backend docstring specifies: keyword-only constructor,
    send(1-D C-contiguous uint8), close() called exactly once, device(), native_fourcc()."""

    instances = []

    def __init__(self, *, width, height, fps, fourcc, device, **kw):
        self.width, self.height, self.fps, self.fourcc = width, height, fps, fourcc
        self._device = device or "test camera"
        self.frames, self.closed = [], 0
        RecordingBackend.instances.append(self)

    def send(self, frame):
        assert frame.ndim == 1 and frame.flags["C_CONTIGUOUS"] and frame.dtype == np.uint8
        self.frames.append(frame.reshape(self.height, self.width, 3).copy())

    def close(self):
        self.closed += 1

    def device(self):
        return self._device

    def native_fourcc(self):
        return None


class NoDeviceBackend:
    """Fails the way pyvirtualcam's v4l2loopback backend does on a machine without the module."""

    def __init__(self, **kw):
        raise RuntimeError("No v4l2 loopback device found at /dev/video[0-99]. Did you run 'modprobe v4l2loopback'? "
                           "See also pyvirtualcam's documentation.")


@pytest.fixture
def test_backends(monkeypatch):
    monkeypatch.setattr(pyvirtualcam.camera, "BACKENDS", dict(pyvirtualcam.camera.BACKENDS))
    pyvirtualcam.register_backend("sdbridge-test", RecordingBackend)
    pyvirtualcam.register_backend("no-device", NoDeviceBackend)
    RecordingBackend.instances.clear()


def test_virtualcam_sends_rgb_frames_through_a_registered_backend(test_backends):
    sink = open_sink("virtualcam?backend=sdbridge-test", width=64, height=48, fps=25)
    assert sink.format.pixel_format == "RGB" and sink.backend == "sdbridge-test"
    backend = RecordingBackend.instances[0]
    assert backend.fourcc == pyvirtualcam.util.encode_fourcc(pyvirtualcam.PixelFormat.RGB.value)
    pixels = np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8)
    sink.send(Frame(pixels))
    sink.send(Frame(np.ascontiguousarray(pixels[..., ::-1]), "BGR"))  # converted, not sent as if RGB
    with pytest.raises(ValueError, match="expected 64x48, got 32x48"):
        sink.send(Frame(pixels[:, :32].copy()))
    sink.close()
    sink.close()
    assert len(backend.frames) == 2 and all(np.array_equal(sent, pixels) for sent in backend.frames)
    assert backend.closed == 1  # pyvirtualcam's promise to its backends: close exactly once


def test_virtualcam_without_a_loopback_device_is_one_clear_line(test_backends):
    with pytest.raises(TransportUnavailable) as caught:
        open_sink("virtualcam?backend=no-device", width=64, height=48)
    message = str(caught.value)
    assert "\n" not in message and "modprobe v4l2loopback" in message


def test_virtualcam_unknown_backend_lists_the_available_ones(test_backends):
    with pytest.raises(TransportUnavailable, match="not available.*sdbridge-test"):
        open_sink("virtualcam?backend=nope", width=64, height=48)


def test_virtualcam_without_pyvirtualcam(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)
    with pytest.raises(TransportUnavailable, match="pip install pyvirtualcam"):
        open_sink("virtualcam", width=64, height=48)


@pytest.fixture
def spout(monkeypatch):
    spoutgl_standin.reset()
    monkeypatch.setitem(sys.modules, "SpoutGL", spoutgl_standin)
    yield spoutgl_standin
    assert spoutgl_standin.thread_violations == []
    assert spoutgl_standin.gl_contexts_open == 0


def wait_for(predicate, seconds=3.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    return predicate()


def test_spout_round_trip_bgra_on_one_gl_thread(spout):
    sink = open_sink("spout:sdbridge", width=64, height=32)
    source = open_source("spout:sdbridge")
    pixels = np.zeros((32, 64, 4), np.uint8)
    pixels[..., 2] = 200  # red in BGRA
    pixels[..., 3] = 255
    received = None
    for _ in range(3):  # connect, size, then a frame
        sink.send(Frame(pixels.copy(), "BGRA"))
        received = wait_for(lambda: source.read(timeout=0.05), 1.0) or received
    assert received is not None and received.pixel_format == "BGRA"
    assert np.array_equal(received.pixels, pixels)
    source.close()
    sink.close()
    sink.close()
    assert "sdbridge" not in spout.senders  # released


def _received(sink, source, frame):
    """The first frame `source` gets while `frame` is sent (connect, size, then frames)."""
    received = None
    for _ in range(3):
        sink.send(frame)
        received = wait_for(lambda: source.read(timeout=0.05), 1.0) or received
    return received


def test_spout_sink_sends_any_pixel_format_and_follows_a_size_change(spout):
    """What the runtime's sink gets: the engine's RGB frames, and after /sd/resolution another
    size: in their colours, at their size (no letterbox into the size at start)."""
    sink, source = open_sink("spout:colours", width=8, height=8), open_source("spout:colours")
    assert sink.format is None  # any size and pixel format
    for width, height in ((8, 8), (12, 6)):
        red = np.zeros((height, width, 3), np.uint8)
        red[..., 0] = 255
        received = _received(sink, source, Frame(red, "RGB"))
        assert received is not None and received.pixels.shape == (height, width, 4)
        assert received.pixels[0, 0].tolist() == [0, 0, 255, 255]  # red, as BGRA
    source.close()
    sink.close()


def test_spout_sink_converts_a_repeated_frame_once(spout, monkeypatch):
    """The output repeats its last frame to fill its rate: one conversion (40 ms at 1080p here), not one a send."""
    from bridge.transports import base

    conversions = []  # (WorkerSink, Spout's and Syphon's sending half, converts)
    monkeypatch.setattr(base, "swizzle", lambda *args: conversions.append(1) or swizzle(*args))
    sink = open_sink("spout:repeats", width=8, height=8)
    frame = Frame(np.zeros((8, 8, 3), np.uint8), "RGB")
    for _ in range(3):
        sink.send(frame)
    sink.send(Frame(np.ones((8, 8, 3), np.uint8), "RGB"))
    sink.close()
    assert len(conversions) == 2


def test_a_spout_sender_whose_gl_context_was_lost_is_opened_again(spout):
    """After a GPU driver reset (Windows' TDR, under a diffusion model's load on the same GPU)
    every sendImage fails: the runtime closes the sender and opens a new one of the same name,
    and receivers get pictures again."""
    import functools

    from bridge.runtime import Runtime, RuntimeConfig
    from bridge.transports.testpattern import TestPatternSource
    from test_runtime import StandInEngine

    open_again = functools.partial(open_sink, "spout:after-reset", width=32, height=32)
    runtime = Runtime(engine=StandInEngine(size=32, cost=0.005), open_source=lambda: TestPatternSource(width=32, height=32),
                      sinks=[open_again()], config=RuntimeConfig(fps=30, sink_reopen_seconds=0.3),
                      reopen_sinks=[open_again])

    def frames_published():
        with spoutgl_standin._lock:
            return spoutgl_standin.senders.get("after-reset", {}).get("frame", 0)

    with runtime:
        assert wait_for(lambda: frames_published() >= 5)
        spoutgl_standin.lose_gl_contexts()
        lane = runtime._shared.lanes[0]
        assert wait_for(lambda: lane.reopened == 1, 3.0), "the sender was never opened again"
        assert wait_for(lambda: frames_published() >= 5)  # the new sender's own count
        snapshot = runtime.snapshot()
    assert snapshot["sink_errors"] >= 3
    assert "sink 1 SpoutSink failed for" in snapshot["last_error"] and "opened it again" in snapshot["last_error"]


def test_a_spoutgl_error_is_reported_by_the_sink_and_the_receiver_reopens(spout, monkeypatch):
    """One failing SpoutGL call used to end the worker thread silently: the sink then dropped every
    frame without a word and the source returned nothing forever, never reconnecting."""
    sink, source = open_sink("spout:flaky", width=8, height=8), open_source("spout:flaky")
    frame = Frame(np.full((8, 8, 4), 7, np.uint8), "BGRA")
    assert _received(sink, source, frame) is not None

    def failing(*args, **kwargs):
        raise RuntimeError("simulated SpoutGL failure")

    with monkeypatch.context() as patch:  # the sender fails on one frame, then works again
        patch.setattr(spout.SpoutSender, "sendImage", failing)
        sink.send(frame)
        wait_for(lambda: sink._failed is not None, 1.0)
    with pytest.raises(RuntimeError, match="could not send a frame: RuntimeError: simulated SpoutGL failure"):
        sink.send(frame)
    sent = sink.frames_sent
    sink.send(frame)
    assert wait_for(lambda: sink.frames_sent > sent, 1.0)  # the sender went on

    with monkeypatch.context() as patch:  # the receiver's call fails: its thread ends, read says so
        patch.setattr(spout.SpoutReceiver, "receiveImage", failing)
        with pytest.raises(SourceLost, match="Spout receiver failed: RuntimeError: simulated SpoutGL failure"):
            wait_for(lambda: source.read(timeout=0.05) and False, 1.0)
    source.close()
    with open_source("spout:flaky") as again:  # what the runtime does next
        assert _received(sink, again, frame) is not None
    sink.close()


def test_spout_receiver_follows_a_size_change(spout):
    sink = open_sink("spout:resize", width=32, height=32)
    with open_source("spout:resize") as source:
        sink.send(Frame(np.full((32, 32, 4), 10, np.uint8), "BGRA"))
        assert wait_for(lambda: source.read(timeout=0.05)).pixels.shape == (32, 32, 4)
        sink.close()
        bigger = open_sink("spout:resize", width=48, height=40)
        bigger.send(Frame(np.full((40, 48, 4), 20, np.uint8), "BGRA"))

        def next_big():
            frame = source.read(timeout=0.05)
            if frame is None or frame.pixels.shape != (40, 48, 4):
                bigger.send(Frame(np.full((40, 48, 4), 20, np.uint8), "BGRA"))
                return None
            return frame

        assert wait_for(next_big).pixels[0, 0, 0] == 20
        bigger.close()


def test_spout_sender_name_never_silently_becomes_name_1(spout):
    first = open_sink("spout:sdbridge", width=16, height=16)
    with pytest.raises(TransportUnavailable, match="already exists"):
        open_sink("spout:sdbridge", width=16, height=16)
    first.close()
    again = open_sink("spout:sdbridge", width=16, height=16)  # free again after close: same name
    assert list(spout.senders) == ["sdbridge"]
    again.close()


def test_spout_without_spoutgl_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "SpoutGL", None)
    expected = "Spout is Windows-only" if sys.platform != "win32" else "pip install SpoutGL"
    with pytest.raises(TransportUnavailable, match=expected):
        open_sink("spout:sdbridge", width=16, height=16)
    with pytest.raises(TransportUnavailable, match=expected):
        open_source("spout:TD")
