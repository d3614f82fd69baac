"""The README tells the truth: its parameter table is the one the code serves, its test command
is the one CI runs, and the commands it shows exist."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_parameter_table_is_the_generated_one():
    table = subprocess.run([sys.executable, "-m", "bridge.cli", "params", "--markdown"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert table in README


def test_ci_runs_the_readme_test_command():
    command = re.search(r"^pip install -e '\.\[dev\]' && (python3 -m pytest -q)$", README, re.M)
    assert command, "the README's test command line changed"
    assert command.group(1) in (ROOT / ".ci" / "run").read_text()


def test_every_sdbridge_command_in_the_readme_exists():
    from bridge.cli import build_parser

    commands = set(re.findall(r"^\s*sdbridge ([a-z-]+)", README, re.M))
    parser = build_parser()
    known = set(parser._subparsers._group_actions[0].choices)
    assert commands and commands <= known, commands - known
