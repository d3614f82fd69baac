"""The three threads of a run: capture, inference, output. Each is a loop over one `Shared` state.

capture:   source.read() -> RGB -> input slot            (reopens a lost source with backoff)
inference: input slot -> parameters -> engine -> output slot
output:    output slot (or the fallback) -> each sink, at most and at least every 1/fps seconds
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .frames import Frame, FrameFormat, convert, swizzle
from .params import ParameterStore, apply_pending
from .ratelimit import RateLimitedLog
from .recovery import EngineGuard, describe
from .slots import LatestSlot
from .telemetry import Telemetry
from .transports.base import Sink, Source, SourceEnded, SourceLost, close_quietly

log = logging.getLogger("bridge.runtime")


@dataclass
class Shared:
    """What the three threads share; every field is either immutable or thread-safe."""

    engine: object
    engine_format: FrameFormat  # what the engine returned at start: its size, RGB (see `current_format`)
    sinks: list[Sink]
    sink_formats: list[FrameFormat | None]  # what each sink accepts (None: anything)
    params: ParameterStore
    telemetry: Telemetry
    config: object  # RuntimeConfig
    input_slot: LatestSlot = field(default_factory=LatestSlot)
    output_slot: LatestSlot = field(default_factory=LatestSlot)
    stop: threading.Event = field(default_factory=threading.Event)
    paused: threading.Event = field(default_factory=threading.Event)  # output holds, engine idle
    # the engine is applying new settings (the compiled backend may compile for a minute): the
    # output holds its last frame meanwhile; a deliberate change is not a stall
    updating: threading.Event = field(default_factory=threading.Event)
    updating_since: float = 0.0  # when the current settings change began (time.monotonic)
    lanes: list = field(default_factory=list)  # a SinkLane per sink, in the sinks' order (bridge.lanes)
    follow_shape: object = None  # --aspect source: a ShapeFollower (bridge.aspect), else None
    source_ended: threading.Event = field(default_factory=threading.Event)
    inference_done: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)


def input_view(engine, default_fit: str = "stretch") -> dict:
    """How `engine` fits, zooms and pans its input (StreamConfig's input_fit, input_zoom,
    input_pan_x and _y), as keyword arguments of `convert`; an engine without them: `default_fit`."""
    config = getattr(engine, "config", None)
    return {"fit": getattr(config, "input_fit", default_fit), "zoom": getattr(config, "input_zoom", 1.0),
            "pan": (getattr(config, "input_pan_x", 0.0), getattr(config, "input_pan_y", 0.0))}


def current_format(shared: Shared) -> FrameFormat:
    """What the engine returns now: its size may change while it runs (/sd/resolution)."""
    config = getattr(shared.engine, "config", None)
    width, height = getattr(config, "width", None), getattr(config, "height", None)
    if (width, height) == (shared.engine_format.width, shared.engine_format.height) or not width or not height:
        return shared.engine_format
    return FrameFormat(width, height, "RGB")


def capture_loop(shared: Shared, open_source: Callable[[], Source], source: Source | None) -> None:
    """Read frames into the input slot until stopped; reconnect with backoff when the source is
    lost. The backoff doubles with each failed open or read and starts again from
    `reconnect_initial_seconds` once a frame has come: a source that opens but fails at once
    (a busy camera, a broken stream) is retried at the backoff's pace, not in a busy loop."""
    config, telemetry = shared.config, shared.telemetry
    backoff = config.reconnect_initial_seconds
    warn = RateLimitedLog(log)
    lost = False  # since a loss, until a frame comes again: an NDI or Syphon source reopens at
    # once while its sender is still away, so "back" is said at its first frame, not at the reopen
    try:
        while not shared.stop.is_set():
            if source is None:
                source = _reopen(open_source, warn)
                if source is not None and shared.stop.is_set():  # stopped while it opened: release it
                    break
                if source is None:
                    shared.stop.wait(backoff)
                    backoff = min(2 * backoff, config.reconnect_max_seconds)
                    continue
                warn.log(logging.INFO, "reopened", "source reopened; waiting for its frames")
            try:
                frame = source.read(timeout=0.05)
            except SourceEnded as exc:
                log.info("%s", exc)
                shared.source_ended.set()
                return
            except Exception as exc:  # SourceLost, or a transport's own bug: both mean reopen
                level = logging.WARNING if isinstance(exc, SourceLost) else logging.ERROR
                warn.log(level, "lost", "source lost: %s; reconnecting", exc, exc_info=not isinstance(exc, SourceLost))
                telemetry.count("source_lost")
                telemetry.error(f"source lost: {describe(exc)}")
                telemetry.state = "source lost"
                lost = True
                close_quietly(source)
                source = None
                shared.stop.wait(backoff)
                backoff = min(2 * backoff, config.reconnect_max_seconds)
                continue
            if frame is not None:
                try:
                    if frame.pixel_format != "RGB":
                        frame = Frame(swizzle(frame.pixels, frame.pixel_format, "RGB"), "RGB", frame.timestamp, frame.sequence)
                    _check_picture(frame)
                except Exception as exc:  # a transport's malformed frame: skip it, keep reading
                    telemetry.error(f"source: unusable frame: {describe(exc)}")
                    warn.warning("unusable", "source gave an unusable frame: %s", describe(exc))
                    continue
                backoff = config.reconnect_initial_seconds
                if lost:
                    lost = False
                    log.info("source is back")
                    if telemetry.state == "source lost":  # not over a pause, a stop or a settings change
                        telemetry.state = "running"
                telemetry.frame_in()
                shared.input_slot.put(frame)
    finally:
        if source is not None:
            close_quietly(source)


