"""What the runtime itself costs per frame, with an engine stand-in that uses no CPU.

`sdbridge bench --runtime` puts a real engine in the runtime; on a CPU that engine shares the
cores with the capture and output threads, so its own slowdown and the runtime's cost are mixed.
Here the engine is a stand-in that sleeps for a fixed time per call (as a GPU engine mostly
waits on the device) and returns a frame of the right size, with the stream-batch lag of
1 and 2 steps: what remains is the runtime's own cost and its latency against the budget
(engine time for the frame plus one input period).

    python bench/runtime_floor.py --engine-ms 100 --frames 200 --json bench/results/runtime_floor.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bridge.commands.bench import _commit as git_commit  # noqa: E402
from bridge.runtime_bench import measure_runtime_overhead  # noqa: E402


class SleepingEngine:
    """`engine(pixels)` that takes `seconds` without using the CPU; `steps` sets the stream-batch lag."""

    def __init__(self, seconds: float, steps: int, size: int) -> None:
        self.seconds = seconds
        self.config = SimpleNamespace(width=size, height=size, mode="img2img", use_denoising_batch=True,
                                      t_index_list=list(range(steps)))
        self._frame = np.zeros((size, size, 3), np.uint8)

    def __call__(self, pixels):
        time.sleep(self.seconds)
        return self._frame


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-ms", type=float, default=100.0, help="the stand-in's time per call")
    parser.add_argument("--frames", type=int, default=200, help="measured frames per step count")
    parser.add_argument("--size", type=int, default=256, help="frame size (input and output, square)")
    parser.add_argument("--source-fps", type=float, default=30.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = []
    for steps in (1, 2):
        engine = SleepingEngine(args.engine_ms / 1000.0, steps, args.size)
        figures = measure_runtime_overhead(engine, frames=args.frames, warmup=5, input_size=(args.size, args.size),
                                           source_fps=args.source_fps)
        results.append({"steps": steps, "engine_stand_in_ms": args.engine_ms, **figures})
        print(f"{steps} step(s): overhead {figures['overhead_ms']:+.2f} ms/frame "
              f"(engine {figures['engine_ms']:.2f} ms, through the runtime {figures['runtime_frame_ms']:.2f} ms); "
              f"latency median/p95 {figures['latency_ms_median']:.1f}/{figures['latency_ms_p95']:.1f} ms, "
              f"budget {figures['latency_budget_ms']:.1f} ms; CPU ms/frame {figures['thread_cpu_ms_per_frame']}")
    if args.json:
        record = {"results": results, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                  "load_average": os.getloadavg(), "commit": git_commit(),
                  "command": " ".join(["python", *sys.argv])}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
