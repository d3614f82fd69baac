"""The runtime's threads with a stand-in engine (an identity resize with a fixed cost): latency,
source loss, fallbacks, parameters, failures, shutdown. The real engine runs in test_cli.py."""

import statistics
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from bridge import framecode
from bridge.frames import Frame, FrameFormat, resize_nearest
from bridge.runtime import Runtime, RuntimeConfig
from bridge.transports.base import Sink, Source, SourceEnded, SourceLost
from bridge.transports.testpattern import TestPatternSource


class StandInEngine:
    """The engine API the runtime uses: __call__, update, set_prompt, config, stats."""

    def __init__(self, size=128, cost=0.01, fail_every=0):
        self.config = SimpleNamespace(width=size, height=size, mode="img2img", guidance_scale=1.2)
        self.stats = SimpleNamespace(frames_skipped=0, nonfinite_caught=0)
        self.cost, self.fail_every, self.calls = cost, fail_every, 0
        self.updates, self.prompts = [], []

    def __call__(self, pixels):
        self.calls += 1
        time.sleep(self.cost)
        if self.fail_every and self.calls % self.fail_every == 0:
            raise RuntimeError("boom")
        return np.ascontiguousarray(resize_nearest(pixels, self.config.width, self.config.height))

    def update(self, **values):
        if values.get("guidance_scale", 0) > 30:
            raise ValueError(f"guidance_scale: {values['guidance_scale']!r} must be a number in 0..30")
        self.updates.append(values)

    def set_prompt(self, prompt, negative_prompt=None):
        self.prompts.append((prompt, negative_prompt))


class RecordingSink(Sink):
    def __init__(self, format=None):
        self.format = format
        self.sent = []  # (monotonic time, frame)
        self.closed = 0

    def send(self, frame):
        self.sent.append((time.monotonic(), frame))

    def close(self):
        self.closed += 1


def run_for(runtime, seconds):
    with runtime:
        runtime.wait(timeout=seconds)
    return runtime.snapshot()



class HiccupEngine(StandInEngine):
    """A fast engine that stalls once (a long frame: a repeat goes out meanwhile)."""

    def __call__(self, pixels):
        if self.calls == 10:
            time.sleep(0.08)
        return super().__call__(pixels)


def test_a_repeat_never_leaves_later_frames_a_period_late():
    """Source and output both at 30 fps: new frames refill the output's rate budget exactly as
    fast as they use it, so a repeat sent during a one-off stall must not take from that budget;
    when it did, every later frame waited a period for it (40 ms instead of ~6 ms)."""
    engine, sink = HiccupEngine(size=64, cost=0.005), RecordingSink(FrameFormat(64, 64, "RGB"))
    runtime = Runtime(engine=engine, open_source=lambda: TestPatternSource(width=64, height=64, fps=30),
                      sinks=[sink], config=RuntimeConfig(fps=30))
    run_for(runtime, 2.0)
    latencies, seen = [], set()
    for sent_at, frame in sink.sent:
        sequence, time_ms = framecode.decode(frame.pixels)
        if frame.pixels.any() and sequence not in seen:
            seen.add(sequence)
            latencies.append(framecode.elapsed_ms(time_ms, sent_at))
    after_stall = latencies[15:]
    assert len(after_stall) > 20
    print(f"\nafter a one-off stall: latency median {statistics.median(after_stall):.1f} ms (engine 5 ms, period 33 ms)")
    assert statistics.median(after_stall) < 1000 / 30, "new frames are held back a period after a repeat"

def test_latency_measured_from_the_frame_code_in_the_pixels():
    engine, sink = StandInEngine(size=256, cost=0.02), RecordingSink(FrameFormat(256, 256, "BGR"))
    runtime = Runtime(engine=engine, open_source=lambda: TestPatternSource(width=640, height=480, fps=30),
                      sinks=[sink], config=RuntimeConfig(fps=30))
    snapshot = run_for(runtime, 2.0)
    fresh, latencies, seen = [], [], set()
    for sent_at, frame in sink.sent:
        sequence, time_ms = framecode.decode(frame.pixels)
        if frame.pixels.any() and sequence not in seen:  # skip the black frames sent before the first result  # repeats carry an old number
            seen.add(sequence)
            assert sequence == frame.sequence % framecode.MODULUS
            latencies.append(framecode.elapsed_ms(time_ms, sent_at))
            fresh.append(sequence)
    assert len(fresh) > 30 and fresh == sorted(fresh)
    median = statistics.median(latencies)
    print(f"\ncapture-to-publish latency from pixels: median {median:.0f} ms, max {max(latencies):.0f} ms "
          f"(engine {engine.cost * 1000:.0f} ms, input period 33 ms)")
    assert median < engine.cost * 1000 + 33 + 40  # engine time + one input period (+ scheduling slack)
    assert abs(snapshot["latency_ms_median"] - median) < 15  # telemetry agrees with the pixels
    assert sink.closed == 1


