"""Source-loss benchmark (show-safety promise 1, full version): the source goes away `--cycles`
times for durations spread log-uniformly over `--min-seconds`..`--max-seconds` (shuffled), each
way in turn (sender stops; sender destroyed; destroyed and recreated: see tests/safety_sources.py).
Writes one JSON file with the figures the issue sets bars for:

- the longest time the sinks went without a frame (bar: 2 frame periods);
- sends during an outage that were not the held last good frame (bar: 0);
- how soon after the source's return a frame captured after it was published (bar: 1 s).

    python bench/source_loss.py --cycles 200 --min-seconds 0.1 --max-seconds 30 \\
        --out bench/results/source_loss.json

The runtime uses its default reconnect settings; the engine is a stand-in with a fixed cost
(`--engine-ms`, sleeping like a GPU wait) or the tiny random-weight model (`--engine tiny`).
tests/test_safety_output.py runs a scaled version (15 cycles of 0.1..2.5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import numpy as np  # noqa: E402

from bridge.runtime import Runtime, RuntimeConfig  # noqa: E402
from safety_sources import OutageShow, RecordingSink, StandInEngine, figures, outage_plan  # noqa: E402


def make_engine(args):
    if args.engine == "standin":
        return StandInEngine(size=args.size, cost=args.engine_ms / 1000.0)
    import torch

    from pipeline import StreamConfig, StreamDiffusion, random_components

    torch.set_num_threads(1)
    components = random_components("tiny", dtype=torch.float32, device="cpu", seed=0)
    return StreamDiffusion(components, StreamConfig(width=args.size, height=args.size, device="cpu", t_index_list=(20, 40)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--min-seconds", type=float, default=0.1)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--up-seconds", type=float, default=0.5, help="source present between outages")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--engine", choices=("standin", "tiny"), default="standin")
    parser.add_argument("--engine-ms", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default="bench/results/source_loss.json")
    args = parser.parse_args()

    durations = list(np.geomspace(args.min_seconds, args.max_seconds, args.cycles))
    random.Random(args.seed).shuffle(durations)
    outages, end = outage_plan(durations, up=args.up_seconds)
    engine = make_engine(args)
    sink = RecordingSink()
    load_start = os.getloadavg()
    t0 = time.monotonic()
    show = OutageShow(t0=t0, outages=outages)
    runtime = Runtime(engine=engine, open_source=show.open, sinks=[sink], config=RuntimeConfig(fps=args.fps))
    loads = []  # (seconds after t0, 1-minute load average) every 5 s: a late gap under load is the machine's
    with runtime:
        while not runtime.wait(timeout=min(5.0, max(0.0, end + 0.5 - (time.monotonic() - t0)))):
            loads.append((round(time.monotonic() - t0, 1), os.getloadavg()[0]))
            if time.monotonic() - t0 >= end + 0.5:
                break
    result = figures(sink.sent, outages, t0, args.fps)
    snapshot = runtime.snapshot()
    config = runtime.config
    report = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"},
                     "reconnect_initial_seconds": config.reconnect_initial_seconds,
                     "reconnect_max_seconds": config.reconnect_max_seconds, "stall_seconds": config.stall_seconds},
        "seconds": end,
        "outages": len(outages),
        "outage_seconds_total": float(sum(durations)),
        **result,
        "bars": {"max_gap_ms": 2000.0 / args.fps, "held_violations": 0, "pickup_ms_max": 1000.0},
        "passed": bool(result["max_gap_ms"] <= 2000.0 / args.fps and result["held_violations"] == 0
                       and result["pickups_missing"] == 0 and result["pickup_ms_max"] < 1000.0),
        "load_at_late_gaps": [next((load for at, load in loads if at >= late_at), None) for late_at, _ in result["late_gaps"]],
        "load_average_max": max((load for _, load in loads), default=None),
        "source_lost": snapshot["source_lost"], "sources_opened": show.opened,
        "frames_processed": snapshot["frames_processed"], "frames_out": snapshot["frames_out"],
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps({k: report[k] for k in ("outages", "seconds", "max_gap_ms", "gaps_over_2_periods", "held_violations",
                                             "pickup_ms_median", "pickup_ms_max", "passed")}))


if __name__ == "__main__":
    main()
