"""Soak: a long `sdbridge run` (tiny model) under a scripted show; does anything leak or drift?

    nice -n 10 python bench/soak.py --minutes 30 --json bench/results/soak_30min.json

The run is built in this process from the same parts `sdbridge run` uses (RunSettings, the
engine, the ParameterStore, the OSC control plane on a real UDP port, the Runtime with its three
threads and a thread per sink, a null sink unless `--sink` names others, e.g. a file of its own
size that each frame is scaled into). The show, driven from the main thread:

- every 2 s a parameter change, sent as a real OSC packet over UDP to the control plane
  (guidance, delta, seed, similarity threshold, t_index_list in turn);
- every 30 s a new prompt (a new text each time, so the encoder and its cache work);
- every 2 min a source flap: the source is lost for `--flap-seconds` (read raises SourceLost,
  reopening fails) and comes back, through the runtime's real reconnect path.

After `--warmup-minutes`, once a second: resident memory (VmRSS), threads (/proc/self/task),
open file descriptors (/proc/self/fd); every frame's engine time goes into a per-window list
(`--window-seconds`) reduced to median/p99 as each window closes (no per-frame history is kept,
so the script does not itself grow). Figures and the bars of issue 7:

- RSS growth in MB per hour: least-squares slope over the post-warm-up samples (< 5);
- threads and fds: first / last / max after warm-up (flat: last == first);
- p99 frame time drift: last window's p99 over the first window's p99, minus 1 (< 10%).

Frame times are wall-clock: on a shared machine they carry the other processes' load too;
the JSON records the load average at the start and the end, and the same figures for the
inference thread's CPU time per frame (`cpu_p99_drift`), which other processes do not inflate.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bridge.control import ControlPlane  # noqa: E402
from bridge.control.osc import encode_message  # noqa: E402
from bridge.engine import build_engine, stream_config  # noqa: E402
from bridge.params import ParameterStore  # noqa: E402
from bridge.runtime import Runtime, RuntimeConfig  # noqa: E402
from bridge.settings import RunSettings  # noqa: E402
from bridge.transports import open_sink  # noqa: E402
from bridge.transports.base import Source, SourceLost  # noqa: E402
from bridge.transports.testpattern import TestPatternSource  # noqa: E402

BARS = {"rss_mb_per_hour": 5.0, "p99_drift": 0.10}
PARAMETER_SCRIPT = (  # (address, args) sent in turn, one every --param-seconds
    ("/sd/guidance", (1.4,)), ("/sd/delta", (0.8,)), ("/sd/seed", (7,)), ("/sd/similarity/threshold", (0.95,)),
    ("/sd/guidance", (1.1,)), ("/sd/delta", (1.0,)), ("/sd/seed", (3,)), ("/sd/t_index_list", (30, 45)),
    ("/sd/similarity/threshold", (0.98,)), ("/sd/t_index_list", (32, 45)),
)


class Show:
    """The source side of the show: `away` set means the source is unplugged."""

    def __init__(self, *, width: int, height: int, fps: float) -> None:
        self.width, self.height, self.fps = width, height, fps
        self.away = threading.Event()
        self.opens = 0

    def open_source(self) -> Source:
        if self.away.is_set():
            raise SourceLost("soak: source unplugged")
        self.opens += 1
        return FlappingSource(show=self, inner=TestPatternSource(width=self.width, height=self.height, fps=self.fps))


class FlappingSource(Source):
    """A test pattern that raises SourceLost while the show has it unplugged."""

    def __init__(self, *, show: Show, inner: Source) -> None:
        self._show, self._inner = show, inner
        self.format = inner.format

    def read(self, timeout: float = 0.1):
        if self._show.away.is_set():
            raise SourceLost("soak: source unplugged")
        return self._inner.read(timeout)

    def close(self) -> None:
        self._inner.close()


class TimedEngine:
    """The engine, with each frame's wall time and the inference thread's CPU time (ms) added to
    the current window (two short lists). With one torch thread the whole step runs on the
    calling thread, so its CPU time is the engine's own cost, whatever else loads the machine."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._wall: list[float] = []
        self._cpu: list[float] = []

    def __call__(self, pixels):
        started, cpu_started = time.perf_counter(), time.thread_time()
        out = self._engine(pixels)
        elapsed, cpu = (time.perf_counter() - started) * 1000.0, (time.thread_time() - cpu_started) * 1000.0
        with self._lock:
            self._wall.append(elapsed)
            self._cpu.append(cpu)
        return out

    def take_window(self) -> tuple[list[float], list[float]]:
        with self._lock:
            window = self._wall, self._cpu
            self._wall, self._cpu = [], []
        return window

    def __getattr__(self, name):
        return getattr(self._engine, name)


def proc_sample() -> tuple[float, int, int]:
    """(RSS in MB, threads, open fds) of this process, from /proc."""
    with open("/proc/self/status") as handle:
        rss_kb = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
    return rss_kb / 1024.0, len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))