def _check_picture(frame: Frame) -> None:
    """ValueError unless `frame` has pixels (a Frame checks its type and channels; an empty one is
    a broken source frame, which must not reach the engine and count as the engine's failure)."""
    if frame.width < 1 or frame.height < 1:
        raise ValueError(f"frame: an empty picture ({frame.width}x{frame.height})")


def _reopen(open_source: Callable[[], Source], warn: RateLimitedLog) -> Source | None:
    try:
        return open_source()
    except Exception as exc:
        warn.warning("reopen", "source not available yet: %s", exc)
        return None


MAX_LAG = 15 + 2  # calls an output may lag its input: 16 denoising steps (the most) lag 15, the VAE overlaps 2


class Origins:
    """Which input frame an output shows. With stream batch the engine's output lags n-1 calls
    (n denoising steps), so its capture time is that of the input n-1 calls back (each overlap of
    the VAE adds one); a frame the similarity filter skipped repeats a picture of the present
    scene and counts as the current input. Keeps latency figures honest."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self._history: deque[Frame] = deque(maxlen=MAX_LAG + 1)

    def lag(self) -> int:
        """Calls between an input and the output that shows it: n-1 with stream batch, and one
        more for each of the VAE's overlaps (`overlap_decode`, `overlap_encode`)."""
        config = getattr(self._engine, "config", None)
        overlaps = int(bool(getattr(config, "overlap_decode", False))) + int(bool(getattr(config, "overlap_encode", False)))
        if not getattr(config, "use_denoising_batch", False):
            return overlaps
        return max(0, len(getattr(config, "t_index_list", ())) - 1) + overlaps

    def origin(self, frame: Frame, skipped: bool) -> Frame:
        if skipped:
            return frame
        self._history.append(frame)
        lag = min(self.lag(), len(self._history) - 1)
        return self._history[-1 - lag]


def inference_loop(shared: Shared) -> None:
    """Run the engine on the newest input frame, applying parameter changes between frames.
    A failing frame is dropped and reported; repeated failures roll the engine back (see recovery).
    Anything else that goes wrong in a pass (a bug, a failing recovery) is reported and the loop
    goes on: the thread ends only when stopped, at the source's end or at the frame limit."""
    inference, warn = _Inference(shared), RateLimitedLog(log)
    try:
        while not shared.stop.is_set():
            try:
                if not inference.step():
                    break
            except Exception as exc:
                shared.telemetry.error(f"inference: {describe(exc)}")
                warn.log(logging.ERROR, "pass", "inference pass failed: %s", describe(exc), exc_info=True)
                shared.stop.wait(0.01)
    finally:
        shared.inference_done.set()


@contextlib.contextmanager
def _holding_output(shared: Shared):
    """Within: the engine's settings change (it may compile for a minute); the output holds its
    last frame meanwhile, not the stall fallback."""
    shared.updating_since = time.monotonic()
    shared.updating.set()
    try:
        yield
    finally:
        shared.updating.clear()


