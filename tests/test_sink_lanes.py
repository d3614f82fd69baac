"""Each sink sends on a thread of its own (bridge.lanes): one slow or stuck in `send` (a
recording falling behind, a file on a drive that stopped answering, a driver in a long call)
holds back only itself, never the picture on the other sinks."""

import threading
import time

import numpy as np
import pytest

from bridge.frames import Frame, FrameFormat
from bridge.lanes import QUEUE, SinkLane, close_lanes
from bridge.runtime import Runtime, RuntimeConfig
from bridge.telemetry import Telemetry, status_line
from bridge.transports.base import Sink
from bridge.transports.testpattern import TestPatternSource
from test_runtime import RecordingSink, StandInEngine

FPS = 30


class StuckSink(Sink):
    """Like a file sink on a drive that stopped answering: its `stuck_at`-th send waits until
    `release` is set (10 s at most); `send` and `close` share a lock, as the real sinks' do, so
    closing it waits for the stuck send."""

    def __init__(self, stuck_at=3):
        self.stuck_at, self.calls, self.closed = stuck_at, 0, 0
        self.release, self.stuck = threading.Event(), threading.Event()
        self._lock = threading.Lock()

    def send(self, frame):
        with self._lock:
            self.calls += 1
            if self.calls == self.stuck_at:
                self.stuck.set()
                self.release.wait(10.0)

    def close(self):
        with self._lock:
            self.closed += 1


class SlowSink(RecordingSink):
    """An encoder that needs `cost` seconds a frame, more than the output's period."""

    def __init__(self, cost):
        super().__init__()
        self.cost = cost

    def send(self, frame):
        time.sleep(self.cost)
        super().send(frame)


def runtime_with(*sinks, engine_size=64):
    return Runtime(engine=StandInEngine(size=engine_size, cost=0.005),
                   open_source=lambda: TestPatternSource(width=64, height=64, fps=FPS),
                   sinks=list(sinks), config=RuntimeConfig(fps=FPS))


def test_a_sink_stuck_in_a_send_holds_back_only_itself():
    stuck, other = StuckSink(), RecordingSink()
    runtime = runtime_with(stuck, other)
    try:
        runtime.start()
        assert stuck.stuck.wait(5.0), "the stuck sink never got its third frame"
        stuck_since = time.monotonic()
        runtime.wait(timeout=3.0)
        snapshot = runtime.snapshot()
        started_stop = time.monotonic()
        runtime.stop()
        stop_seconds = time.monotonic() - started_stop
    finally:
        stuck.release.set()
    during = np.array([at for at, _ in other.sent if at > stuck_since + 0.1])
    # the other sink went on at the output's rate all along: 3 s at 30 fps is 90 sends
    assert len(during) >= 2 * FPS, f"the other sink got {len(during)} frames in 3 s while one sink was stuck"
    assert np.diff(during).max() < 0.25, "the other sink's frames paused while one sink was stuck"
    assert snapshot["sink_missed"] > 0 and snapshot["sink_errors"] == 0
    assert "sink 1 StuckSink has been in one send for 2.0 s; the other sinks go on" in snapshot["last_error"]
    # stop did not wait for the stuck send: the other sink is closed, the stuck one left as it was
    assert stop_seconds < 2.0 and other.closed == 1
    assert stuck.closed == 0
    # once the drive answers again, its send returns and the sink is closed after all
    deadline = time.monotonic() + 5.0
    while stuck.closed == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stuck.closed == 1


def test_a_slow_sink_gets_fewer_frames_in_order_and_the_others_all_of_them():
    slow, other = SlowSink(cost=0.1), RecordingSink()
    runtime = runtime_with(slow, other)
    with runtime:
        runtime.wait(timeout=2.5)
    snapshot = runtime.snapshot()
    assert len(other.sent) >= 2 * FPS, f"{len(other.sent)} frames in 2.5 s at {FPS} fps"
    # the slow sink sends at its own pace (10 a second), the newest frames, in order
    assert 10 <= len(slow.sent) <= 30
    stamps = [frame.timestamp for _, frame in slow.sent]
    assert stamps == sorted(stamps)
    assert snapshot["sink_missed"] >= 20 and f"sink errors 0 missed {snapshot['sink_missed']}" in status_line(snapshot)


