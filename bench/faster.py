"""Which of two `sdbridge bench --json` results ran faster: prints its path.

    python3 bench/faster.py A.json B.json

Compares each file's best frames per second (its pipelined row where it has one); a file that is
missing or unreadable (a run cut by its time limit) loses; a tie goes to the first. bench/gpu_check.sh
uses it to stack inductor's tuning on whichever of fp16 and fp8 was faster on the same machine."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def best_fps(path: Path) -> float:
    """The highest fps among the result rows in `path`; 0.0 when there are none."""
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0.0
    if not isinstance(rows, list):
        return 0.0
    return max((float(row.get("fps") or 0.0) for row in rows if isinstance(row, dict)), default=0.0)


def faster(first: Path, second: Path) -> Path:
    return second if best_fps(second) > best_fps(first) else first


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python3 bench/faster.py A.json B.json")
    print(faster(Path(sys.argv[1]), Path(sys.argv[2])))
