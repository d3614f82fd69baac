"""`sdbridge devices`: GPU, TensorRT, Spout, NDI, virtual camera: available here, or why not."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("devices", help="what this machine can use, and why not where not")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from ..devices import report

    for name, available, detail in report():
        print(f"{name + ':':16} {'yes' if available else 'no '}  {detail}")
    return 0