class FlakySource(Source):
    """A test pattern that goes away on a schedule: `outages` is a list of (start, end, how) in
    seconds from `t0`; how is "lost" (read raises SourceLost, reopening fails until the end) or
    "stall" (read returns None)."""

    def __init__(self, t0, outages, opened):
        self.t0, self.outages, self.opened = t0, outages, opened
        self.pattern = TestPatternSource(width=160, height=120, fps=30)
        opened.append(time.monotonic())
        if self._outage() == "lost":
            raise SourceLost("still gone")

    def _outage(self):
        now = time.monotonic() - self.t0
        return next((how for start, end, how in self.outages if start <= now < end), None)

    def read(self, timeout=0.1):
        outage = self._outage()
        if outage == "lost":
            raise SourceLost("unplugged")
        if outage == "stall":
            time.sleep(timeout)
            return None
        return self.pattern.read(timeout)

    def close(self):
        self.pattern.close()


def test_source_loss_20_times_output_never_pauses_and_processing_resumes():
    fps = 20.0
    durations = np.geomspace(0.1, 5.0, 20) * 0.04  # 0.1 to 5 s, scaled to 4..200 ms
    outages, start = [], 0.3
    for index, duration in enumerate(durations):
        outages.append((start, start + duration, "lost" if index % 2 else "stall"))
        start += duration + 0.15
    t0, opened = time.monotonic(), []
    engine, sink = StandInEngine(size=64, cost=0.005), RecordingSink()
    config = RuntimeConfig(fps=fps, reconnect_initial_seconds=0.01, reconnect_max_seconds=0.05, stall_seconds=0.2)
    runtime = Runtime(engine=engine, open_source=lambda: FlakySource(t0, outages, opened), sinks=[sink], config=config)
    snapshot = run_for(runtime, start + 0.2 - (time.monotonic() - t0))
    times = np.array([sent_at for sent_at, _ in sink.sent])
    gaps = np.diff(times)
    # at most two periods (a burst of new frames can leave the output's count that far behind; see
    # OutputLoop), plus the scheduling of a loaded machine
    assert gaps.max() <= 2 / fps + 0.02, f"the output paused {gaps.max() * 1000:.0f} ms"
    for (_, end, _), (next_start, _, _) in zip(outages, outages[1:] + [(start, None, None)]):
        fresh = [f for sent_at, f in sink.sent if t0 + end < f.timestamp < t0 + next_start]
        assert fresh, f"no new frame after the outage ending at {end:.2f} s"
    # an outage of a few ms can fall between two reads; the longer ones are all seen
    assert 6 <= snapshot["source_lost"] <= 10 and len(opened) > snapshot["source_lost"]


class SilentReopenSource(Source):
    """Like an NDI or Syphon receiver: it opens at once even while its sender is away, then
    gives nothing until the sender is back (`gone` seconds after the first loss)."""

    def __init__(self, state):
        self.state = state
        self.pattern = TestPatternSource(width=64, height=64, fps=30)

    def read(self, timeout=0.1):
        now = time.monotonic()
        if self.state.get("lost_at") is None and now - self.state["t0"] > 0.3:
            self.state["lost_at"] = now
            raise SourceLost("sender vanished")
        if self.state.get("lost_at") is not None and now - self.state["lost_at"] < self.state["gone"]:
            time.sleep(timeout)
            return None
        return self.pattern.read(timeout)

    def close(self):
        self.pattern.close()


