"""The parameter table (JSON of `sdbridge params --json`) as TouchDesigner parameters and OSC.

    table = load_table(json_text)
    plan = parameter_page(table)              # TDPar specs the setup script appends, in order
    messages = osc_messages(table, "Guidancescale", 2.5)   # [("/sd/guidance", [2.5])]

TouchDesigner custom parameter names are a capital letter followed by lower-case letters and
digits, so `guidance_scale` becomes `Guidancescale` (`td_name`). Values are sent as the Python
types the OSC Out DAT's sendOSC() encodes: int -> i, float -> f, str -> s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

STYLES = ("Str", "Float", "Int", "Toggle", "Pulse", "Menu")
TEXT_KINDS = ("string", "int_list", "size", "prompt_blend", "seed_blend")  # a Str parameter
BLEND_SEPARATOR = "|"  # prompt_blend as text: "a castle:0.7 | a forest:0.3"; seed_blend: "2:0.7 | 9:0.3"


@dataclass(frozen=True)
class Spec:
    """One entry of the parameter table, as `sdbridge params --json` prints it."""

    name: str  # the bridge's parameter name, e.g. guidance_scale
    address: str  # full OSC address, e.g. /sd/guidance
    kind: str  # string, float, int, bool, int_list, size, prompt_blend, seed_blend, choice, trigger, cue
    description: str = ""
    norm_address: str | None = None  # the 0..1 fader form, when there is one
    minimum: float | None = None
    maximum: float | None = None
    default: Any = None
    choices: tuple[str, ...] = ()
    max_items: int = 1
    target: str = "engine"  # engine (a stored value) or runtime (an action)


@dataclass(frozen=True)
class Table:
    specs: tuple[Spec, ...]
    osc_port: int  # the bridge's default OSC port
    prefix: str  # address prefix, e.g. /sd

    def by_name(self, name: str) -> Spec:
        for spec in self.specs:
            if spec.name == name:
                return spec
        raise KeyError(f"{name}: not in the parameter table")


@dataclass(frozen=True)
class TDPar:
    """One custom parameter for the setup script to append (Page.append<style>)."""

    name: str  # TouchDesigner name: Capital + lower-case letters and digits
    label: str
    style: str  # one of STYLES
    spec: str | None = None  # the table entry it sends, None for the component's own settings
    default: Any = None
    minimum: float | None = None  # slider range (normMin/normMax) and clamp
    maximum: float | None = None
    menu: tuple[str, ...] = ()
    help: str = ""
    sends: bool = True  # False: a value read by a pulse (the cue number), not sent on change
    read_only: bool = False


def load_table(source: str | dict) -> Table:
    """The table from `sdbridge params --json` output (text or parsed); ValueError naming what is wrong."""
    try:
        data = json.loads(source) if isinstance(source, str) else source
        osc, rows = data["osc"], data["parameters"]
        specs = tuple(
            Spec(name=row["name"], address=row["address"], kind=row["kind"], description=row.get("description", ""),
                 norm_address=row.get("norm_address"), minimum=row.get("min"), maximum=row.get("max"),
                 default=tuple(row["default"]) if isinstance(row.get("default"), list) else row.get("default"),
                 choices=tuple(row.get("choices") or ()), max_items=int(row.get("max_items") or 1),
                 target=row.get("target", "engine"))
            for row in rows)
        table = Table(specs=specs, osc_port=int(osc["port"]), prefix=str(osc["prefix"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"parameter table: not the JSON of `sdbridge params --json` ({type(exc).__name__}: {exc})") from None
    if not specs:
        raise ValueError("parameter table: no parameters")
    return table


def td_name(name: str, suffix: str = "") -> str:
    """guidance_scale -> Guidancescale (TouchDesigner: a capital, then lower-case letters and digits)."""
    letters = "".join(c for c in (name + suffix).lower() if c.isascii() and c.isalnum())
    if not letters or not letters[0].isalpha():
        raise ValueError(f"{name!r}: cannot make a TouchDesigner parameter name of it")
    return letters[0].upper() + letters[1:]


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


def parameter_page(table: Table) -> list[TDPar]:
    """The 'Parameters' page: one or two TouchDesigner parameters per table entry."""
    page: list[TDPar] = []
    for spec in table.specs:
        name, label = td_name(spec.name), _label(spec.name)
        if spec.kind in TEXT_KINDS:
            default = ",".join(str(v) for v in spec.default) if isinstance(spec.default, tuple) else (spec.default or "")
            help_text = spec.description + {
                "prompt_blend": f" (as text: 'prompt:weight {BLEND_SEPARATOR} prompt:weight')",
                "seed_blend": f" (as text: 'seed:weight {BLEND_SEPARATOR} seed:weight', "
                              f"e.g. '2:0.7 {BLEND_SEPARATOR} 9:0.3')",
                "size": " (as text: '768x432'; empty: the size the bridge started with)",
            }.get(spec.kind, "")
            page.append(TDPar(name, label, "Str", spec.name, default=default, help=help_text))
        elif spec.kind in ("float", "int"):
            style = "Float" if spec.kind == "float" else "Int"
            default = spec.default if spec.default is not None else spec.maximum
            page.append(TDPar(name, label, style, spec.name, default=default, minimum=spec.minimum,
                              maximum=spec.maximum, help=spec.description))
        elif spec.kind == "bool":
            page.append(TDPar(name, label, "Toggle", spec.name, default=bool(spec.default), help=spec.description))
        elif spec.kind == "choice":
            page.append(TDPar(name, label, "Menu", spec.name, default=spec.default or spec.choices[0],
                              menu=spec.choices, help=spec.description))
        elif spec.kind == "trigger":
            page.append(TDPar(name, label, "Pulse", spec.name, help=spec.description))
        elif spec.kind == "cue":
            page.append(TDPar(name, label, "Int", spec.name, default=0, minimum=spec.minimum, maximum=spec.maximum,
                              help=spec.description, sends=False))
            page.append(TDPar(td_name(spec.name, "recall"), f"Recall {label.lower()}", "Pulse", spec.name,
                              help=f"send {spec.address} with the number above"))
        else:
            raise ValueError(f"{spec.name}: kind {spec.kind!r} has no TouchDesigner parameter; add it to table.py")
    return page


def osc_messages(table: Table, par: TDPar | str, value: Any, *, page: list[TDPar] | None = None) -> list[tuple[str, list]]:
    """The OSC messages for TouchDesigner parameter `par` now holding `value` ([] when nothing is sent).

    For the cue's Recall pulse, `value` is the cue number. ValueError (naming the parameter) when
    the text of a list or blend parameter cannot be read."""
    if isinstance(par, str):
        par = _find(page if page is not None else parameter_page(table), par)
    if par.spec is None or not par.sends:
        return []
    spec = table.by_name(par.spec)
    arguments = _arguments(spec, value)
    return [] if arguments is None else [(spec.address, arguments)]


def _find(page: list[TDPar], name: str) -> TDPar:
    for par in page:
        if par.name == name:
            return par
    raise KeyError(f"{name}: not a parameter of the sdbridge component")


def _arguments(spec: Spec, value: Any) -> list | None:
    if spec.kind in ("string", "choice"):
        return [str(value)]
    if spec.kind == "float":
        return [float(value)]
    if spec.kind in ("int", "cue"):
        return [int(round(float(value)))]
    if spec.kind == "bool":
        return [1 if value else 0]
    if spec.kind == "trigger":
        return [1]
    if spec.kind == "int_list":
        return parse_int_list(spec, value)
    if spec.kind == "size":
        return parse_size(spec, value)
    if spec.kind == "prompt_blend":
        return parse_prompt_blend(spec, value)
    if spec.kind == "seed_blend":
        return parse_seed_blend(spec, value)
    raise ValueError(f"{spec.name}: kind {spec.kind!r} is not handled")


def parse_int_list(spec: Spec, text: Any) -> list[int]:
    """'32,45' or '32 45' -> [32, 45]."""
    items = str(text).replace(",", " ").split()
    try:
        values = [int(item) for item in items]
    except ValueError:
        raise ValueError(f"{spec.name}: {str(text)[:40]!r} must be whole numbers separated by commas, e.g. 32,45") from None
    if not 1 <= len(values) <= spec.max_items:
        raise ValueError(f"{spec.name}: expects 1 to {spec.max_items} numbers, got {len(values)}")
    return values


def parse_size(spec: Spec, text: Any) -> list[int] | None:
    """'768x432' (or '768,432', '768 432') -> [768, 432]; '' -> None (nothing sent)."""
    items = str(text).lower().replace("x", " ").replace(",", " ").split()
    if not items:
        return None
    try:
        values = [int(item) for item in items]
    except ValueError:
        values = []
    if len(values) != 2:
        raise ValueError(f"{spec.name}: {str(text)[:40]!r} must be a width and a height, e.g. 768x432")
    return values


def _blend_parts(spec: Spec, text: Any, noun: str) -> list[str] | None:
    """The 'x:weight | y:weight' text's parts, stripped; None when there are none."""
    parts = [part.strip() for part in str(text).split(BLEND_SEPARATOR) if part.strip()]
    if len(parts) > spec.max_items:
        raise ValueError(f"{spec.name}: at most {spec.max_items} {noun}, got {len(parts)}")
    return parts or None