def slope_per_hour(times: list[float], values: list[float]) -> float:
    """Least-squares slope of values over times (seconds), per hour."""
    mean_t, mean_v = statistics.fmean(times), statistics.fmean(values)
    var = sum((t - mean_t) ** 2 for t in times)
    cov = sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values))
    return 3600.0 * cov / var if var else 0.0


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except OSError:
        return None


def build(args):
    settings = RunSettings(source="testpattern", sink=("null",), model="random:tiny", width=args.size,
                           height=args.size, device="cpu", fps=args.fps, osc_port=0, prompt="a soak test",
                           status=False)
    config = stream_config(settings)
    store = ParameterStore()
    plane = ControlPlane(store=store, settings=settings.control_settings()).start()
    engine = build_engine(settings, config, progress=lambda text: None)
    store.attach_prompt_encoder(engine.prepare_prompt)
    timed = TimedEngine(engine)
    show = Show(width=args.size, height=args.size, fps=args.fps)
    sinks = [open_sink(spec, width=args.size, height=args.size, fps=args.fps) for spec in args.sink or ["null"]]
    runtime = Runtime(engine=timed, open_source=show.open_source, sinks=sinks,
                      config=RuntimeConfig(fps=args.fps, fallback="last"), params=store)
    runtime.params.report_applied({"prompt": settings.prompt})
    return plane, store, timed, show, runtime


def run(args) -> dict:
    plane, store, timed, show, runtime = build(args)
    gc.collect()
    gc.freeze()  # as `sdbridge run` does after loading
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = ("127.0.0.1", plane.osc_port)
    total = args.minutes * 60.0
    warmup = args.warmup_minutes * 60.0
    samples: list[tuple[float, float, int, int]] = []  # (t, rss_mb, threads, fds), one a second after warm-up
    windows: list[dict] = []
    counts = {"parameter_changes": 0, "prompt_changes": 0, "flaps": 0}
    next_param, next_prompt = args.param_seconds, args.prompt_seconds
    next_flap = args.flap_every_seconds / 2
    back_at = None
    next_sample = warmup
    next_window = warmup + args.window_seconds
    load_start = os.getloadavg()
    runtime.start()
    started = time.monotonic()
    try:
        while True:
            now = time.monotonic() - started
            if now >= total or runtime.finished:
                break
            if now >= next_param:
                address, values = PARAMETER_SCRIPT[counts["parameter_changes"] % len(PARAMETER_SCRIPT)]
                sender.sendto(encode_message(address, *values), target)
                counts["parameter_changes"] += 1
                next_param += args.param_seconds
            if now >= next_prompt:
                counts["prompt_changes"] += 1
                sender.sendto(encode_message("/sd/prompt", f"soak prompt {counts['prompt_changes']}"), target)
                next_prompt += args.prompt_seconds
            if now >= next_flap:
                show.away.set()
                counts["flaps"] += 1
                back_at = now + args.flap_seconds
                next_flap += args.flap_every_seconds
            if back_at is not None and now >= back_at:
                show.away.clear()
                back_at = None
            if now >= next_sample:
                samples.append((now, *proc_sample()))
                next_sample += args.sample_seconds
            if now >= next_window:
                frame_ms, cpu_ms = timed.take_window()
                if frame_ms:
                    windows.append({"end_s": round(now, 1), "frames": len(frame_ms),
                                    "median_ms": round(statistics.median(frame_ms), 2), "p99_ms": round(p99(frame_ms), 2),
                                    "cpu_median_ms": round(statistics.median(cpu_ms), 2),
                                    "cpu_p99_ms": round(p99(cpu_ms), 2)})
                next_window += args.window_seconds
            elif now < warmup:
                timed.take_window()  # warm-up frames are not counted
            time.sleep(0.05)
    finally:
        runtime.stop()
        plane.close()
        sender.close()
    return report(args, samples, windows, counts, show, runtime.snapshot(), plane.counters, store,
                  load_start, time.monotonic() - started)


