"""Live figures of a run: rates, inference time, latency, counters; and the terminal status line."""

from __future__ import annotations

import threading
import time
from collections import deque

WINDOW_SECONDS = 2.0  # rates are measured over this much recent time
SAMPLES = 240  # inference and latency figures over this many recent frames

COUNTERS = (
    "frames_in",  # frames the source delivered
    "frames_processed",  # frames the engine returned
    "frames_out",  # frames sent to the sinks, repeats included
    "frames_dropped",  # frames replaced in a hand-off slot before the next stage took them
    "frames_skipped",  # frames the similarity filter skipped (the engine's count)
    "bad_frames",  # frames the engine failed on or returned unusable (non-finite caught included)
    "source_lost",  # times the source went away
    "sink_errors",  # sends that raised
    "sink_missed",  # frames a sink never got: its earlier sends were still running (bridge.lanes)
    "fallback_frames",  # frames sent from the fallback (stalled source or engine)
    "rollbacks",  # times the engine was put back to the last configuration that produced a good frame
)


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


class Telemetry:
    """Thread-safe counters and recent samples; `snapshot()` is what the control plane reads."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._arrivals = {"in": deque(), "out": deque(), "processed": deque()}
        self._inference_ms: deque[float] = deque(maxlen=SAMPLES)
        self._latency_ms: deque[float] = deque(maxlen=SAMPLES)
        self._latencies_seen = 0  # every latency sample so far, the ones the deque let go included
        self._engine_stats: dict[str, int] = {}
        self._slots: list = []  # hand-off slots whose overwritten values count as dropped frames
        self._last_error: str | None = None  # the latest fault, one line (status out sends it)
        self._last_error_time: float | None = None
        self.state = "starting"  # "starting", "running", "source lost", "stopping", "stopped"
        self.backend = ""  # what runs the frames, e.g. "compiled+step graph" (bridge.engine.backend_label)

    def count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counters[name] += amount

    def error(self, text: str) -> None:
        """Record the latest fault (engine step, update, prompt, source): one line for status out."""
        line = " ".join(str(text).split())[:512]
        with self._lock:
            self._last_error, self._last_error_time = line, self._clock()

    def watch_slots(self, slots) -> None:
        """Count values replaced in these LatestSlots before being taken as dropped frames."""
        with self._lock:
            self._slots = list(slots)

    def _arrive(self, which: str, now: float) -> None:
        times = self._arrivals[which]
        times.append(now)
        while times and times[0] < now - WINDOW_SECONDS:
            times.popleft()

    def frame_in(self) -> None:
        with self._lock:
            self._counters["frames_in"] += 1
            self._arrive("in", self._clock())

    def frame_processed(self, inference_ms: float) -> None:
        with self._lock:
            self._counters["frames_processed"] += 1
            self._inference_ms.append(inference_ms)
            self._arrive("processed", self._clock())

    def frame_out(self, latency_ms: float | None, fallback: bool = False) -> None:
        """One send to the sinks; `latency_ms` (capture to publish) for a fresh frame only."""
        with self._lock:
            self._counters["frames_out"] += 1
            if fallback:
                self._counters["fallback_frames"] += 1
            if latency_ms is not None:
                self._latency_ms.append(latency_ms)
                self._latencies_seen += 1
            self._arrive("out", self._clock())

    def engine_stats(self, frames_skipped: int, nonfinite_caught: int) -> None:
        with self._lock:
            self._engine_stats = {"frames_skipped": frames_skipped, "nonfinite_caught": nonfinite_caught}

    def _rate(self, which: str, now: float) -> float:
        times = [t for t in self._arrivals[which] if t >= now - WINDOW_SECONDS]
        if len(times) < 2:
            return 0.0
        return (len(times) - 1) / max(1e-6, times[-1] - times[0])

    def latency_samples(self, skip: int = 0) -> list[float]:
        """The recent capture-to-publish latencies (ms, oldest first, at most SAMPLES), less the
        first `skip` fresh frames of the run (a warm-up)."""
        with self._lock:
            kept = max(0, min(len(self._latency_ms), self._latencies_seen - skip))
            return list(self._latency_ms)[len(self._latency_ms) - kept:]

    def snapshot(self) -> dict:
        """Every figure as a plain dict (ms as floats, None before the first sample)."""
        now = self._clock()
        with self._lock:
            counters = dict(self._counters)
            counters["frames_skipped"] = self._engine_stats.get("frames_skipped", 0)
            counters["bad_frames"] += self._engine_stats.get("nonfinite_caught", 0)
            counters["frames_dropped"] += sum(slot.overwritten for slot in self._slots)
            inference = list(self._inference_ms)
            latency = list(self._latency_ms)
            rates = {name: self._rate(name, now) for name in self._arrivals}
            last_error, last_error_time = self._last_error, self._last_error_time
        return {
            "state": self.state,
            "input_fps": rates["in"],
            "processed_fps": rates["processed"],
            "output_fps": rates["out"],
            "inference_ms_median": _percentile(inference, 0.5),
            "inference_ms_p95": _percentile(inference, 0.95),
            "latency_ms_median": _percentile(latency, 0.5),
            "latency_ms_p95": _percentile(latency, 0.95),
            **counters,
            "last_error": last_error,
            "last_error_age": None if last_error_time is None else now - last_error_time,
            "backend": self.backend,
        }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def status_line(snapshot: dict) -> str:
    """One terminal line, e.g. `running | in 30.0 fps | out 30.0 fps | infer 41/55 ms | ...`."""
    return (
        f"{snapshot['state']} | in {snapshot['input_fps']:.1f} fps | out {snapshot['output_fps']:.1f} fps"
        f" | infer {_ms(snapshot['inference_ms_median'])}/{_ms(snapshot['inference_ms_p95'])} ms (median/p95)"
        f" | latency {_ms(snapshot['latency_ms_median'])} ms"
        f" | skipped {snapshot['frames_skipped']} dropped {snapshot['frames_dropped']}"
        f" bad {snapshot['bad_frames']} lost {snapshot['source_lost']}"
        + (f" | sink errors {snapshot['sink_errors']} missed {snapshot['sink_missed']}"
           if snapshot.get("sink_errors") or snapshot.get("sink_missed") else "")
        + (f" | recording {snapshot['recording']}" if snapshot.get("recording") else "")
        + (f" | {snapshot['size']}" if snapshot.get("size") else "")
        + (f" | {snapshot['backend']}" if snapshot.get("backend") else "")
    )