def parse_prompt_blend(spec: Spec, text: Any) -> list | None:
    """'a castle:0.7 | a forest:0.3' -> ['a castle', 0.7, 'a forest', 0.3]; '' -> None (nothing sent)."""
    arguments: list = []
    for part in _blend_parts(spec, text, "prompts") or ():
        prompt, separator, weight = part.rpartition(":")
        try:
            number = float(weight) if separator else None
        except ValueError:
            number = None
        if number is None or not prompt.strip():
            raise ValueError(f"{spec.name}: {part[:40]!r} must be 'prompt:weight', e.g. 'a castle:0.7'")
        arguments += [prompt.strip(), number]
    return arguments or None


def parse_seed_blend(spec: Spec, text: Any) -> list | None:
    """'2:0.7 | 9:0.3' -> [2, 0.7, 9, 0.3]; '' -> None (nothing sent)."""
    arguments: list = []
    for part in _blend_parts(spec, text, "seeds") or ():
        seed, separator, weight = part.partition(":")
        try:
            if not separator:
                raise ValueError(part)
            arguments += [int(seed), float(weight)]
        except ValueError:
            raise ValueError(f"{spec.name}: {part[:40]!r} must be 'seed:weight', e.g. '2:0.7'") from None
    return arguments or None


def snapshot_messages(table: Table, values: dict[str, Any], *, page: list[TDPar] | None = None) -> list[tuple[str, list]]:
    """Every value worth restoring after the bridge (re)starts: stored parameters with a default,
    non-empty texts; never actions (pause, preset). `values` maps TouchDesigner names to values."""
    messages: list[tuple[str, list]] = []
    for par in page if page is not None else parameter_page(table):
        if par.spec is None or par.style == "Pulse" or not par.sends or par.name not in values:
            continue
        spec = table.by_name(par.spec)
        if spec.target != "engine":
            continue
        if spec.kind in TEXT_KINDS and not str(values[par.name]).strip():
            continue
        if spec.kind not in ("string", "prompt_blend", "seed_blend") and spec.default is None:
            continue  # e.g. strength: sent when changed, never forced over the configured steps
        messages += osc_messages(table, par, values[par.name])
    return messages