def test_a_reopened_source_is_back_at_its_first_frame_not_at_the_reopen(caplog):
    state = {"t0": time.monotonic(), "gone": 0.8}
    states = []
    config = RuntimeConfig(fps=30, reconnect_initial_seconds=0.01, stall_seconds=0.2)
    runtime = Runtime(engine=StandInEngine(size=64, cost=0.005), open_source=lambda: SilentReopenSource(state),
                      sinks=[RecordingSink()], config=config)
    with caplog.at_level("INFO", logger="bridge"), runtime:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            lost_at = state.get("lost_at")
            if lost_at is not None:
                states.append((time.monotonic() - lost_at, runtime.snapshot()["state"]))
            time.sleep(0.02)
    while_away = [name for since, name in states if 0.1 < since < 0.7]
    after = [name for since, name in states if since > 1.0]
    assert while_away and set(while_away) == {"source lost"}, while_away  # reopened, but nothing came
    assert after and set(after) == {"running"}, after
    messages = [(record.created, record.getMessage()) for record in caplog.records]
    back = [created for created, text in messages if text == "source is back"]
    assert len(back) == 1 and back[0] - state["lost_at"] >= state["gone"] - 0.05, messages
    assert any(text == "source reopened; waiting for its frames" for _, text in messages)


def test_fallback_black_and_raw_when_the_source_stalls():
    for fallback in ("black", "raw"):
        t0 = time.monotonic()
        sink = RecordingSink()
        runtime = Runtime(engine=StandInEngine(size=64, cost=0.005),
                          open_source=lambda: FlakySource(t0, [(0.4, 99, "stall")], []), sinks=[sink],
                          config=RuntimeConfig(fps=30, fallback=fallback, stall_seconds=0.2))
        run_for(runtime, 1.0)
        late = [frame for sent_at, frame in sink.sent if sent_at > t0 + 0.8]
        assert runtime.telemetry.snapshot()["fallback_frames"] > 0
        assert late and all(f.pixels.shape == (64, 64, 3) for f in late)
        if fallback == "black":
            assert all(not f.pixels.any() for f in late)
        else:  # the newest raw input frame, converted to the engine's size
            assert framecode.decode(late[-1].pixels)[0] == late[-1].sequence
            assert late[-1].pixels.any()


def test_the_raw_fallback_fits_the_input_as_the_engine_does():
    """A 160x120 source, an engine at 64x64 fitting its input with letterbox: the raw frames that
    stand in for its output while it stalls are letterboxed too (64x48 between black bars)."""
    t0 = time.monotonic()
    sink = RecordingSink()
    engine = StandInEngine(size=64, cost=0.005)
    engine.config.input_fit = "letterbox"
    runtime = Runtime(engine=engine, open_source=lambda: FlakySource(t0, [(0.4, 99, "stall")], []), sinks=[sink],
                      config=RuntimeConfig(fps=30, fallback="raw", stall_seconds=0.2))
    run_for(runtime, 1.0)
    late = [frame for sent_at, frame in sink.sent if sent_at > t0 + 0.8]
    assert late and all(f.pixels.shape == (64, 64, 3) for f in late)
    assert not late[-1].pixels[:8].any() and not late[-1].pixels[56:].any() and late[-1].pixels[8:56].any()


class ResizingSource(Source):
    """A sender whose resolution changes mid-stream (and whose pixel format is BGRA)."""

    def __init__(self):
        self.count = 0

    def read(self, timeout=0.1):
        time.sleep(0.01)
        self.count += 1
        size = (48, 32) if self.count < 20 else (100, 70)
        return Frame(np.full((size[1], size[0], 4), 100, np.uint8), "BGRA", time.monotonic(), self.count)

    def close(self):
        pass


def test_a_resolution_change_mid_stream_is_converted_not_reloaded():
    engine, sink = StandInEngine(size=64, cost=0.002), RecordingSink()
    runtime = Runtime(engine=engine, open_source=ResizingSource, sinks=[sink], config=RuntimeConfig(fps=30))
    snapshot = run_for(runtime, 0.8)
    assert snapshot["frames_processed"] > 20 and snapshot["bad_frames"] == 0
    assert {f.pixels.shape for _, f in sink.sent} == {(64, 64, 3)}
    assert snapshot["source_lost"] == 0


def test_status_line_shows_the_figures():
    from bridge.telemetry import Telemetry, status_line

    telemetry = Telemetry()
    telemetry.frame_in()
    telemetry.frame_processed(41.0)
    telemetry.frame_out(55.0)
    line = status_line(telemetry.snapshot())
    assert "infer 41/41 ms" in line and "latency 55 ms" in line and "\n" not in line


