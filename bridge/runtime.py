"""The running process: one source, one engine, any number of sinks, three threads between them
(capture, inference, output) and one more per sink (its lane: a slow sink holds back only itself).

    runtime = Runtime(engine=engine, open_source=lambda: open_source("testpattern"), sinks=[NullSink()])
    with runtime:                       # start(): opens the source, agrees formats, starts threads
        runtime.wait(timeout=10)        # until stopped, the source ended, or a limit is reached
    # leaving the block stops the threads and closes the source and every sink (within ~2 s)

The engine is anything with `engine(rgb_pixels) -> rgb_pixels` of its `config.width` x
`config.height`, plus `update(**values)` and `set_prompt(prompt, negative_prompt=...)` for the
parameter store; `stats` (frames_skipped, nonfinite_caught) is read when present.

Faults never stop the output: a lost source is reopened (backoff 0.1 s doubling to 0.5 s, so a
source that comes back is picked up within a second) while the sinks get the fallback; a step
that raises costs that frame, is counted in bad_frames and becomes telemetry's last_error (sent
as /sd/status/error); repeated failures roll the engine back to its last working settings
(bridge.recovery).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from . import openmp
from .aspect import ShapeFollower
from .frames import FILTERS, FITS, FrameFormat
from .lanes import SinkLane, close_lanes
from .params import ParameterStore
from .stages import OutputLoop, Shared, capture_loop, current_format, inference_loop
from .telemetry import Telemetry
from .transports.base import Sink, Source, close_quietly, run_main_thread_work

log = logging.getLogger(__name__)

FALLBACKS = ("last", "black", "raw")
JOIN_SECONDS = 1.0  # how long stop() waits for each thread
LANE_SECONDS = 0.5  # how long stop() waits for the sinks' lanes to send what they hold (bridge.lanes)
WAIT_STEP_SECONDS = 0.2  # wait() looks at the stop flag and the duration at least this often


@dataclass(frozen=True)
class RuntimeConfig:
    """How the threads behave; validated on construction (ValueError naming the field)."""

    fps: float = 30.0  # output rate: sinks get a frame at least and at most this often
    fallback: str = "last"  # what sinks get while no new frame comes: "last" frame, "black", or "raw" input
    stall_seconds: float = 0.5  # this long without a new output frame is a stall (the fallback applies)
    reconnect_initial_seconds: float = 0.1  # first wait before reopening a lost source (then doubled)
    reconnect_max_seconds: float = 0.5  # the longest wait between reconnection attempts (a source that
    # comes back is picked up within this plus its opening time: under 1 s for the show-safety promise)
    sink_reopen_seconds: float = 2.0  # a sink whose every send failed this long is opened again (bridge.lanes)
    max_frames: int | None = None  # finish after the engine returned this many frames (None: no limit)
    duration: float | None = None  # finish after this many seconds (None: until stopped)

    def __post_init__(self) -> None:
        def positive(name: str, value, upper: float = math.inf) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= upper:
                raise ValueError(f"{name}: {value!r} must be a number in (0, {upper:g}]")

        positive("fps", self.fps, 1000)
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback: {self.fallback!r} must be one of {', '.join(FALLBACKS)}")
        positive("stall_seconds", self.stall_seconds, 3600)
        positive("reconnect_initial_seconds", self.reconnect_initial_seconds, 60)
        positive("reconnect_max_seconds", self.reconnect_max_seconds, 600)
        positive("sink_reopen_seconds", self.sink_reopen_seconds, 3600)
        if self.max_frames is not None and (not isinstance(self.max_frames, int) or self.max_frames <= 0):
            raise ValueError(f"max_frames: {self.max_frames!r} must be a positive integer")
        if self.duration is not None:
            positive("duration", self.duration)


def agree_formats(engine_format: FrameFormat, sinks: Sequence[Sink]) -> list[FrameFormat | None]:
    """Each sink's accepted format, checked once at join time; logs the conversion each needs."""
    formats = []
    for sink in sinks:
        target = getattr(sink, "format", None)
        if target is not None and not isinstance(target, FrameFormat):
            raise ValueError(f"sink {type(sink).__name__}: format {target!r} is not a FrameFormat")
        fit = getattr(sink, "fit", "letterbox")
        if fit not in FITS:
            raise ValueError(f"sink {type(sink).__name__}: fit {fit!r} must be one of {', '.join(FITS)}")
        scaling = getattr(sink, "filter", "bilinear")
        if scaling not in FILTERS:
            raise ValueError(f"sink {type(sink).__name__}: filter {scaling!r} must be one of {', '.join(FILTERS)}")
        if target is not None and target != engine_format:
            fitted = (f" ({fit}, {scaling})" if (target.width, target.height) != (engine_format.width, engine_format.height)
                      else "")
            log.info("%s: engine %s -> sink %s%s", type(sink).__name__, engine_format, target, fitted)
        formats.append(target)
    return formats