class _Inference:
    """One pass of the inference loop at a time (`step`), and what passes carry between them."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        engine = shared.engine
        self.guard = EngineGuard(engine=engine, telemetry=shared.telemetry, params=shared.params,
                                 holding=lambda: _holding_output(shared))
        self.txt2img = getattr(getattr(engine, "config", None), "mode", "img2img") == "txt2img"
        self.due = 0.0  # txt2img: when the next picture is due (time.monotonic; see `_txt2img_due`)
        self.origins = Origins(engine)
        self.processed = self.skipped_so_far = self.bad_so_far = 0
        self._fit_said: tuple | None = None  # (source shape, processing size, fit) last logged by _say_fit
        from .engine import backend_label  # here, as in runtime.py: bridge.settings imports the runtime

        self.backend_label = backend_label

    def _say_fit(self, shape: tuple, size: FrameFormat, engine) -> None:
        """Log once per source size, processing size and fit how a source of another aspect ratio
        is fitted: an operator sees at once why its edges are gone, or bars came."""
        fit = getattr(getattr(engine, "config", None), "input_fit", None)
        key = (shape[:2], (size.width, size.height), fit)
        if fit is None or key == self._fit_said:
            return
        self._fit_said = key
        height, width = shape[:2]
        if width * size.height == height * size.width:
            return
        from pipeline.frames import fit_boxes

        (_, _, taken_width, taken_height), (_, _, placed_width, placed_height) = fit_boxes(
            width, height, size.width, size.height, fit)  # (before a zoom: what the fit itself does)
        what = {"crop": f"its middle {taken_width}x{taken_height} is used",
                "letterbox": f"all of it, as {placed_width}x{placed_height} between black bars",
                "stretch": "all of it, stretched"}[fit]
        log.info("source %dx%d into %dx%d: %s (input_fit %s; /sd/input_fit or --input-fit: crop, letterbox, "
                 "stretch)", width, height, size.width, size.height, what, fit)

    def _follow_shape(self, frame: Frame, size: FrameFormat) -> None:
        """--aspect source: a source whose new shape has settled asks for a processing size of
        that shape, through the parameter store as /sd/resolution does (from the next frame on;
        this one is fitted as any other)."""
        follower = self.shared.follow_shape
        if follower is None:
            return
        wanted = follower.observe(frame.width, frame.height, time.monotonic(), (size.width, size.height))
        if wanted is not None:
            log.info("source is now %dx%d: processing at %dx%d, its shape (--aspect source)", frame.width,
                     frame.height, *wanted)
            self.shared.params.set("resolution", wanted)

    def _txt2img_due(self) -> bool:
        """txt2img: whether a picture is due now (at most the output's fps of them: with no input to
        wait for, the engine would otherwise make pictures as fast as it can, most of them never
        sent); else wait a little (at most 50 ms, so parameters still apply between waits)."""
        now, period = time.monotonic(), 1.0 / self.shared.config.fps
        if now < self.due:
            self.shared.stop.wait(min(self.due - now, 0.05))
            return False
        self.due = max(self.due + period, now)  # an engine slower than fps: the next one at once
        return True

    def step(self) -> bool:
        """Parameters, then one frame through the engine into the output slot; False when done."""
        shared = self.shared
        engine, telemetry, config, guard = shared.engine, shared.telemetry, shared.config, self.guard
        # 1. parameters, between frames (only a real change holds the output: see OutputLoop)
        changing = shared.params.has_pending
        with _holding_output(shared) if changing else contextlib.nullcontext():
            try:
                apply_pending(shared.params, engine)
            except Exception as exc:  # never expected (apply_pending reports its own failures): keep running
                telemetry.error(f"parameters: {describe(exc)}")
                log.exception("applying parameters failed")
        if changing:  # a change may have captured a graph, or failed to: the status says what runs now
            telemetry.backend = self.backend_label(engine)
        if shared.paused.is_set():  # paused: inputs are dropped, the output holds its last frame
            if telemetry.state == "running":
                telemetry.state = "paused"
            shared.input_slot.take(timeout=0.05)
            return True
        if telemetry.state == "paused":
            telemetry.state = "running"
        size = current_format(shared)  # after the parameters: a new size applies from this frame
        expected_shape = (size.height, size.width, 3)
        if self.txt2img:  # 2. the input frame (txt2img has none: its pictures are paced to the output's fps)
            if not self._txt2img_due():
                return True
            telemetry.frame_in()  # a picture asked for: txt2img's "in" (the status's fps, not a stuck 0)
            frame = Frame(np.zeros(expected_shape, np.uint8), "RGB", time.monotonic(), self.processed)
        else:
            frame = shared.input_slot.take(timeout=0.05)
        if frame is None:
            return not (shared.source_ended.is_set() and not shared.input_slot.pending)
        if not self.txt2img:
            self._follow_shape(frame, size)
            self._say_fit(frame.pixels.shape, size, engine)
        started = time.perf_counter()
        try:  # 3. the engine
            pixels = engine.txt2img() if self.txt2img else engine(frame.pixels)
        except Exception as exc:  # torch.OutOfMemoryError included: this frame only
            guard.failed("step failed", exc)
            return True
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        if not isinstance(pixels, np.ndarray) or pixels.shape != expected_shape or pixels.dtype != np.uint8:
            guard.failed(f"returned {getattr(pixels, 'shape', type(pixels).__name__)}, expected uint8 {expected_shape}")
            return True
        telemetry.frame_processed(elapsed_ms)  # 4. figures (one read of the engine's counters), then hand over
        stats = getattr(engine, "stats", None)
        skipped = getattr(stats, "frames_skipped", 0)
        bad = getattr(stats, "bad_caught", getattr(stats, "nonfinite_caught", 0))
        if stats is not None:
            telemetry.engine_stats(skipped, bad)
        if bad > self.bad_so_far:  # the engine put its last good output out instead of this one
            guard.bad_output()
        elif skipped == self.skipped_so_far:  # a frame the similarity filter skipped proves no configuration
            guard.good_frame()
        self.bad_so_far = bad
        origin = self.origins.origin(frame, skipped=skipped > self.skipped_so_far)
        self.skipped_so_far = skipped
        shared.output_slot.put(Frame(pixels, "RGB", origin.timestamp, origin.sequence))
        self.processed += 1
        return config.max_frames is None or self.processed < config.max_frames


class OutputLoop:
    """Sends to every sink: a new frame as soon as it comes, and a repeat of the last one (or the
    fallback) when the output's clock is owed one: fps a second on average, whatever the
    engine's rate, without delaying frames that arrive on time.
    - New frames take from a token bucket (refilled at fps, BURST deep): at most fps of them.
    - The clock's count (`_owed`) gains one each period and loses one at each send, new or
      repeated (within -BURST..BURST); a repeat goes out when it reaches REPEAT_OWED, at least
      a period after the last send, or after MAX_GAP periods without a send once it reaches
      GAP_OWED. With no new frames that is one repeat each period; with the engine slower than
      fps the repeats fill the difference; over time the count stays within its bounds, so the
      sends are fps. A gap is at most two periods (the count as far behind as a burst leaves it).
    After `stall_seconds` without a new frame, the repeats are the configured fallback.

    Why repeats take no token: with the source at the output's own rate, the bucket refills
    exactly as fast as new frames use it, so one token spent on a repeat (a late frame, a pause)
    was never won back, and every later frame waited for it: capture-to-publish latency stayed a
    period too long for the rest of the run (seen: 40 ms with a 5 ms engine at 30 fps, instead
    of 6). Why a repeat waits for 1.25 owed sends, not 1: with the engine at the output's rate,
    one due exactly a period after a new frame would go out just before each next one whenever
    the engine's time or jitter delays it. Why the count, not a fixed wait of 1.25 periods after
    each new frame (before): with the engine at 20 fps and the output at 30 that made 40 sends a
    second (a recording 33 % longer than the show), and at 25 fps no repeats at all (25 a second).
    Why the gap rule waits for the count too: a repeat at MAX_GAP periods whatever the count
    would go out before every new frame of an engine at that rate (17 fps: 34 sends a second)."""

    BURST = 2.0  # sends allowed back to back (a repeat followed at once by a new frame)
    REPEAT_OWED = 1.25  # sends the clock must be owed before a repeat goes out
    MAX_GAP, GAP_OWED = 1.75, 0.0  # or: this many periods without a send, and the clock owed this many

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.period = 1.0 / shared.config.fps
        self._black = Frame(np.zeros((shared.engine_format.height, shared.engine_format.width, 3), np.uint8))
        self.last_frame: Frame | None = None
        self.last_fresh_time = time.monotonic()  # when the newest fresh frame was sent
        self.last_send_time = -1e9
        self._tokens = self.BURST
        self._tokens_time = time.monotonic()
        self._owed = self.REPEAT_OWED  # sends the output's clock is owed (see the class docstring)
        self._owed_time = self._tokens_time
        self._warn = RateLimitedLog(log)

    def run(self) -> None:
        shared = self.shared
        try:
            while not shared.stop.is_set():
                if shared.inference_done.is_set() and not shared.output_slot.pending:
                    break
                try:
                    self._step()
                except Exception as exc:  # a bug here must not end the output: report, go on
                    shared.telemetry.error(f"output: {describe(exc)}")
                    self._warn.warning("step", "output step failed: %s", describe(exc))
                    shared.stop.wait(self.period / 4)
        finally:
            shared.finished.set()

    def _step(self) -> None:
        """Send the new frame when one comes within the frame period, else repeat one."""
        shared = self.shared
        now = time.monotonic()
        owed, period = self._clock(now), self.period
        repeat_at = max(self.last_send_time + period, min(
            now + (self.REPEAT_OWED - owed) * period,  # the clock is owed a send
            max(self.last_send_time + self.MAX_GAP * period, now + (self.GAP_OWED - owed) * period)))  # a long gap
        frame = shared.output_slot.take(timeout=min(0.05, max(0.0, repeat_at - now)))
        if frame is not None:
            self._wait_for_token()
            self.last_frame, self.last_fresh_time = frame, time.monotonic()
            if shared.telemetry.state in ("stalled", "updating"):
                shared.telemetry.state = "running"
            self._publish(frame, fresh=True)
        elif time.monotonic() >= repeat_at:  # the clock is owed a send: no token needed
            self._publish(self._repeat_frame(), fresh=False)

    def _clock(self, now: float) -> float:
        """The sends the output's clock is owed at `now` (one more each period, at most BURST)."""
        self._owed = min(self.BURST, self._owed + (now - self._owed_time) / self.period)
        self._owed_time = now
        return self._owed

    def _wait_for_token(self) -> bool:
        """Take one send from the bucket, waiting (interruptibly) until there is one; True if it waited."""
        now = time.monotonic()
        self._tokens = min(self.BURST, self._tokens + (now - self._tokens_time) / self.period)
        self._tokens_time = now
        waited = self._tokens < 1.0
        if waited:
            self.shared.stop.wait((1.0 - self._tokens) * self.period)
            self._tokens, self._tokens_time = 1.0, time.monotonic()
        self._tokens -= 1.0
        return waited

    def _repeat_frame(self) -> Frame:
        if self.shared.paused.is_set() and self.last_frame is not None:
            self.last_fresh_time = time.monotonic()  # a pause is not a stall
            return self.last_frame
        if self.shared.updating.is_set() and self.last_frame is not None:
            now = time.monotonic()
            self.last_fresh_time = now  # nor is a change of settings
            if now - self.shared.updating_since > self.shared.config.stall_seconds and self.shared.telemetry.state == "running":
                self.shared.telemetry.state = "updating"  # long enough to say so in the status
            return self.last_frame
        stalled = time.monotonic() - self.last_fresh_time > self.shared.config.stall_seconds
        mode = self.shared.config.fallback
        if not stalled and self.last_frame is not None:
            return self.last_frame
        if mode == "raw":
            raw = self.shared.input_slot.peek()
            if raw is not None:  # fitted, zoomed and panned as the engine does its input
                return convert(raw, current_format(self.shared), **input_view(self.shared.engine))
        if mode == "last" and self.last_frame is not None:
            return self.last_frame
        return self.black

    @property
    def black(self) -> Frame:
        """A black frame of the engine's current size."""
        size = current_format(self.shared)
        if self._black.format != size:
            self._black = Frame(np.zeros((size.height, size.width, 3), np.uint8))
        return self._black

    def _publish(self, frame: Frame, fresh: bool) -> None:
        now = time.monotonic()
        self.last_send_time = now
        self._owed = max(-self.BURST, self._clock(now) - 1.0)
        for lane in self.shared.lanes:  # each sends on its own thread: a slow sink holds back only itself
            lane.offer(frame)
            lane.check(now)
        latency_ms = (now - frame.timestamp) * 1000.0 if fresh else None
        stalled = not fresh and now - self.last_fresh_time > self.shared.config.stall_seconds
        if stalled and self.shared.telemetry.state == "running":
            self.shared.telemetry.state = "stalled"
        self.shared.telemetry.frame_out(latency_ms, fallback=stalled)