def test_latency_samples_skip_the_warm_up_and_keep_only_the_recent_window():
    from bridge.telemetry import SAMPLES, Telemetry

    telemetry = Telemetry()
    for ms in (500.0, 400.0, 10.0, 11.0):
        telemetry.frame_out(ms)
    telemetry.frame_out(None)  # a repeat has no latency
    assert telemetry.latency_samples(skip=2) == [10.0, 11.0]
    assert telemetry.latency_samples() == [500.0, 400.0, 10.0, 11.0] and telemetry.latency_samples(skip=9) == []
    for index in range(SAMPLES):  # the warm-up has left the window: nothing more to skip
        telemetry.frame_out(float(index))
    assert telemetry.latency_samples(skip=2) == [float(i) for i in range(SAMPLES)]


def test_parameters_apply_between_frames_newest_wins_and_bad_values_are_reported():
    engine, sink = StandInEngine(size=64, cost=0.01), RecordingSink()
    runtime = Runtime(engine=engine, open_source=lambda: TestPatternSource(width=64, height=64, fps=30),
                      sinks=[sink], config=RuntimeConfig(fps=30))
    results = []
    runtime.params.add_listener(lambda name, value, error: results.append((name, value, error)))
    with runtime:
        runtime.params.set("guidance_scale", 1.5)
        runtime.params.set("guidance_scale", 2.0)  # newest wins
        runtime.params.set("prompt", "neon")
        time.sleep(0.3)
        runtime.params.update({"guidance_scale": 99.0, "delta": 0.5})  # one bad value in a batch
        time.sleep(0.3)
        with pytest.raises(ValueError, match="seed"):
            runtime.params.set("seed", "abc")  # wrong type: refused at once, naming the parameter
        runtime.wait(timeout=0.3)
        processed = runtime.snapshot()["frames_processed"]
    assert {"guidance_scale": 2.0} in engine.updates and {"guidance_scale": 1.5} not in engine.updates
    assert {"delta": 0.5} in engine.updates  # the good value of the refused batch still landed
    assert ("prompt", "neon", None) in results and engine.prompts == [("neon", None)]
    assert any(name == "guidance_scale" and value == 99.0 and "0..30" in error for name, value, error in results if error)
    assert runtime.params.rejected["guidance_scale"][0] == 99.0
    assert processed > 20  # kept running


def test_engine_failures_are_counted_and_the_output_keeps_going():
    engine, sink = StandInEngine(size=64, cost=0.005, fail_every=3), RecordingSink()
    runtime = Runtime(engine=engine, open_source=lambda: TestPatternSource(width=64, height=64, fps=30),
                      sinks=[sink], config=RuntimeConfig(fps=30))
    snapshot = run_for(runtime, 1.0)
    assert snapshot["bad_frames"] >= 5 and snapshot["frames_processed"] >= 10
    assert np.diff([t for t, _ in sink.sent]).max() <= 2 / 30


def test_each_sink_gets_its_own_format_converted_once_per_frame():
    rgb, bgra = RecordingSink(), RecordingSink(FrameFormat(32, 16, "BGRA"))
    runtime = Runtime(engine=StandInEngine(size=64), open_source=lambda: TestPatternSource(width=64, height=64, fps=30),
                      sinks=[rgb, bgra], config=RuntimeConfig(fps=30))
    run_for(runtime, 0.5)
    assert rgb.sent[-1][1].format == FrameFormat(64, 64, "RGB")
    assert bgra.sent[-1][1].format == FrameFormat(32, 16, "BGRA")


class GradientEngine(StandInEngine):
    """Gives the same picture whatever comes in: row r is 4 * r, so what a sink got shows how
    the picture was fitted into it."""

    def __call__(self, pixels):
        self.calls += 1
        time.sleep(self.cost)
        rows = np.arange(self.config.height, dtype=np.uint8)[:, None, None] * 4
        return np.ascontiguousarray(np.broadcast_to(rows, (self.config.height, self.config.width, 3)))


