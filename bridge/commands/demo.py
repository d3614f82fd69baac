"""`sdbridge demo`: the test pattern through the tiny random-weight model into a short mp4.

Needs no GPU and no download; prints what ran and how fast. Extra sinks (a virtual camera, NDI)
can be added with --sink.
"""

from __future__ import annotations

import argparse

DEFAULTS = dict(source="testpattern?width=320&height=240", model="random:tiny", width=256, height=256,
                fps=15.0, duration=5.0, prompt="a watercolor city at night", device="cpu", osc=False)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="a short run that works anywhere: test pattern, tiny random model, mp4 out",
        description="Test pattern in, tiny random-weight model (no download, CPU), a short mp4 out, and a summary.",
    )
    parser.add_argument("--output", default="sdbridge-demo.mp4", help="the mp4 to write, replaced if it exists (default sdbridge-demo.mp4)")
    parser.add_argument("--sink", action="append", help="another sink as well, e.g. virtualcam or ndi:sdbridge")
    parser.add_argument("--duration", type=float, help=f"seconds to run (default {DEFAULTS['duration']:g})")
    parser.add_argument("--fps", type=float, help=f"output frames per second (default {DEFAULTS['fps']:g})")
    parser.add_argument("--no-status", dest="status", action="store_const", const=False, help="no status line")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from ..cli import skip_teardown
    from ..session import format_summary, run_session
    from .run import settings_from_args

    args.sink = [f"file:{args.output}?overwrite=1"] + list(args.sink or [])  # (a demo's file, not a show's)
    settings = settings_from_args(args, **DEFAULTS)
    summary = run_session(settings)
    skip_teardown()  # everything is released: end without library destructors (see bridge.cli.entry)
    if summary.get("state") == "interrupted":
        return 0
    print(f"demo: {settings.source} -> {settings.model} {settings.width}x{settings.height} on {settings.device} "
          f"-> {', '.join(settings.sink)}")
    print(format_summary(summary))
    print(f"wrote {args.output}")
    return 0