def test_a_lane_sends_what_it_holds_before_it_closes():
    """A run that ends (--frames, --duration, Ctrl+C) still gives each sink its last frames:
    the lanes drain before their sinks close."""
    telemetry = Telemetry()
    sink = SlowSink(cost=0.05)
    lane = SinkLane(sink, None, telemetry)
    frames = [Frame(np.full((4, 4, 3), value, np.uint8), sequence=value) for value in range(QUEUE + 2)]
    for frame in frames:
        lane.offer(frame)  # the first is taken at once; of the rest, the oldest makes room
    closed = []
    assert close_lanes([lane], 2.0, closed.append) == []
    sequences = [frame.sequence for _, frame in sink.sent]
    assert sequences[-QUEUE:] == [f.sequence for f in frames[-QUEUE:]] and sequences == sorted(sequences)
    assert closed == [sink] and telemetry.snapshot()["sink_missed"] == len(frames) - len(sequences)
    lane.offer(frames[0])  # after closing: ignored
    assert len(sink.sent) == len(sequences)


def test_a_lane_converts_for_its_sink_once_per_frame_and_counts_failures():
    """A sink of its own size gets each frame fitted (as its fit and filter say), a repeat of the
    same frame converted once; a send that raises is counted and the lane goes on."""
    telemetry = Telemetry()

    class Flaky(RecordingSink):
        def send(self, frame):
            super().send(frame)
            if len(self.sent) == 2:
                raise OSError("the device went away for a moment")

    sink = Flaky(FrameFormat(32, 16, "BGRA"))
    sink.fit, sink.filter = "crop", "nearest"
    lane = SinkLane(sink, sink.format, telemetry)
    frame = Frame(np.arange(16, dtype=np.uint8)[:, None, None].repeat(16, 1).repeat(3, 2) * 16)
    for _ in range(3):
        lane.offer(frame)
        time.sleep(0.05)
    close_lanes([lane], 2.0, lambda sink: None)
    got = [sent for _, sent in sink.sent]
    assert len(got) == 3 and got[0] is got[1] is got[2]  # converted once
    assert got[0].format == FrameFormat(32, 16, "BGRA")
    assert got[0].pixels[:, 0, 0].tolist() == [v * 16 for v in range(4, 12) for _ in range(2)]  # rows 4..11, twice
    assert telemetry.snapshot()["sink_errors"] == 1


def test_closing_drains_every_lane_side_by_side_and_names_the_stuck_sink():
    """One sink stuck in a send does not use up the others' time to send what they hold."""
    telemetry = Telemetry()
    stuck, slow = StuckSink(stuck_at=1), SlowSink(cost=0.1)
    lanes = [SinkLane(stuck, None, telemetry, name="1 StuckSink"), SinkLane(slow, None, telemetry, name="2 SlowSink")]
    frame = Frame(np.zeros((4, 4, 3), np.uint8))
    try:
        for lane in lanes:
            lane.offer(frame)
        assert stuck.stuck.wait(2.0)
        for _ in range(QUEUE - 1):
            lanes[1].offer(Frame(np.zeros((4, 4, 3), np.uint8)))
        closed = []

        def close(sink):
            sink.close()  # (the stuck one's waits for its send, as a real sink's does)
            closed.append(sink)

        started = time.monotonic()
        assert close_lanes(lanes, 0.5, close) == ["1 StuckSink"]
        assert time.monotonic() - started < 1.0
        assert len(slow.sent) == QUEUE and closed == [slow]  # 0.3 s of sends, all within the 0.5 s
    finally:
        stuck.release.set()


class BrokenAfter(RecordingSink):
    """Like a Spout sender after a GPU driver reset took its GL context: every send from the
    `broken_at`-th on raises, until a new sink is opened."""

    def __init__(self, broken_at=None, format=None):
        super().__init__(format)
        self.broken_at = broken_at

    def send(self, frame):
        if self.broken_at is not None and len(self.sent) >= self.broken_at:
            raise RuntimeError("Spout sender stopped: the OpenGL context was lost")
        super().send(frame)


def offer_for(lane, seconds, rate=100):
    """Offer a new 4x4 frame `rate` times a second for `seconds` (bounded)."""
    for index in range(int(seconds * rate)):
        lane.offer(Frame(np.full((4, 4, 3), index % 256, np.uint8), sequence=index))
        time.sleep(1.0 / rate)


def test_a_sink_whose_sends_all_fail_is_opened_again_by_its_name(caplog):
    telemetry = Telemetry()
    broken = BrokenAfter(broken_at=5)
    opened = []

    def reopen():
        opened.append(BrokenAfter())
        return opened[-1]

    lane = SinkLane(broken, None, telemetry, name="1 SpoutSink", reopen=reopen, reopen_after=0.3)
    offer_for(lane, 1.2)
    close_lanes([lane], 1.0, lambda sink: sink.close())
    assert len(broken.sent) == 5 and broken.closed == 1  # the broken one closed when replaced
    assert len(opened) == 1 and len(opened[0].sent) >= 30 and opened[0].closed == 1  # the new one took the rest
    snapshot = telemetry.snapshot()
    assert 10 <= snapshot["sink_errors"] <= 60 and lane.reopened == 1  # about 0.3 s of failed sends at 100 a second
    assert snapshot["last_error"].startswith("sink 1 SpoutSink failed for 0.3 s: opened it again")
    assert "sink 1 SpoutSink failed: RuntimeError: Spout sender stopped" in caplog.text  # what failed, logged