def test_a_sink_of_another_size_gets_the_picture_fitted_as_its_fit_says():
    """virtualcam?size=128x64&fit=crop: a square engine into a 2:1 sink."""
    wide = FrameFormat(128, 64, "RGB")
    sinks = {fit: RecordingSink(wide) for fit in ("letterbox", "crop", "stretch")}
    for fit, sink in sinks.items():
        sink.fit, sink.filter = fit, "nearest"  # (each pixel repeated: exact rows to compare)
    default = RecordingSink(wide)  # a sink that says nothing is letterboxed, smoothly
    smooth = RecordingSink(wide)
    smooth.fit = "crop"
    runtime = Runtime(engine=GradientEngine(size=64, cost=0.005),
                      open_source=lambda: TestPatternSource(width=64, height=64, fps=30),
                      sinks=[*sinks.values(), default, smooth], config=RuntimeConfig(fps=30))
    run_for(runtime, 0.5)
    got = {fit: sink.sent[-1][1].pixels[..., 0].astype(int) for fit, sink in sinks.items()}
    assert all(frame.format == wide for sink in sinks.values() for _, frame in sink.sent[-3:])
    gradient = np.arange(64)[:, None] * 4
    # letterbox: all 64 rows, between black bars left and right
    assert (got["letterbox"][:, :32] == 0).all() and (got["letterbox"][:, 96:] == 0).all()
    assert (got["letterbox"][:, 32:96] == gradient).all()
    # crop: the middle 32 rows (16..47) fill it, each twice
    assert (got["crop"] == np.repeat(np.arange(16, 48) * 4, 2)[:, None]).all()
    # stretch: all 64 rows, each pixel twice across
    assert (got["stretch"] == gradient).all()
    # the default is bilinear: the same letterbox (only columns doubled, rows kept), and a
    # crop's rows enlarged twice lie between their neighbours: 64 different rows, not 32 pairs
    assert np.array_equal(default.sent[-1][1].pixels, sinks["letterbox"].sent[-1][1].pixels)
    rows = smooth.sent[-1][1].pixels[:, :, 0].astype(int)
    assert (rows == rows[:, :1]).all() and rows[0, 0] == 16 * 4 and rows[-1, 0] == 47 * 4
    assert len(np.unique(rows)) == 64 and (np.diff(rows[:, 0]) >= 0).all()


def test_a_sink_with_an_impossible_format_is_an_error_at_start():
    sink = RecordingSink(format="1080p please")
    with pytest.raises(ValueError, match="FrameFormat"):
        Runtime(engine=StandInEngine(), open_source=lambda: TestPatternSource(), sinks=[sink])
    sink = RecordingSink(FrameFormat(64, 64))
    sink.fit = "zoom"
    with pytest.raises(ValueError, match="sink RecordingSink: fit 'zoom' must be one of crop, letterbox, stretch"):
        Runtime(engine=StandInEngine(), open_source=lambda: TestPatternSource(), sinks=[sink])
    sink.fit, sink.filter = "crop", "bicubic"
    with pytest.raises(ValueError, match="sink RecordingSink: filter 'bicubic' must be one of bilinear, nearest"):
        Runtime(engine=StandInEngine(), open_source=lambda: TestPatternSource(), sinks=[sink])


class EndingSource(Source):
    def __init__(self, frames):
        self.frames = frames

    def read(self, timeout=0.1):
        if not self.frames:
            raise SourceEnded("end of clip")
        time.sleep(0.01)
        return Frame(self.frames.pop(0), "RGB", time.monotonic(), 0)

    def close(self):
        pass


def test_runtime_finishes_by_itself_when_the_source_ends_or_the_frame_limit_is_hit():
    frames = [np.full((32, 32, 3), i, np.uint8) for i in range(10)]
    runtime = Runtime(engine=StandInEngine(size=32, cost=0.001), open_source=lambda: EndingSource(frames),
                      sinks=[RecordingSink()], config=RuntimeConfig(fps=30))
    with runtime:
        assert runtime.wait(timeout=5.0)
    assert runtime.snapshot()["frames_processed"] >= 5
    limited = Runtime(engine=StandInEngine(size=32, cost=0.001), open_source=lambda: TestPatternSource(fps=60),
                      sinks=[RecordingSink()], config=RuntimeConfig(fps=60, max_frames=5))
    with limited:
        assert limited.wait(timeout=5.0)
    assert limited.snapshot()["frames_processed"] == 5


def test_stop_is_quick_and_releases_source_and_sinks_even_with_a_slow_engine():
    closed = threading.Event()

    class Pattern(TestPatternSource):
        def close(self):
            closed.set()
            super().close()

    sink = RecordingSink()
    runtime = Runtime(engine=StandInEngine(size=64, cost=0.3), open_source=lambda: Pattern(width=64, height=64),
                      sinks=[sink], config=RuntimeConfig(fps=30))
    runtime.start()
    time.sleep(0.5)
    started = time.monotonic()
    runtime.stop()
    runtime.stop()
    assert time.monotonic() - started < 1.5
    assert closed.is_set() and sink.closed == 1


