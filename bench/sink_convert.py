"""What fitting the engine's picture into a sink of another size or pixel format costs the output
thread, per frame (`bridge.frames.convert`, as the runtime calls it once per frame and sink):
e.g. `--sink "virtualcam?size=1280x720&fit=crop"` from a 512x512 engine, with each `filter`.
CPU only, one thread (as each sink's lane runs it): nearest is numpy's, bilinear Pillow's.

    python3 bench/sink_convert.py [--size 512] [--frames 200] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bridge.commands.bench import _commit  # noqa: E402
from bridge.frames import FILTERS, Frame, FrameFormat, convert  # noqa: E402

SINKS = [  # (width, height, pixel format, fit): what a webcam, a recording or a sender asks for
    (1280, 720, "RGB", "letterbox"), (1280, 720, "RGB", "crop"), (1920, 1080, "RGB", "letterbox"),
    (1920, 1080, "RGB", "crop"), (1280, 720, "BGRA", "letterbox"), (256, 256, "RGB", "stretch"),
    (None, None, "BGRA", "stretch"),
]


def convert_ms(size: int, sink: tuple, scaling: str, frames: int) -> dict:
    """Median and 95th percentile milliseconds of one `convert` of a size x size RGB frame."""
    width, height, pixel_format, fit = sink
    target = FrameFormat(width or size, height or size, pixel_format)
    frame = Frame(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    for _ in range(5):
        convert(frame, target, fit=fit, filter=scaling)
    times = []
    for _ in range(frames):
        started = time.perf_counter()
        convert(frame, target, fit=fit, filter=scaling)
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"sink": f"{target} {fit}", "filter": scaling, "median_ms": round(statistics.median(times), 3),
            "p95_ms": round(times[int(len(times) * 0.95) - 1], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="the engine's square picture")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [convert_ms(args.size, sink, scaling, args.frames) for sink in SINKS for scaling in FILTERS]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "commit": _commit(), "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "numpy": np.__version__, "pillow": PIL.__version__,
            "engine_size": args.size, "frames": args.frames,
            "command": "python3 " + " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    print(f"{args.size}x{args.size} RGB into        filter     median ms   p95 ms")
    for row in rows:
        print(f"{row['sink']:<28} {row['filter']:<10} {row['median_ms']:>8.2f} {row['p95_ms']:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