def test_a_sink_that_cannot_be_opened_again_is_tried_with_backoff(caplog):
    telemetry = Telemetry()
    tries = []

    def reopen():  # the driver is still away twice, then back
        tries.append(time.monotonic())
        if len(tries) < 3:
            raise OSError("no such device")
        return RecordingSink()

    lane = SinkLane(BrokenAfter(broken_at=0), None, telemetry, name="1 VirtualCamSink", reopen=reopen,
                    reopen_after=0.1, backoff=(0.2, 0.4))
    offer_for(lane, 1.5)
    close_lanes([lane], 1.0, lambda sink: sink.close())
    assert len(tries) == 3 and lane.reopened == 1 and len(lane.sink.sent) >= 20
    gaps = np.diff(tries)
    assert 0.18 <= gaps[0] < 0.35 and 0.38 <= gaps[1] < 0.6  # the backoff doubled
    assert "could not be opened again (OSError: no such device); next try in 0.2 s" in caplog.text
    assert "could not be opened again (OSError: no such device); next try in 0.4 s" in caplog.text
    assert telemetry.snapshot()["last_error"].endswith("s: opened it again")


def test_a_runtime_reopens_a_failing_sink_while_the_others_go_on():
    broken, other, replacements = BrokenAfter(broken_at=3), RecordingSink(), []

    def reopen():
        replacements.append(RecordingSink())
        return replacements[-1]

    runtime = Runtime(engine=StandInEngine(size=64, cost=0.005),
                      open_source=lambda: TestPatternSource(width=64, height=64, fps=FPS),
                      sinks=[broken, other], config=RuntimeConfig(fps=FPS, sink_reopen_seconds=0.3),
                      reopen_sinks=[reopen, None])
    with runtime:
        runtime.wait(timeout=2.0)
    assert len(replacements) == 1 and len(replacements[0].sent) >= FPS  # the rest of the 2 s
    assert len(other.sent) >= 40 and broken.closed == 1 and replacements[0].closed == 1
    with pytest.raises(ValueError, match="reopen_sinks: 1 given for 2 sinks"):
        Runtime(engine=StandInEngine(), open_source=None, sinks=[broken, other], reopen_sinks=[None])


def test_only_sinks_that_can_be_opened_again_safely_are():
    """A window the user closed stays closed; a file (a PNG sequence too) opens again beside the
    recording, never over it."""
    from bridge.session import sink_reopeners

    specs = ["file:show.mp4?overwrite=1", "virtualcam?size=1280x720", "ndi:sdbridge", "spout:out", "syphon:out",
             "window", "null", "file:frames/%05d.png"]
    reopeners = sink_reopeners(specs, width=64, height=48, fps=25.0)
    assert [reopen is not None for reopen in reopeners] == [True, True, True, True, True, False, False, True]
    assert reopeners[2].args == ("ndi:sdbridge",)
    assert reopeners[2].keywords == {"width": 64, "height": 48, "fps": 25.0, "keep_existing": True}


class SplitFile(RecordingSink):
    """What a lane sees of a file sink with split=SECONDS: a path, a frame count, the split."""

    def __init__(self, path, split_seconds):
        super().__init__()
        self.path, self.split_seconds = path, split_seconds

    @property
    def frames_written(self):
        return len(self.sent)


def test_a_split_whose_next_file_cannot_be_opened_is_retried_as_a_failure(caplog):
    """The disk is full when a split is due: the lane neither stops recording for good nor
    stalls; the sends fail (counted) and the file is tried again with backoff, then records."""
    telemetry = Telemetry()
    tries = []

    def reopen():  # the next file: refused twice (a full disk), then opened
        tries.append(time.monotonic())
        if len(tries) <= 2:
            raise OSError("[Errno 28] No space left on device")
        return SplitFile(f"show-{len(tries)}.mp4", split_seconds=60)

    lane = SinkLane(SplitFile("show.mp4", split_seconds=0.3), None, telemetry, name="1 FileSink", reopen=reopen,
                    reopen_after=0.1, backoff=(0.2, 0.4))
    offer_for(lane, 1.6)
    close_lanes([lane], 1.0, lambda sink: sink.close())
    recordings = lane.recordings()
    assert [path for path, _ in recordings] == ["show.mp4", "show-3.mp4"] and len(tries) == 3, (recordings, tries)
    assert recordings[0][1] >= 20 and recordings[1][1] >= 20 and lane.recording
    assert telemetry.snapshot()["sink_errors"] > 0
    assert "could not start recording: OSError: [Errno 28] No space left on device" in caplog.text
