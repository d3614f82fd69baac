"""How much the runtime adds per frame over the engine alone (for `sdbridge bench --runtime`)."""

from __future__ import annotations

import statistics
import time

import numpy as np

from .runtime import Runtime, RuntimeConfig
from .transports.null import NullSink
from .transports.testpattern import TestPatternSource


def _engine_alone_ms(engine, frame: np.ndarray, frames: int) -> list[float]:
    times = []
    for _ in range(frames):
        started = time.perf_counter()
        engine(frame)
        times.append((time.perf_counter() - started) * 1000.0)
    return times


class _Timed:
    """The engine, noting when each call returns (the runtime sees the same API)."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.finished: list[float] = []

    def __call__(self, pixels):
        out = self._engine(pixels)
        self.finished.append(time.perf_counter())
        return out

    def __getattr__(self, name):
        return getattr(self._engine, name)


def measure_runtime_overhead(engine, *, frames: int = 100, warmup: int = 5, input_size: tuple[int, int] = (640, 480),
                             timeout: float = 300.0) -> dict:
    """Run `engine` alone on a test-pattern frame, then testpattern -> runtime -> null with the
    source at twice the engine's rate, and compare the time per processed frame.

    Returns ms figures: engine_ms (median call alone), runtime_frame_ms (median interval between
    processed frames through the runtime), overhead_ms (their difference), runtime_inference_ms
    (median engine call inside the runtime), latency_ms_median / latency_ms_p95 (capture to
    publish), plus frames and fps of each part.
    """
    width, height = input_size
    pattern = TestPatternSource(width=width, height=height, fps=1000)
    frame = pattern.read(timeout=1.0).pixels
    pattern.close()
    _engine_alone_ms(engine, frame, warmup)
    alone = _engine_alone_ms(engine, frame, frames)

    timed = _Timed(engine)
    source_fps = min(1000.0, 2.0 * 1000.0 / max(statistics.median(alone), 1e-3))  # twice what the engine takes
    runtime = Runtime(engine=timed, open_source=lambda: TestPatternSource(width=width, height=height, fps=source_fps),
                      sinks=[NullSink()], config=RuntimeConfig(fps=source_fps, max_frames=frames + warmup))
    with runtime:
        runtime.wait(timeout=timeout)
        snapshot = runtime.snapshot()
    processed_times = timed.finished
    intervals = np.diff(processed_times[warmup:]) * 1000.0 if len(processed_times) > warmup + 1 else np.array([])
    engine_ms = statistics.median(alone)
    runtime_frame_ms = float(np.median(intervals)) if intervals.size else float("nan")
    return {
        "frames": frames,
        "engine_ms": engine_ms,
        "engine_fps": 1000.0 / engine_ms if engine_ms else float("nan"),
        "runtime_frame_ms": runtime_frame_ms,
        "runtime_fps": 1000.0 / runtime_frame_ms if runtime_frame_ms else float("nan"),
        "overhead_ms": runtime_frame_ms - engine_ms,
        "runtime_inference_ms": snapshot["inference_ms_median"],
        "latency_ms_median": snapshot["latency_ms_median"],
        "latency_ms_p95": snapshot["latency_ms_p95"],
        "frames_dropped": snapshot["frames_dropped"],
    }