def report(args, samples, windows, counts, show, snapshot, osc, store, load_start, seconds) -> dict:
    times = [s[0] for s in samples]
    rss, threads, fds = ([s[i] for s in samples] for i in (1, 2, 3))
    result = {
        "command": "python bench/soak.py " + " ".join(args.argv),
        "commit": commit(), "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "torch_threads": _torch_threads(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(seconds, 1), "warmup_seconds": args.warmup_minutes * 60, "size": args.size, "fps": args.fps,
        "show": counts, "source_opens": show.opens,
        "sinks": args.sink or ["null"],
        "runtime": {k: snapshot.get(k) for k in ("frames_in", "frames_processed", "frames_out", "frames_dropped",
                                                  "bad_frames", "source_lost", "sink_errors", "sink_missed",
                                                  "fallback_frames")},
        "osc": {k: osc[k] for k in ("packets", "applied", "rejected", "internal_errors")},
        "rejected_parameters": {k: v[1] for k, v in store.rejected.items()},
        "samples": len(samples),
    }
    if len(samples) >= 2:
        result.update({
            "rss_mb_first": round(rss[0], 2), "rss_mb_last": round(rss[-1], 2), "rss_mb_max": round(max(rss), 2),
            "rss_mb_per_hour": round(slope_per_hour(times, rss), 3),
            "threads": {"first": threads[0], "last": threads[-1], "max": max(threads), "min": min(threads)},
            "fds": {"first": fds[0], "last": fds[-1], "max": max(fds), "min": min(fds)},
        })
    if len(windows) >= 2:
        first, last = windows[0]["p99_ms"], windows[-1]["p99_ms"]
        result.update({"p99_ms_first_window": first, "p99_ms_last_window": last,
                       "p99_drift": round(last / first - 1.0, 4),
                       "median_drift": round(windows[-1]["median_ms"] / windows[0]["median_ms"] - 1.0, 4),
                       "cpu_p99_ms_first_window": windows[0]["cpu_p99_ms"], "cpu_p99_ms_last_window": windows[-1]["cpu_p99_ms"],
                       "cpu_p99_drift": round(windows[-1]["cpu_p99_ms"] / windows[0]["cpu_p99_ms"] - 1.0, 4)})
    result["windows"] = windows
    result["bars"] = BARS
    result["pass"] = {
        "rss": result.get("rss_mb_per_hour", float("inf")) < BARS["rss_mb_per_hour"],
        "threads_flat": "threads" in result and result["threads"]["last"] == result["threads"]["first"],
        "fds_flat": "fds" in result and result["fds"]["last"] == result["fds"]["first"],
        "p99_drift": "p99_drift" in result and result["p99_drift"] < BARS["p99_drift"],
        "cpu_p99_drift": "cpu_p99_drift" in result and result["cpu_p99_drift"] < BARS["p99_drift"],
    }
    return result


def _torch_threads() -> int | None:
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:  # pragma: no cover
        return None


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--minutes", type=float, default=30.0, help="whole run, warm-up included")
    add("--warmup-minutes", type=float, default=3.0, help="not sampled")
    add("--size", type=int, default=64, help="width and height (multiple of 8)")
    add("--fps", type=float, default=10.0)
    add("--param-seconds", type=float, default=2.0, help="a parameter change this often (OSC)")
    add("--prompt-seconds", type=float, default=30.0, help="a prompt change this often (OSC)")
    add("--flap-every-seconds", type=float, default=120.0, help="a source flap this often")
    add("--flap-seconds", type=float, default=3.0, help="how long the source is away")
    add("--sample-seconds", type=float, default=1.0)
    add("--window-seconds", type=float, default=180.0, help="frame-time window for p99")
    add("--torch-threads", type=int, default=1, help="torch intra-op threads (a shared machine: 1)")
    add("--sink", action="append", help="where frames go, as sdbridge run's --sink (repeatable; default null)")
    add("--json", help="write the figures here")
    args = parser.parse_args(argv)
    args.argv = list(argv)
    return args


def summary_lines(result: dict) -> list[str]:
    t, f = result.get("threads", {}), result.get("fds", {})
    return [
        f"soak: {result['seconds'] / 60:.1f} min, {result['runtime']['frames_processed']} frames processed, "
        f"{result['show']['parameter_changes']} parameter changes, {result['show']['prompt_changes']} prompt changes, "
        f"{result['show']['flaps']} source flaps (load average {result['load_average_start'][0]} -> "
        f"{result['load_average_end'][0]} on {result['cpus']} CPUs)",
        f"RSS: {result.get('rss_mb_first')} -> {result.get('rss_mb_last')} MB (max {result.get('rss_mb_max')}), "
        f"growth {result.get('rss_mb_per_hour')} MB/hour (bar < {BARS['rss_mb_per_hour']})",
        f"threads first/last/max {t.get('first')}/{t.get('last')}/{t.get('max')}; "
        f"fds first/last/max {f.get('first')}/{f.get('last')}/{f.get('max')}",
        f"p99 frame time: first window {result.get('p99_ms_first_window')} ms, last {result.get('p99_ms_last_window')} ms,"
        f" drift {result.get('p99_drift')} (bar < {BARS['p99_drift']}); median drift {result.get('median_drift')}",
        f"p99 engine CPU time (this thread only): first window {result.get('cpu_p99_ms_first_window')} ms, last "
        f"{result.get('cpu_p99_ms_last_window')} ms, drift {result.get('cpu_p99_drift')}",
        f"pass: {result['pass']}",
    ]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bridge").setLevel(logging.ERROR)  # the flaps' "source lost" warnings are expected
    import torch

    torch.set_num_threads(args.torch_threads)
    result = run(args)
    for line in summary_lines(result):
        print(line)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
            handle.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
