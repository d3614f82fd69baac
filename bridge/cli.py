"""`sdbridge` command line: one subcommand per module, each with `register(subparsers)`.

Modules are imported here only for their `register`, which must not import torch: the
handlers import what they need when they run, so `sdbridge --help` stays instant.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import os
import signal
import sys
import threading

from .errors import UserError

# subcommand modules, in the order `--help` lists them
COMMAND_MODULES = ("bridge.commands.run", "bridge.commands.demo", "bridge.commands.devices", "bridge.commands.bench", "bridge.commands.build_engines",
                   "bridge.commands.params")


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad flag is one line (what is wrong and where help is), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="sdbridge",
        description="Real-time StreamDiffusion video effect: frames in, diffusion, frames out, OSC control.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("diffusers", "transformers", "urllib3", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


class StopRequested(BaseException):
    """SIGTERM (or Windows' SIGBREAK) before `sdbridge run` installed its own handlers."""


def _stop_early(signum, _frame) -> None:
    raise StopRequested(signum)


def main(argv: list[str] | None = None) -> int:
    # A stop request is a normal way to end: exit 0 even if it comes while Python is still importing.
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGBREAK"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), _stop_early)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        configure_logging(args.verbose, args.quiet)
        try:
            return int(args.handler(args) or 0)
        except UserError as exc:
            print(f"sdbridge {args.command}: error: {exc}", file=sys.stderr)
            return 2
    except StopRequested:
        return 0
    except KeyboardInterrupt:
        return 130


# Set by a command after which the process should end without the interpreter's teardown (see entry).
_skip_teardown = False


def skip_teardown() -> None:
    """Ask `entry` to end the process with os._exit once `main` returned (nothing else changes:
    in-process callers of `main`, such as tests, just get the status back)."""
    global _skip_teardown
    _skip_teardown = True


def entry() -> None:
    """The `sdbridge` command. After `run` (everything already released: sinks, source, ports,
    files) the process ends with os._exit, skipping the interpreter's teardown: native libraries
    can crash in their destructors while a thread of theirs or of ours is still in their code
    (seen in CI: exit status -11 after an NDI run, -6 with a thread still inside torch)."""
    faulthandler.enable()  # a crash in native code (a driver, NDI, torch) prints every thread's Python stack
    status = main()
    if _skip_teardown:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    # `python -m bridge.cli` runs this file as __main__, a second copy of the module: the commands
    # call bridge.cli.skip_teardown(), so entry must be that module's, or the flag is never seen
    # and the interpreter's teardown runs the native destructors os._exit is there to skip
    # (seen: exit -11 after an NDI run, -6 "terminate called without an active exception")
    import bridge.cli

    bridge.cli.entry()
