"""`sdbridge params`: the live parameter table (text, --json for generators, --markdown for the README)."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "params", help="list the live parameters and their OSC addresses",
        description="The parameters that OSC (and OSCQuery) can change while `sdbridge run` runs.",
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="machine-readable, for the TouchDesigner/OBS generators")
    form.add_argument("--markdown", action="store_true", help="a Markdown table, as in the README")
    parser.add_argument("--osc-prefix", dest="osc_prefix", default="/sd", help="address prefix (default /sd)")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from ..control.table import check_prefix
    from ..errors import UserError

    try:
        prefix = check_prefix(args.osc_prefix)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps(as_json(prefix), indent=2))
    elif args.markdown:
        print(as_markdown(prefix))
    else:
        print(as_text(prefix))
    return 0


def _range(param) -> str:
    if param.choices:
        return " / ".join(param.choices)
    if param.minimum is None:
        return ""
    low, high = param.minimum, param.maximum
    return f"{low} .. {high}" if isinstance(low, int) and isinstance(high, int) else f"{low:g} .. {high:g}"


def _default(param) -> str:
    if param.default is None:
        return ""
    if isinstance(param.default, tuple):
        return ",".join(str(v) for v in param.default)
    return str(param.default)


def _address(param, prefix: str) -> str:
    return f"{prefix}{param.address} {param.osc_type}" + (f" (+ {prefix}{param.address}/norm f)" if param.fader else "")


def as_json(prefix: str = "/sd") -> dict:
    from ..control import DEFAULT_BIND, DEFAULT_OSC_PORT
    from ..control.table import PARAMETERS

    return {
        "osc": {"port": DEFAULT_OSC_PORT, "bind": DEFAULT_BIND, "prefix": prefix, "oscquery_port": DEFAULT_OSC_PORT + 1},
        "parameters": [
            {"name": p.name, "address": prefix + p.address, "norm_address": prefix + p.address + "/norm" if p.fader else None,
             "aliases": list(p.aliases), "kind": p.kind, "osc_type": p.osc_type, "min": p.minimum, "max": p.maximum,
             "default": list(p.default) if isinstance(p.default, tuple) else p.default, "unit": p.unit,
             "choices": list(p.choices), "max_items": p.max_items, "target": p.target, "description": p.description}
            for p in PARAMETERS
        ],
    }


def as_markdown(prefix: str = "/sd") -> str:
    from ..control.table import PARAMETERS

    lines = ["| parameter | OSC address | range | default | unit | description |", "|---|---|---|---|---|---|"]
    for p in PARAMETERS:
        aliases = "".join(f"<br>alias `{a}`" for a in p.aliases)
        norm = f"<br>`{prefix}{p.address}/norm f` (0..1)" if p.fader else ""
        lines.append(f"| `{p.name}` | `{prefix}{p.address} {p.osc_type}`{norm}{aliases} | {_range(p)} | {_default(p)} "
                     f"| {p.unit} | {p.description} |")
    return "\n".join(lines)


def as_text(prefix: str = "/sd") -> str:
    from ..control.table import PARAMETERS

    rows = [("parameter", "OSC address", "range", "default", "description")]
    rows += [(p.name, _address(p, prefix), _range(p), _default(p), p.description) for p in PARAMETERS]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4] for row in rows)