def engine_values(config) -> dict:
    """The engine's settings under their control parameters' names (width and height as
    `resolution`), for the parameter store's applied values."""
    from .params import PARAMETERS

    values = {name: getattr(config, name) for name in PARAMETERS if hasattr(config, name)}
    if hasattr(config, "width") and hasattr(config, "height"):
        values["resolution"] = (config.width, config.height)
    return values


class Runtime:
    """Owns the source it opens and the sinks it is given: `stop()` closes them all."""

    def __init__(
        self,
        *,
        engine,
        open_source: Callable[[], Source] | None,
        sinks: Sequence[Sink],
        config: RuntimeConfig = RuntimeConfig(),
        params: ParameterStore | None = None,
        telemetry: Telemetry | None = None,
        reopen_sinks: Sequence[Callable[[], Sink] | None] | None = None,
        follow_shape: ShapeFollower | None = None,
    ) -> None:
        """`reopen_sinks`: for each sink, how to open it again (by its name) once its sends have
        all failed for a while (bridge.lanes); None or a None entry: never reopened.
        `follow_shape` (--aspect source): the processing size follows the source's shape."""
        engine_config = engine.config
        self.engine_format = FrameFormat(engine_config.width, engine_config.height, "RGB")
        self.config = config
        self.params = params if params is not None else ParameterStore()
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        from .engine import backend_label  # here: bridge.settings imports this module

        self.telemetry.backend = backend_label(engine)
        self._open_source = open_source
        self._reopen_sinks = list(reopen_sinks) if reopen_sinks is not None else [None] * len(sinks)
        if len(self._reopen_sinks) != len(sinks):
            raise ValueError(f"reopen_sinks: {len(self._reopen_sinks)} given for {len(sinks)} sinks")
        self._shared = Shared(
            engine=engine, engine_format=self.engine_format, sinks=list(sinks),
            sink_formats=agree_formats(self.engine_format, sinks), params=self.params,
            telemetry=self.telemetry, config=config, follow_shape=follow_shape,
        )
        self.telemetry.watch_slots([self._shared.input_slot, self._shared.output_slot])
        from .params import empty_lora_slots, lora_values

        # what OSCQuery and status report at first
        lora_scales = tuple(getattr(engine, "lora_scales", ()))
        self.params.report_applied({**engine_values(engine_config), **lora_values(lora_scales)})
        self.params.mark_unavailable(empty_lora_slots(len(lora_scales)))
        self.params.add_listener(self._heard)
        self._threads: list[threading.Thread] = []
        self._started_at: float | None = None
        self._stop_lock = threading.Lock()
        self._stopped = False

    def _heard(self, name: str, value, error: str | None) -> None:
        """Parameter listener: a refused or failed change is the latest error for status out."""
        if error is not None:
            self.telemetry.error(f"parameter {name}={value!r} refused: {error}")

    def start(self) -> None:
        """Open the source (its errors reach the caller) and start the three threads."""
        shared = self._shared
        try:
            source = self._open_source() if self._open_source is not None else None
        except BaseException:
            self.stop()  # the sinks were handed over: release them
            raise
        shared.lanes = [SinkLane(sink, target, self.telemetry, name=f"{index + 1} {type(sink).__name__}", reopen=reopen,
                                 reopen_after=self.config.sink_reopen_seconds)
                        for index, (sink, target, reopen)
                        in enumerate(zip(shared.sinks, shared.sink_formats, self._reopen_sinks))]
        targets = [("inference", inference_loop, (shared,)), ("output", OutputLoop(shared).run, ())]
        if source is not None:
            targets.insert(0, ("capture", capture_loop, (shared, self._open_source, source)))
        for name, target, args in targets:
            thread = threading.Thread(target=target, args=args, name=f"sdbridge {name}", daemon=True)
            self._threads.append(thread)
        self._started_at = time.monotonic()
        self.telemetry.state = "running"
        openmp.release_idle_workers()  # this thread built the engine; the inference thread runs it
        for thread in self._threads:
            thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run finished (stop requested, source ended, frame or time limit);
        True when it has, False when `timeout` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.finished:
                return True
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            step = WAIT_STEP_SECONDS if deadline is None else min(WAIT_STEP_SECONDS, deadline - now)
            if self.config.duration is not None and self._started_at is not None:
                step = min(step, max(0.001, self._started_at + self.config.duration - now))
            if not run_main_thread_work(step):  # (macOS's run loop for Syphon's directory, on the main thread)
                self._shared.finished.wait(step)  # signal handlers still run at once (POSIX)

    @property
    def finished(self) -> bool:
        shared = self._shared
        if shared.stop.is_set() or shared.finished.is_set():
            return True
        duration = self.config.duration
        return duration is not None and self._started_at is not None and time.monotonic() - self._started_at >= duration

    def pause(self) -> None:
        """Hold the output on the last frame and stop running the engine (safe from any thread)."""
        self._shared.paused.set()

    def resume(self) -> None:
        """Process new frames again after `pause` (safe from any thread)."""
        self._shared.paused.clear()

    @property
    def paused(self) -> bool:
        return self._shared.paused.is_set()

    def request_stop(self) -> None:
        """Ask the threads to stop (safe from a signal handler); `stop()` also waits and releases."""
        self._shared.stop.set()

    def stop(self) -> None:
        """Stop the threads and close the source and every sink. Safe to call more than once."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        shared = self._shared
        self.telemetry.state = "stopping"
        shared.stop.set()
        shared.input_slot.close()
        shared.output_slot.close()
        deadline = time.monotonic() + JOIN_SECONDS
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("%s did not stop in time; releasing anyway", thread.name)
        # the frames the lanes still hold go out, then each sink closes (one stuck in a send is left)
        if shared.lanes:
            close_lanes(shared.lanes, LANE_SECONDS, close_quietly)
        else:  # (the source failed to open: no lanes were started)
            for sink in shared.sinks:
                close_quietly(sink)
        self.params.close()
        self.telemetry.state = "stopped"

    def stragglers(self, timeout: float) -> list[str]:
        """After `stop`: wait up to `timeout` seconds more for threads still running (an engine
        call that outlasted stop's wait); the names of those still alive then."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [thread.name for thread in self._threads if thread.is_alive()]

    def snapshot(self) -> dict:
        """The telemetry's figures, `recording`: how many files the sinks are writing now, and
        `size`: the processing size ("704x384"), which /sd/resolution and --aspect source change."""
        size = current_format(self._shared)
        return {**self.telemetry.snapshot(), "recording": sum(lane.recording for lane in self._shared.lanes),
                "size": f"{size.width}x{size.height}"}

    def record_start(self) -> None:
        """Each file sink whose recording was stopped starts a new file (by its name, numbered
        beside the others; safe from any thread, carried out on the sinks' own threads)."""
        for lane in self._shared.lanes:
            lane.record(True)

    def record_stop(self) -> None:
        """Each file sink finishes its file and lets frames go until record_start (safe from
        any thread); the other sinks go on."""
        for lane in self._shared.lanes:
            lane.record(False)

    def sinks_sent(self) -> list[tuple[str, int]]:
        """(name, frames it took) for each sink, in order ("1 FileSink"): what each really got,
        as a slow sink gets fewer than the output sent."""
        return [(lane.name, lane.sent) for lane in self._shared.lanes]

    def recordings(self) -> list[tuple[str, int]]:
        """(path, frames) of each file the sinks wrote, in sink order (bridge.lanes)."""
        return [entry for lane in self._shared.lanes for entry in lane.recordings()]

    def __enter__(self) -> "Runtime":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