def test_runtime_config_validation_names_the_field():
    with pytest.raises(ValueError, match="fallback"):
        RuntimeConfig(fallback="grey")
    with pytest.raises(ValueError, match="fps"):
        RuntimeConfig(fps=0)


@pytest.mark.parametrize("overlaps", [{}, {"overlap_decode": True}, {"overlap_decode": True, "overlap_encode": True}])
def test_stream_batch_lag_is_counted_in_the_latency(overlaps):
    """An engine whose output shows the input of n-1 = 2 calls back, like stream batch with 3
    steps, and one call more for each overlap of the VAE (as StreamDiffusion's, test_stream_batch)."""
    lag = 2 + len(overlaps)

    class LaggingEngine(StandInEngine):
        def __init__(self):
            super().__init__(size=64, cost=0.005)
            self.config.t_index_list, self.config.use_denoising_batch = (10, 20, 30), True
            for name, value in overlaps.items():
                setattr(self.config, name, value)
            self.previous = []

        def __call__(self, pixels):
            self.previous.append(super().__call__(pixels))
            return self.previous[-1 - lag] if len(self.previous) > lag else self.previous[0]

    sink = RecordingSink()
    runtime = Runtime(engine=LaggingEngine(), open_source=lambda: TestPatternSource(width=64, height=64, fps=30),
                      sinks=[sink], config=RuntimeConfig(fps=30))
    run_for(runtime, 1.0)
    fresh = [f for _, f in sink.sent if f.pixels.any()]
    assert len(fresh) > 10
    assert all(framecode.decode(f.pixels)[0] == f.sequence for f in fresh)  # metadata matches the picture


class SlowUpdateEngine(StandInEngine):
    """An engine whose settings change takes `update_seconds` (as the compiled backend compiling)."""

    def __init__(self, update_seconds, **kwargs):
        super().__init__(**kwargs)
        self.update_seconds = update_seconds

    def update(self, **values):
        time.sleep(self.update_seconds)
        super().update(**values)


def test_a_slow_settings_change_holds_the_last_frame_not_the_fallback():
    """fallback "black" after 0.2 s of stall, and an update that takes 1.2 s: the sinks keep the last
    frame throughout (a deliberate change is not a stall), the state says "updating", frames resume."""
    engine, sink = SlowUpdateEngine(1.2, size=64, cost=0.01), RecordingSink()
    runtime = Runtime(engine=engine, open_source=lambda: TestPatternSource(width=64, height=64, fps=30), sinks=[sink],
                      config=RuntimeConfig(fps=30, fallback="black", stall_seconds=0.2))
    states = []
    with runtime:
        deadline = time.monotonic() + 10
        while runtime.snapshot()["frames_processed"] < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        fallback_before = runtime.snapshot()["fallback_frames"]  # black frames before the first result count
        runtime.params.set("guidance_scale", 1.5)
        changed_at = time.monotonic()
        while not engine.updates and time.monotonic() < changed_at + 10:
            states.append(runtime.snapshot()["state"])
            time.sleep(0.02)
        processed = runtime.snapshot()["frames_processed"]
        while runtime.snapshot()["frames_processed"] < processed + 5 and time.monotonic() < changed_at + 20:
            time.sleep(0.01)
        snapshot = runtime.snapshot()
    assert engine.updates == [{"guidance_scale": 1.5}]
    during = [frame for sent_at, frame in sink.sent if changed_at + 0.3 < sent_at < changed_at + 1.1]
    assert len(during) >= 15  # the output went on at ~30 fps
    assert all(frame.pixels.any() for frame in during)  # never the black fallback
    assert "updating" in states and snapshot["state"] == "running"
    assert snapshot["fallback_frames"] == fallback_before and snapshot["frames_processed"] >= processed + 5


def test_a_source_that_opens_but_fails_at_once_is_retried_at_the_backoffs_pace():
    """A busy camera or a broken stream: it opens, and its first read fails. Reopened at once, it
    made a busy loop (120,000 opens in 2 s, two log lines each); the backoff applies to it too."""
    opens = []

    class OpensButFails(Source):
        def __init__(self):
            opens.append(time.monotonic())

        def read(self, timeout=0.1):
            raise SourceLost("device busy")

        def close(self):
            pass

    sink = RecordingSink()
    config = RuntimeConfig(fps=30, reconnect_initial_seconds=0.1, reconnect_max_seconds=0.4)
    snapshot = run_for(Runtime(engine=StandInEngine(size=64), open_source=OpensButFails, sinks=[sink], config=config),
                       1.5)
    # waits of 0.1, 0.2, 0.4, 0.4, ... s between opens: about 5 in 1.5 s
    assert 2 <= len(opens) <= 8, f"{len(opens)} opens in 1.5 s"
    assert snapshot["source_lost"] >= len(opens) - 1 and "device busy" in snapshot["last_error"]
    assert len(sink.sent) > 20  # the output went on meanwhile


