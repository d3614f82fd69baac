"""Shutdown benchmark (show-safety promise 6, full version): `--trials` runs of `sdbridge run`
(tiny model, OSC on ONE port for every trial), each stopped by SIGINT or SIGTERM (in turn) at a
random kind of moment: while the model loads, mid-step, just after an OSC prompt change (with a
TCP client connected), while the source is being reconnected (see tests/shutdown_trials.py).
Every trial after the first also proves that the previous process left the port reusable: a
port still held would make the next start fail with exit status 2. Writes one JSON file.

    python bench/shutdown.py --trials 100 --out bench/results/shutdown.json

tests/test_safety_shutdown.py runs one trial per moment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sys
import tempfile
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from shutdown_trials import MOMENTS, free_port_pair, trial  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--size", type=int, default=128, help="processing size of the tiny model")
    parser.add_argument("--out", default="bench/results/shutdown.json")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    port = free_port_pair()
    load_start = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for index in range(args.trials):
            moment = rng.choice(MOMENTS)
            signum = (signal.SIGINT, signal.SIGTERM)[index % 2]
            result = trial(moment=moment, signum=signum, port=port, workdir=Path(workdir), rng=rng, size=args.size)
            results.append(result)
            print(f"{index + 1:3d} {moment:9s} {result['signal']:7s} exit {result['exit_code']} "
                  f"in {result['exit_seconds']:.2f} s, ports free {result['ports_free']}", flush=True)
    seconds = sorted(r["exit_seconds"] for r in results)
    pick = lambda q: seconds[min(len(seconds) - 1, int(q * len(seconds)))]  # noqa: E731
    by_moment = {m: sum(1 for r in results if r["moment"] == m) for m in MOMENTS}
    failures = [r for r in results if r["exit_code"] != 0 or r["exit_seconds"] >= 3.0 or not r["ports_free"]]
    report = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_start": load_start, "load_average_end": os.getloadavg()},
        "port": port,
        "trials": len(results),
        "by_moment": by_moment,
        "by_signal": {name: sum(1 for r in results if r["signal"] == name) for name in ("SIGINT", "SIGTERM")},
        "exit_codes": {str(code): sum(1 for r in results if r["exit_code"] == code) for code in {r["exit_code"] for r in results}},
        "exit_seconds_median": pick(0.5), "exit_seconds_p99": pick(0.99), "exit_seconds_max": seconds[-1],
        "ports_not_free": sum(1 for r in results if not r["ports_free"]),
        "bars": {"exit_seconds_max": 3.0, "exit_code": 0},
        "passed": not failures,
        "failures": failures,
        "trials_detail": [{k: r[k] for k in ("moment", "signal", "exit_code", "exit_seconds", "ports_free")} for r in results],
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(json.dumps({k: report[k] for k in ("trials", "exit_codes", "exit_seconds_median", "exit_seconds_max",
                                             "ports_not_free", "passed")}))


if __name__ == "__main__":
    main()
