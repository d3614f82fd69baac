"""The host's own time per frame on the step-graph path: everything `engine(frame)` does around the
replay (frame checks, copying the frame in, the prompt's buffers, the state, handing the frame
out), with the replay itself made a no-op. On a CPU, with the CPU replay (StepGraphs
replay="eager"), so it runs anywhere; on a GPU the same Python runs around a CUDA graph, plus the
CUDA calls (copies, events, the launch), which this does not see.

    python3 bench/host_overhead.py [--size 512] [--frames 500] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.commands.bench import _commit  # noqa: E402
from pipeline import StreamConfig, StreamDiffusion, random_components  # noqa: E402
from pipeline.step_graph import StepGraphs  # noqa: E402

CASES = [("none", (30,)), ("self", (10, 20, 30, 40))]  # sd-turbo's 1 step, sd15's 4 steps with RCFG self


def host_microseconds(components, cfg_type: str, t_index_list: tuple, size: int, frames: int) -> float:
    """Mean microseconds per `engine(frame)` for an 8-bit numpy frame, the replay a no-op."""
    config = StreamConfig(width=size, height=size, device="cpu", dtype="float32", t_index_list=t_index_list,
                          cfg_type=cfg_type)
    engine = StreamDiffusion(components, config)
    engine._graphs = StepGraphs(engine, replay="eager")
    engine.warm_up()
    frame = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    engine(frame)
    engine(frame)  # the frames in flight are filled
    for step in engine._graphs._steps.values():
        step.replay = lambda: None
    for _ in range(20):
        engine(frame)
    started = time.perf_counter()
    for _ in range(frames):
        engine(frame)
    return (time.perf_counter() - started) / frames * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    components = random_components("tiny", dtype=torch.float32, device="cpu", seed=0)
    rows = []
    for cfg_type, t_index_list in CASES:
        us = host_microseconds(components, cfg_type, t_index_list, args.size, args.frames)
        rows.append({"cfg_type": cfg_type, "steps": len(t_index_list), "size": args.size,
                     "host_us_per_frame": round(us, 1)})
        print(f"cfg {cfg_type}, {len(t_index_list)} step(s), {args.size}x{args.size}: {us:.0f} us per frame on the host")
    report = {"rows": rows, "frames": args.frames, "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "commit": _commit(), "command": "python3 bench/host_overhead.py " + " ".join(sys.argv[1:])}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
