"""How much the runtime adds per frame over the engine alone (for `sdbridge bench --runtime`).

The two are measured in alternating rounds (engine alone, then through the runtime, then alone
again ...), so that a change in the host's load during the run affects both sides alike; the
figures are medians over every round. Where psutil is installed, the CPU time each runtime
thread used per processed frame is reported too: on a CPU engine that is where the overhead
goes, since those threads share the cores with torch's own.
"""

from __future__ import annotations

import statistics
import threading
import time

import numpy as np

from .runtime import Runtime, RuntimeConfig
from .stages import Origins
from .transports.null import NullSink
from .transports.testpattern import TestPatternSource


def _engine_alone_ms(engine, frame: np.ndarray, frames: int) -> list[float]:
    times = []
    for _ in range(frames):
        started = time.perf_counter()
        engine(frame)
        times.append((time.perf_counter() - started) * 1000.0)
    return times


def _thread_cpu_seconds() -> dict[str, float] | None:
    """CPU seconds used so far by each named thread of this process (None without psutil)."""
    try:
        import psutil
    except ImportError:
        return None
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    return {names[t.id]: t.user_time + t.system_time for t in psutil.Process().threads() if t.id in names}


class _Timed:
    """The engine, noting when each call returns (the runtime sees the same API); after the
    `start`-th and the `end`-th call it reads the threads' CPU times (from the inference thread
    itself, while every thread of the run is alive)."""

    def __init__(self, engine, start: int, end: int) -> None:
        self._engine = engine
        self._start, self._end = start, end
        self.started: list[float] = []
        self.finished: list[float] = []
        self.cpu_at_start: dict[str, float] | None = None
        self.cpu_at_end: dict[str, float] | None = None

    def __call__(self, pixels):
        self.started.append(time.perf_counter())
        out = self._engine(pixels)
        self.finished.append(time.perf_counter())
        if len(self.finished) == self._start:
            self.cpu_at_start = _thread_cpu_seconds()
        if len(self.finished) == self._end:
            self.cpu_at_end = _thread_cpu_seconds()
        return out

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _through_runtime(engine, *, frames: int, warmup: int, size: tuple[int, int], source_fps: float,
                     timeout: float) -> tuple[list[float], dict, dict[str, float], list[float]]:
    """One round through testpattern -> runtime -> null: the intervals between processed frames
    (ms, after `warmup`), the telemetry snapshot, each thread's CPU ms per processed frame, and
    the latencies of the frames published after the warm-up (ms)."""
    width, height = size
    timed = _Timed(engine, start=max(1, warmup), end=warmup + frames)
    runtime = Runtime(engine=timed, open_source=lambda: TestPatternSource(width=width, height=height, fps=source_fps),
                      sinks=[NullSink()], config=RuntimeConfig(fps=source_fps, max_frames=warmup + frames))
    with runtime:
        runtime.wait(timeout=timeout)
        snapshot = runtime.snapshot()
        latencies = runtime.telemetry.latency_samples(skip=warmup)
    intervals = (np.diff(timed.finished[warmup:]) * 1000.0).tolist()
    cpu: dict[str, float] = {}
    before, after = timed.cpu_at_start, timed.cpu_at_end
    calls = warmup + frames - max(1, warmup)  # the calls between the two readings
    if before is not None and after is not None and calls > 0:
        for name, seconds in after.items():
            if name.startswith("sdbridge ") and name in before:
                cpu[name.removeprefix("sdbridge ")] = (seconds - before[name]) * 1000.0 / calls
    return intervals, snapshot, cpu, latencies