def test_an_empty_source_frame_is_skipped_as_the_sources_fault_not_the_engines():
    """An empty picture from a transport used to reach the engine, fail there, and after three in
    a row roll back the operator's last setting as if that had broken the engine."""
    class SometimesEmpty(TestPatternSource):
        def read(self, timeout=0.1):
            frame = super().read(timeout)
            if frame is not None and frame.sequence % 2:
                return Frame(np.zeros((0, 64, 3), np.uint8), "RGB", frame.timestamp, frame.sequence)
            return frame

    class ShapeCheckingEngine(StandInEngine):
        def __call__(self, pixels):
            if pixels.size == 0:
                raise ValueError("frame: empty frame")
            return super().__call__(pixels)

    engine = ShapeCheckingEngine(size=64, cost=0.005)
    runtime = Runtime(engine=engine, open_source=lambda: SometimesEmpty(width=64, height=64, fps=60),
                      sinks=[RecordingSink()], config=RuntimeConfig(fps=30))
    with runtime:
        runtime.params.set("guidance_scale", 2.5)
        runtime.wait(timeout=1.0)
    snapshot = runtime.snapshot()
    assert snapshot["frames_processed"] > 10 and snapshot["bad_frames"] == 0
    assert "unusable frame" in snapshot["last_error"] and "empty picture" in snapshot["last_error"]
    assert engine.updates and engine.updates[-1] == {"guidance_scale": 2.5}  # kept, not rolled back


def test_a_source_opened_while_stopping_is_closed_and_the_state_stays_stopped():
    """A reopen that outlasts stop's wait: the capture thread must not report "running" after
    "stopped", and must release what it opened."""
    opened, closed, calls = [], [], []

    class Lost(Source):
        def __init__(self):
            opened.append(self)

        def read(self, timeout=0.1):
            time.sleep(0.02)
            raise SourceLost("unplugged")

        def close(self):
            closed.append(self)

    def open_source():
        calls.append(time.monotonic())
        if len(calls) > 1:
            time.sleep(1.5)  # a camera taking its time
        return Lost()

    runtime = Runtime(engine=StandInEngine(size=64), open_source=open_source, sinks=[RecordingSink()],
                      config=RuntimeConfig(fps=30, reconnect_initial_seconds=0.01))
    runtime.start()
    time.sleep(0.3)
    runtime.stop()
    time.sleep(1.8)
    assert runtime.snapshot()["state"] == "stopped"
    assert len(opened) == 2 and closed == opened


def test_a_failure_outside_the_engine_call_does_not_end_the_inference_thread():
    """Reading the engine's counters fails once (anything between the engine call and the hand
    over): reported, and the frames go on."""

    class FlakyStatsEngine(StandInEngine):
        reads = 0

        @property
        def stats(self):
            FlakyStatsEngine.reads += 1
            if FlakyStatsEngine.reads == 5:
                raise RuntimeError("counters unavailable")
            return SimpleNamespace(frames_skipped=0, nonfinite_caught=0)

        @stats.setter
        def stats(self, value):
            pass

    runtime = Runtime(engine=FlakyStatsEngine(size=64, cost=0.005),
                      open_source=lambda: TestPatternSource(width=64, height=64, fps=60), sinks=[RecordingSink()],
                      config=RuntimeConfig(fps=30))
    snapshot = run_for(runtime, 1.0)
    assert FlakyStatsEngine.reads > 20 and snapshot["frames_processed"] > 20
    assert "counters unavailable" in snapshot["last_error"]


