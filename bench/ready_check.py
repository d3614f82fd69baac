"""A new step count compiled beside a running show, as `sdbridge run` does with the compiled
backend: frames at 60 fps through the runtime, then /sd/t_index_list set to a step count that was
not readied at start. Reports how long readying took, how many frames the show made meanwhile
(at the old step count), and the largest gaps between frames while it compiled and at the switch
(where the new step graph is captured). Writes JSON; exits 1 when the change did not land.

    python3 bench/ready_check.py --json OUT.json [--arch sd-turbo] [--size 512] [--steps 1] [--to-steps 2]
        [--no-fuse-math]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.commands.bench import _commit  # noqa: E402
from bridge.benchmarking import device_name  # noqa: E402
from bridge.runtime_bench import measure_ready_beside  # noqa: E402
from pipeline import StreamConfig, StreamDiffusion, random_components  # noqa: E402
from pipeline.config import t_index_list_from_strength  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd-turbo")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1, help="denoising steps at start")
    parser.add_argument("--to-steps", type=int, default=2, help="the step count switched to mid-show")
    parser.add_argument("--cfg", default="self")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fuse-math", action=argparse.BooleanOptionalAction, default=None,
                        help="the step's arithmetic compiled too, readied beside (default: the backend's, on CUDA yes)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    started = time.perf_counter()
    config = StreamConfig(width=args.size, height=args.size, device=args.device, dtype=dtype, cfg_type=args.cfg,
                          t_index_list=t_index_list_from_strength(0.6, args.steps, 50), guidance_scale=1.2)
    components = random_components(args.arch, dtype=dtype, device=args.device, seed=0)
    options = {"fuse_math": args.fuse_math} if args.fuse_math is not None else {}
    engine = StreamDiffusion(components, config, backend="compiled", backend_options=options)
    engine.set_prompt("a photograph of a city street at night, neon lights", negative_prompt="blurry")
    target = list(t_index_list_from_strength(0.6, args.to_steps, 50))
    result = measure_ready_beside(engine, "t_index_list", target, input_size=(args.size, args.size))
    report = {"arch": args.arch, "size": args.size, "steps": args.steps, "to_steps": args.to_steps, "cfg": args.cfg,
              "fuse_math": engine._math.fused,
              "device": device_name(torch.device(args.device)), "torch": torch.__version__, "commit": _commit(),
              "command": "python3 bench/ready_check.py " + " ".join(sys.argv[1:]), **result,
              "seconds": round(time.perf_counter() - started, 1)}
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0 if result["applied"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