def measure_runtime_overhead(engine, *, frames: int = 100, warmup: int = 5, input_size: tuple[int, int] = (640, 480),
                             rounds: int = 5, source_fps: float | None = None, timeout: float = 300.0) -> dict:
    """Run `engine` alone on a test-pattern frame and through testpattern -> runtime -> null
    (source at a steady 30 fps, or twice the engine's rate when that is more: the engine always
    has a new frame waiting; or `source_fps`), in `rounds` alternating rounds of frames/rounds each.

    Returns ms figures: engine_ms (median call alone), runtime_frame_ms (median interval between
    processed frames through the runtime), overhead_ms (their difference), overhead_ms_rounds
    (the difference per round), runtime_inference_ms (median engine call inside the runtime),
    between_calls_ms (runtime_frame_ms less that call: what the inference loop itself adds),
    thread_cpu_ms_per_frame (capture/inference/output/the sink's lane, with psutil), latency_ms_median /
    latency_ms_p95 (capture to publish, over every round's frames after its warm-up) and
    latency_budget_ms: the engine's time for the frame
    (stream batch returns a frame `lag` = steps - 1 calls after it went in, so (lag + 1) engine
    calls) plus one input frame period, which a newest-frame-wins hand-off may add (and
    latency_budget_p95_ms, the same from the engine's p95 call); plus frames and fps of each part.
    """
    width, height = input_size
    pattern = TestPatternSource(width=width, height=height, fps=1000)
    frame = pattern.read(timeout=1.0).pixels
    pattern.close()
    _engine_alone_ms(engine, frame, warmup)
    rounds = max(1, min(rounds, frames // 2))
    per_round = max(2, frames // rounds)
    alone_all: list[float] = []
    through_all: list[float] = []
    per_round_overhead: list[float] = []
    inference: list[float] = []
    latency_samples: list[float] = []  # every round's, after its warm-up
    dropped = 0
    cpu_rounds: list[dict[str, float]] = []
    deadline = time.monotonic() + timeout
    for _ in range(rounds):
        alone = _engine_alone_ms(engine, frame, per_round)
        if source_fps is None:
            source_fps = min(1000.0, max(30.0, 2.0 * 1000.0 / max(statistics.median(alone), 1e-3)))
        intervals, snapshot, cpu, latencies = _through_runtime(
            engine, frames=per_round, warmup=warmup, size=(width, height), source_fps=source_fps,
            timeout=max(1.0, deadline - time.monotonic()),
        )
        alone_all += alone
        through_all += intervals
        if intervals:
            per_round_overhead.append(statistics.median(intervals) - statistics.median(alone))
        if snapshot["inference_ms_median"] is not None:
            inference.append(snapshot["inference_ms_median"])
        latency_samples += latencies
        dropped += snapshot["frames_dropped"]
        if cpu:
            cpu_rounds.append(cpu)
        if time.monotonic() >= deadline:
            break
    engine_ms = statistics.median(alone_all)
    calls = Origins(engine).lag() + 1  # engine calls between a frame going in and coming out
    steady = _latency_at(engine, STEADY_FPS, frames=min(per_round, 90), warmup=warmup, size=(width, height),
                         deadline=deadline, engine_ms=engine_ms, engine_p95_ms=float(np.percentile(alone_all, 95)),
                         calls=calls)
    budget_ms = calls * engine_ms + 1000.0 / source_fps
    budget_p95_ms = calls * float(np.percentile(alone_all, 95)) + 1000.0 / source_fps
    runtime_frame_ms = statistics.median(through_all) if through_all else float("nan")
    threads = sorted({name for cpu in cpu_rounds for name in cpu})

    def median_or_none(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    return {
        "frames": len(through_all),
        "rounds": len(per_round_overhead),
        "engine_ms": engine_ms,
        "engine_fps": 1000.0 / engine_ms if engine_ms else float("nan"),
        "runtime_frame_ms": runtime_frame_ms,
        "runtime_fps": 1000.0 / runtime_frame_ms if runtime_frame_ms else float("nan"),
        "overhead_ms": runtime_frame_ms - engine_ms,
        "overhead_ms_rounds": per_round_overhead,
        "runtime_inference_ms": median_or_none(inference),
        # the inference thread's own time per frame outside the engine call (slots, parameters, figures)
        "between_calls_ms": None if not inference else runtime_frame_ms - statistics.median(inference),
        "thread_cpu_ms_per_frame": {name: statistics.median(cpu.get(name, 0.0) for cpu in cpu_rounds) for name in threads},
        # over every round's frames together (after each round's warm-up)
        "latency_ms_median": median_or_none(latency_samples),
        "latency_ms_p95": float(np.percentile(latency_samples, 95)) if latency_samples else None,
        "latency_frames": len(latency_samples),
        "source_fps": source_fps,
        "latency_budget_ms": budget_ms,
        "latency_budget_p95_ms": budget_p95_ms,  # the same with the engine's p95 call time
        "frames_dropped": dropped,
        "latency_steady": steady,  # the same at a steady 30 fps input (the condition)
    }


STEADY_FPS = 30.0


def _latency_at(engine, source_fps: float, *, frames: int, warmup: int, size: tuple[int, int], deadline: float,
                engine_ms: float, engine_p95_ms: float, calls: int) -> dict | None:
    """Capture-to-publish latency through the runtime with the source at a steady `source_fps`,
    against the budget: the engine's time for the frame plus one input period."""
    if time.monotonic() >= deadline:
        return None
    _, _, _, latencies = _through_runtime(engine, frames=frames, warmup=warmup, size=size, source_fps=source_fps,
                                          timeout=max(1.0, deadline - time.monotonic()))
    period_ms = 1000.0 / source_fps
    return {
        "source_fps": source_fps,
        "frames": frames,
        "latency_ms_median": statistics.median(latencies) if latencies else None,
        "latency_ms_p95": float(np.percentile(latencies, 95)) if latencies else None,
        "latency_budget_ms": calls * engine_ms + period_ms,
        "latency_budget_p95_ms": calls * engine_p95_ms + period_ms,
    }


def measure_prompt_changes(engine, *, changes: int = 10, output_fps: float = 60.0, warmup: int = 30,
                           interval: float = 0.5, input_size: tuple[int, int] = (640, 480),
                           timeout: float = 120.0) -> dict:
    """Change the prompt `changes` times, `interval` seconds apart, the way an operator does: a new
    text into the runtime's parameter store, encoded by its prompt worker off the frame loop and
    swapped in between frames. See `measure_changes` for the figures."""
    texts = [f"a watercolour of a lighthouse in a storm, variant {k}" for k in range(changes)]
    result = measure_changes(engine, [("prompt", text) for text in texts], output_fps=output_fps, warmup=warmup,
                             interval=interval, input_size=input_size, timeout=timeout)
    result["last_prompt_applied"] = result.pop("last_applied")
    return result


def measure_lora_changes(engine, *, changes: int = 10, output_fps: float = 60.0, warmup: int = 30,
                         interval: float = 0.5, input_size: tuple[int, int] = (640, 480),
                         timeout: float = 120.0) -> dict:
    """Move live LoRA 1's strength `changes` times through /sd/lora/1's path (the parameter
    store, applied between frames); first the cost of one `set_lora_scales` alone (the layers
    rewritten, the device synchronised), then `measure_changes`'s figures."""
    from .benchmarking import _synchronize  # (torch: imported only where a bench runs)

    live = engine.components.live_loras
    device = next(engine.components.unet.parameters()).device
    strengths = [0.2, 1.0, 0.6, 0.0, 0.8]
    alone_ms = []
    for strength in strengths:
        _synchronize(device)
        started = time.perf_counter()
        engine.set_lora_scales({0: strength})
        _synchronize(device)
        alone_ms.append((time.perf_counter() - started) * 1000.0)
    engine.set_lora_scales({0: 1.0})
    result = measure_changes(engine, [("lora_1", strengths[k % len(strengths)]) for k in range(changes)],
                             output_fps=output_fps, warmup=warmup, interval=interval, input_size=input_size,
                             timeout=timeout)
    result.update(set_ms_median=float(np.median(alone_ms)), set_ms_max=max(alone_ms), layers=live.layers,
                  kept_mib=live.kept_bytes / 2**20)
    return result


def measure_size_changes(engine, sizes: list[tuple[int, int]], *, output_fps: float = 60.0, warmup: int = 30,
                         interval: float = 0.5, input_size: tuple[int, int] = (640, 480),
                         timeout: float = 120.0) -> dict:
    """Switch the processing size to each of `sizes` in turn through /sd/resolution's path (the
    parameter store, applied between frames). See `measure_changes` for the figures."""
    result = measure_changes(engine, [("resolution", tuple(size)) for size in sizes], output_fps=output_fps,
                             warmup=warmup, interval=interval, input_size=input_size, timeout=timeout)
    result["sizes"] = [f"{width}x{height}" for width, height in sizes]
    return result


def measure_changes(engine, changes: list[tuple[str, object]], *, output_fps: float = 60.0, warmup: int = 30,
                    interval: float = 0.5, input_size: tuple[int, int] = (640, 480), timeout: float = 120.0) -> dict:
    """Set each (parameter, value) of `changes` in the runtime's parameter store, `interval`
    seconds apart, while a source runs at `output_fps`; the figures are the gaps between frames
    leaving the engine (ms): the largest in the second after any change and anywhere, and how
    many exceed two output periods (the target: none). `graphs_compiled` counts torch.compile
    graphs made during the changes (the target: 0; None where torch._dynamo is not loaded)."""
    from .params import ParameterStore

    store = ParameterStore()
    encodes_ms: list[float] = []

    def prepare_prompt(text: str) -> None:  # the prompt worker's call, timed
        started = time.perf_counter()
        engine.prepare_prompt(text)
        encodes_ms.append((time.perf_counter() - started) * 1000.0)

    store.attach_prompt_encoder(prepare_prompt)
    timed, runtime = _timed_runtime(engine, store, input_size, output_fps)
    deadline = time.monotonic() + timeout
    changed_at: list[float] = []
    graphs_before = _graphs_compiled()
    try:
        with runtime:
            measured_from = _after_frames(timed, warmup, deadline)
            for name, value in changes:
                if time.monotonic() + interval >= deadline:
                    break
                store.set(name, value)
                changed_at.append(time.perf_counter())
                time.sleep(interval)
            applied = store.applied
            snapshot = runtime.snapshot()
    finally:
        store.close()
    graphs_after = _graphs_compiled()
    finished = np.asarray(timed.finished[measured_from:])
    started = np.asarray(timed.started[measured_from:len(timed.finished)])
    gaps = np.diff(finished) * 1000.0  # gap k ends at finished[k + 1]
    period_ms = 1000.0 / output_fps
    after_change = np.zeros(gaps.size, dtype=bool)
    for moment in changed_at:
        after_change |= (finished[1:] >= moment) & (finished[1:] < moment + 1.0)
    last_name, last_value = changes[len(changed_at) - 1] if changed_at else (None, None)
    return {
        "changes": len(changed_at),
        "last_applied": bool(changed_at) and applied.get(last_name) == last_value,
        "output_fps": output_fps,
        "frames": int(finished.size),
        "gap_ms_median": float(np.median(gaps)) if gaps.size else None,
        "gap_ms_max": float(gaps.max()) if gaps.size else None,
        "gap_ms_max_after_change": float(gaps[after_change].max()) if after_change.any() else None,
        "gaps_over_two_periods": int((gaps > 2 * period_ms).sum()),
        "two_periods_ms": 2 * period_ms,
        "graphs_compiled": None if graphs_before is None else graphs_after - graphs_before,
        "inference_ms_median": snapshot.get("inference_ms_median"),
        "largest_gap": _gap_parts(started, finished, changed_at),
        "encode_ms_max": max(encodes_ms) if encodes_ms else None,
    }


def _timed_runtime(engine, store, input_size: tuple[int, int], output_fps: float) -> tuple[_Timed, Runtime]:
    """The engine, timed, in a runtime fed by a test pattern at `output_fps` (a null sink)."""
    width, height = input_size
    timed = _Timed(engine, start=0, end=0)  # 0: no CPU-time readings (a call count never equals 0)
    runtime = Runtime(engine=timed, open_source=lambda: TestPatternSource(width=width, height=height, fps=output_fps),
                      sinks=[NullSink()], config=RuntimeConfig(fps=output_fps), params=store)
    return timed, runtime


def _after_frames(timed: _Timed, count: int, deadline: float) -> int:
    """Wait until `count` frames came out (or the deadline); how many did."""
    while len(timed.finished) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(timed.finished)


def _gap_parts(started: np.ndarray, finished: np.ndarray, changed_at: list[float]) -> dict | None:
    """Where the largest gap between two finished frames went (ms): `call_ms`, the engine call
    that ended it; `before_call_ms`, from the previous call's end to that call's start (waiting
    for a frame, applying changes, or waiting for the GIL); `since_change_ms`, from the latest
    change before its end (None when none came before)."""
    if finished.size < 2:
        return None
    k = int(np.argmax(np.diff(finished))) + 1  # the call that ended the largest gap
    earlier = [moment for moment in changed_at if moment <= finished[k]]
    return {
        "ms": float(finished[k] - finished[k - 1]) * 1000.0,
        "call_ms": float(finished[k] - started[k]) * 1000.0,
        "before_call_ms": float(started[k] - finished[k - 1]) * 1000.0,
        "since_change_ms": float(finished[k] - earlier[-1]) * 1000.0 if earlier else None,
    }


def _graphs_compiled() -> int | None:
    """Graphs torch.compile has made in this process so far (None where dynamo is not loaded)."""
    import sys

    if "torch._dynamo" not in sys.modules:
        return None
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure_ready_beside(engine, name: str, value, *, output_fps: float = 60.0, warmup: int = 30,
                         input_size: tuple[int, int] = (640, 480), before_seconds: float = 1.0,
                         after_seconds: float = 1.0, timeout: float = 600.0) -> dict:
    """Set `name` to `value` (a change that compiles: a new step count or size) in the runtime's
    parameter store with a readier attached, as `sdbridge run` does with the compiled backend,
    while a source runs at `output_fps`: how long readying took, how many frames the show made
    meanwhile (at the old settings), and the gaps between frames leaving the engine (ms) in the
    `before_seconds` before the change, while it compiled, and around the switch (the step
    graph's capture happens there)."""
    from .params import ParameterStore

    store = ParameterStore()
    store.attach_readier(engine.ready)
    timed, runtime = _timed_runtime(engine, store, input_size, output_fps)
    deadline = time.monotonic() + timeout
    graphs_before = _graphs_compiled()
    try:
        with runtime:
            measured_from = _after_frames(timed, warmup, deadline)
            time.sleep(before_seconds)  # the gaps of the show as it was, for comparison
            store.set(name, value)
            changed_at = time.perf_counter()
            while time.monotonic() < deadline and name not in store.rejected and not _applied(store, name, value):
                time.sleep(0.005)
            switched_at = time.perf_counter()
            time.sleep(after_seconds)
    finally:
        store.close()
    finished = np.asarray(timed.finished[measured_from:])
    gaps = np.diff(finished) * 1000.0  # gap k ends at finished[k + 1]
    ends = finished[1:] if finished.size else finished
    readying = (ends > changed_at) & (ends <= switched_at)
    at_switch = (ends > switched_at - 0.5) & (ends <= switched_at + after_seconds)
    before = ends <= changed_at
    rejected = store.rejected.get(name)
    return {
        "change": {name: value},
        "applied": _applied(store, name, value),
        "rejected": rejected[1] if rejected else None,
        "ready_seconds": switched_at - changed_at,
        "frames_while_readying": int(((finished > changed_at) & (finished <= switched_at)).sum()),
        "gap_ms_median_before": float(np.median(gaps[before])) if before.any() else None,
        "gap_ms_max_while_readying": float(gaps[readying].max()) if readying.any() else None,
        "gap_ms_max_at_switch": float(gaps[at_switch].max()) if at_switch.any() else None,
        "graphs_compiled": None if graphs_before is None else _graphs_compiled() - graphs_before,
        "output_fps": output_fps,
    }


def _applied(store, name: str, value) -> bool:
    applied = store.applied.get(name)
    return applied is not None and tuple(np.atleast_1d(applied)) == tuple(np.atleast_1d(value))