@pytest.mark.parametrize("engine_fps", [17, 20, 25, 45])
def test_the_output_sends_fps_frames_a_second_with_the_engine_slower_or_faster(engine_fps):
    """Repeats fill in for a slow engine up to fps and no further (a repeat 1.25 periods after
    each new frame made 40 a second at 20 engine fps: a recording 33 % longer than the show, and
    none at 25); a fast engine's frames are held to fps."""
    sink = RecordingSink()
    runtime = Runtime(engine=StandInEngine(size=64, cost=1.0 / engine_fps),
                      open_source=lambda: TestPatternSource(width=64, height=64, fps=60), sinks=[sink],
                      config=RuntimeConfig(fps=30))
    run_for(runtime, 2.5)
    times = [sent_at for sent_at, _ in sink.sent]
    times = [t for t in times if t >= times[0] + 0.5]  # after the start
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 28.0 <= rate <= 31.0, f"{rate:.1f} sends a second with the engine at {engine_fps} fps, the output at 30"


def test_a_slow_rollback_holds_the_last_frame_not_the_fallback():
    """Frames fail after a change; the rollback's update takes 1.2 s (a compile): the output holds
    the last frame meanwhile, as for any settings change, instead of the black fallback."""

    class BreaksAboveTwo(StandInEngine):
        def update(self, **values):
            if values.get("guidance_scale", 0) < 2:  # the rollback: slow
                time.sleep(1.2)
            self.config = SimpleNamespace(**{**vars(self.config), **values})  # a new config, as the engine's
            super().update(**values)

        def __call__(self, pixels):
            if self.config.guidance_scale > 2:
                raise RuntimeError("out of memory")
            return super().__call__(pixels)

    engine, sink = BreaksAboveTwo(size=64, cost=0.01), RecordingSink()
    runtime = Runtime(engine=engine, open_source=lambda: TestPatternSource(width=64, height=64, fps=30), sinks=[sink],
                      config=RuntimeConfig(fps=30, fallback="black", stall_seconds=0.2))
    with runtime:
        deadline = time.monotonic() + 10
        while runtime.snapshot()["frames_processed"] < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        runtime.params.set("guidance_scale", 3.0)
        changed_at = time.monotonic()
        while len(engine.updates) < 2 and time.monotonic() < changed_at + 10:
            time.sleep(0.02)
        time.sleep(0.3)
    assert engine.updates == [{"guidance_scale": 3.0}, {"guidance_scale": 1.2}]  # the change, then the rollback
    during = [frame for sent_at, frame in sink.sent if changed_at + 0.3 < sent_at < changed_at + 1.3]
    assert len(during) >= 20 and all(frame.pixels.any() for frame in during)  # never the black fallback


def test_the_status_says_when_a_change_left_the_step_graph_failed():
    """The backend label was made once at start: a capture that failed in a later change still
    showed "compiled+step graph"."""

    class GraphEngine(StandInEngine):
        backend = SimpleNamespace(name="compiled", cuda_graphs="step")
        _graphs = SimpleNamespace(failed=None)

        def update(self, **values):
            self._graphs = SimpleNamespace(failed="RuntimeError: capture failed")
            super().update(**values)

    runtime = Runtime(engine=GraphEngine(size=64), open_source=lambda: TestPatternSource(width=64, height=64, fps=30),
                      sinks=[RecordingSink()], config=RuntimeConfig(fps=30))
    with runtime:
        assert runtime.snapshot()["backend"] == "compiled+step graph"
        runtime.params.set("guidance_scale", 2.0)
        deadline = time.monotonic() + 5
        while "failed" not in runtime.snapshot()["backend"] and time.monotonic() < deadline:
            time.sleep(0.02)
    assert runtime.snapshot()["backend"] == "compiled (step graph failed)"


def test_how_a_source_of_another_aspect_ratio_is_fitted_is_logged_once_per_change(caplog):
    engine = StandInEngine(size=64, cost=0.005)
    engine.config.input_fit = "crop"
    runtime = Runtime(engine=engine, open_source=lambda: TestPatternSource(width=96, height=80, fps=60),
                      sinks=[RecordingSink()], config=RuntimeConfig(fps=30))
    with caplog.at_level("INFO", logger="bridge"), runtime:
        time.sleep(0.5)
        engine.config.input_fit = "letterbox"
        time.sleep(0.5)
    said = [record.getMessage() for record in caplog.records if record.getMessage().startswith("source 96x80")]
    assert said == [
        "source 96x80 into 64x64: its middle 80x80 is used (input_fit crop; /sd/input_fit or --input-fit: crop, "
        "letterbox, stretch)",
        "source 96x80 into 64x64: all of it, as 64x53 between black bars (input_fit letterbox; /sd/input_fit or "
        "--input-fit: crop, letterbox, stretch)",
    ]
