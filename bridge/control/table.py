"""The one parameter table: every live control, declared once.

It drives the OSC handlers (router.py), OSCQuery (oscquery.py), `sdbridge params` (text, JSON
for the TouchDesigner/OBS generators, Markdown for the README). Ranges agree with
pipeline.StreamConfig's validation (tests/test_control_table.py checks it).

Targets:
- "engine": written into the ParameterStore under `name`; the runtime applies them between
  frames with engine.update(**values) / engine.set_prompt(...) / engine.set_prompt_blend(...).
- "runtime": actions for the runtime itself (pause, resume, recording stop and start, preset
  recall), never stored.

Conversion (`convert`) is a pure function of the OSC arguments: it accepts what TouchDesigner
and lighting desks send (int, float, double, T/F, numeric strings), refuses NaN/inf, and clamps
numbers to the range (a size out of range is refused instead). Every refusal is a ValueError
that names the parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..frames import FITS
from .osc import IMPULSE

KINDS = ("string", "float", "int", "bool", "int_list", "size", "prompt_blend", "seed_blend", "choice", "trigger", "cue")
INT32_MAX = 2**31 - 1
LIVE_LORA_SLOTS = 4  # /sd/lora/1 .. /sd/lora/4 (pipeline.live_lora.MAX_LIVE_LORAS)
INPUT_FITS = FITS  # pipeline.config.INPUT_FITS (not imported: that loads torch)
MAX_INPUT_ZOOM = 8.0  # pipeline.config.MAX_INPUT_ZOOM, likewise
MAX_NUMERIC_STRING = 64  # a number sent as a string ("0.5") is at most this long


@dataclass(frozen=True)
class Param:
    """One live control. `address` is relative to the prefix (default /sd)."""

    name: str  # the ParameterStore / engine keyword ("engine"), or the action ("runtime")
    address: str  # e.g. "/guidance"; the OSC address is prefix + address
    kind: str  # one of KINDS
    description: str
    target: str = "engine"  # "engine" (stored, applied between frames) or "runtime" (an action)
    minimum: float | None = None  # numbers, list items, blend weights: the clamping range
    maximum: float | None = None
    default: Any = None  # the engine's default (None: none, or derived from other settings)
    unit: str = ""
    aliases: tuple[str, ...] = ()  # absolute addresses StreamDiffusionTD users already send
    fader: bool = False  # also listens on address + "/norm": 0..1 mapped onto minimum..maximum
    max_items: int = 1  # int_list items, prompt_blend and seed_blend pairs
    choices: tuple[str, ...] = ()  # choice: the accepted strings
    max_length: int = 2048  # string: characters

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: {self.kind!r} must be one of {', '.join(KINDS)}")
        if self.target not in ("engine", "runtime"):
            raise ValueError(f"target: {self.target!r} must be 'engine' or 'runtime'")
        if self.fader and (self.minimum is None or self.maximum is None):
            raise ValueError(f"{self.name}: a fader needs a minimum and a maximum")

    @property
    def osc_type(self) -> str:
        """The OSC type tag string advertised (OSCQuery TYPE) for the plain address."""
        if self.kind == "int_list":
            return "i" * len(self.default or (0,))
        return {"string": "s", "float": "f", "int": "i", "bool": "T", "size": "ii", "prompt_blend": "sf",
                "seed_blend": "if", "choice": "s", "trigger": "I", "cue": "i"}[self.kind]


PARAMETERS: tuple[Param, ...] = (
    Param("prompt", "/prompt", "string", "what to turn the input into", aliases=("/prompt",)),
    Param("negative_prompt", "/negative_prompt", "string",
          "what to steer away from (cfg full / initialize)", aliases=("/negative_prompt",)),
    Param("prompt_blend", "/prompt_blend", "prompt_blend",
          "blend of prompts: pairs of (prompt, weight), up to 8; replaces the prompt",
          minimum=0.0, maximum=1.0, max_items=8),
    Param("prompt_blend_method", "/prompt_blend/method", "choice",
          "how blended prompt embeddings are combined", default="linear", choices=("linear", "slerp")),
    Param("prompt_transition", "/prompt_transition", "float",
          "seconds a new prompt or blend takes to fade in from the one shown (eased; 0: at once)",
          minimum=0.0, maximum=60.0, default=0.0, unit="s", fader=True),
    Param("guidance_scale", "/guidance", "float", "CFG scale; guidance is off at 1.0 or below",
          minimum=0.0, maximum=30.0, default=1.2, aliases=("/guidance_scale",), fader=True),
    Param("delta", "/delta", "float", "RCFG residual-noise scale", minimum=0.0, maximum=5.0,
          default=1.0, aliases=("/delta",), fader=True),
    Param("seed", "/seed", "int", "noise seed", minimum=0, maximum=INT32_MAX, default=2,
          aliases=("/seed",), fader=True),
    Param("seed_blend", "/seed_blend", "seed_blend",
          "blend of noise seeds: up to 8 pairs of (seed, weight 0..1); replaces the seed. Moving the "
          "weight from one seed to another morphs the picture where a new seed jumps",
          minimum=0.0, maximum=1.0, max_items=8),
    Param("seed_mix", "/seed_blend/mix", "float",
          "one fader's seed morph: moves the seed blend's weight from its first seed (0) to its second (1); "
          "needs a blend of two seeds first (seed_blend, e.g. in a preset)", minimum=0.0, maximum=1.0, fader=True),
    Param("strength", "/strength", "float",
          "img2img strength: how far from the input (sets the timestep indices)",
          minimum=0.01, maximum=1.0, fader=True),
    Param("t_index_list", "/t_index_list", "int_list",
          "timestep indices, one per denoising step, strictly increasing",
          minimum=0, maximum=49, default=(32, 45), unit="index", aliases=("/t_list",), max_items=16),  # 50 steps
    Param("resolution", "/resolution", "size",
          "processing and output size, width then height (or one string '768x448'); the frames in flight "
          "restart at the new size. tensorrt: sizes built with build-engines; compiled: sizes in --sizes "
          "switch at once, others compile beside the running show first", minimum=64, maximum=2048, unit="px"),
    *(Param(f"lora_{slot}", f"/lora/{slot}", "float",
            f"strength of live LoRA {slot} (--live-lora, counted in the order given; 0 turns it off); "
            "its layers are rewritten in place: nothing compiles",
            minimum=0.0, maximum=2.0, fader=True) for slot in range(1, LIVE_LORA_SLOTS + 1)),
    Param("input_fit", "/input_fit", "choice",
          "a source of another aspect ratio than the processing size: its middle cropped to fill it (crop), "
          "shown whole on black bars (letterbox), or stretched", default="crop", choices=INPUT_FITS),
    Param("input_zoom", "/input_zoom", "float",
          "digital zoom into the source: 2 takes half of the fitted picture's width and height", minimum=1.0,
          maximum=MAX_INPUT_ZOOM, default=1.0, fader=True),
    Param("input_pan_x", "/input_pan_x", "float",
          "where the part of the source taken sits across it: -1 its left edge, 0 the middle, 1 its right edge "
          "(moves a crop of a wider source, or a zoomed part)", minimum=-1.0, maximum=1.0, default=0.0, fader=True),
    Param("input_pan_y", "/input_pan_y", "float",
          "likewise down the source: -1 its top edge, 0 the middle, 1 its bottom edge", minimum=-1.0, maximum=1.0,
          default=0.0, fader=True),
    Param("similarity_filter", "/similarity/enable", "bool",
          "skip frames nearly equal to the last processed one", default=False),
    Param("similarity_threshold", "/similarity/threshold", "float",
          "cosine similarity above which frames may be skipped", minimum=0.0, maximum=0.999,
          default=0.98, fader=True),
    Param("similarity_max_skip", "/similarity/max_skip", "int", "most consecutive frames skipped",
          minimum=0, maximum=10_000, default=10, unit="frames", fader=True),
    Param("pause", "/pause", "trigger", "freeze the output on the last frame (a 0 / F argument is ignored)",
          target="runtime"),
    Param("resume", "/resume", "trigger", "continue after pause (a 0 / F argument is ignored)",
          target="runtime"),
    Param("record_stop", "/record/stop", "trigger",
          "finish the files the file sinks are recording; the other sinks go on (a 0 / F argument is ignored)",
          target="runtime"),
    Param("record_start", "/record/start", "trigger",
          "file sinks stopped by /record/stop start new files, numbered beside the others (a 0 / F argument is "
          "ignored)", target="runtime"),
    Param("preset", "/preset", "cue", "recall a numbered parameter set from the config file",
          target="runtime", minimum=0, maximum=INT32_MAX),
)

BY_NAME = {param.name: param for param in PARAMETERS}
ENGINE_NAMES = tuple(p.name for p in PARAMETERS if p.target == "engine")
RUNTIME_NAMES = tuple(p.name for p in PARAMETERS if p.target == "runtime")


def addresses(prefix: str = "/sd", *, aliases: bool = True) -> dict[str, tuple[Param, bool]]:
    """Every OSC address -> (parameter, normalized); `/norm` forms and aliases included."""
    table: dict[str, tuple[Param, bool]] = {}
    for param in PARAMETERS:
        table[prefix + param.address] = (param, False)
        if param.fader:
            table[prefix + param.address + "/norm"] = (param, True)
    if aliases:
        for param in PARAMETERS:
            for alias in param.aliases:
                table.setdefault(alias, (param, False))
    return table


def check_prefix(prefix: str) -> str:
    """The prefix, validated: '/word[/word...]' of letters, digits, '_', '-', '.'; '' for none."""
    if prefix == "":
        return prefix
    parts = prefix.split("/")
    if parts[0] != "" or len(prefix) > 64 or not all(
        part and all(c.isascii() and (c.isalnum() or c in "_-.") for c in part) for part in parts[1:]
    ):
        raise ValueError(f"osc_prefix: {prefix!r} must look like /sd (letters, digits, _ - . between slashes)")
    return prefix


# ---------------------------------------------------------------------------- conversion


class Ignored(Exception):
    """A message that is understood and deliberately does nothing (a trigger's 0 / release)."""


def convert(param: Param, args: tuple, *, normalized: bool = False) -> Any:
    """The value to store (or the action's argument) from OSC arguments; ValueError naming the
    parameter when they cannot be used, Ignored for a trigger's release."""
    if normalized:
        return _from_fader(param, _single(param, args))
    if param.kind == "string":
        return _string(param, _single(param, args))
    if param.kind in ("float", "int"):
        return _clamped_number(param, _number(param, _single(param, args)))
    if param.kind == "bool":
        return _boolean(param, _single(param, args))
    if param.kind == "int_list":
        return _int_list(param, args)
    if param.kind == "size":
        return _size(param, args)
    if param.kind == "prompt_blend":
        return _prompt_blend(param, args)
    if param.kind == "seed_blend":
        return _seed_blend(param, args)
    if param.kind == "choice":
        value = _string(param, _single(param, args)).strip().lower()
        if value not in param.choices:
            raise ValueError(f"{param.name}: {value[:40]!r} must be one of {', '.join(param.choices)}")
        return value
    if param.kind == "trigger":
        if not args or args[0] is IMPULSE or args[0] is None or _boolean(param, args[0]):
            return True
        raise Ignored
    return _whole(param, _number(param, _single(param, args)))  # cue


def _single(param: Param, args: tuple) -> Any:
    if len(args) != 1:
        raise ValueError(f"{param.name}: expects one argument, got {len(args)}")
    return args[0]


def _string(param: Param, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{param.name}: expects a string, got {type(value).__name__}")
    if len(value) > param.max_length:
        raise ValueError(f"{param.name}: {len(value)} characters exceed {param.max_length}")
    return value


def _number(param: Param, value: Any) -> float | int:
    """int, float, T/F or a numeric string, finite."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if len(text) > MAX_NUMERIC_STRING:
            raise ValueError(f"{param.name}: {text[:20]!r}... is not a number")
        try:
            value = int(text) if text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise ValueError(f"{param.name}: {text!r} is not a number") from None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{param.name}: {value!r} is not a finite number")
        return value
    raise ValueError(f"{param.name}: expects a number, got {type(value).__name__}")


def _whole(param: Param, value: float | int) -> int:
    """Floats round to the nearest integer (faders send 12.0 or 12.4 for integer settings)."""
    return value if isinstance(value, int) else int(round(value))


def _clamped_number(param: Param, value: float | int) -> float | int:
    low, high = param.minimum, param.maximum
    if param.kind == "int":
        value = _whole(param, value)
        return int(min(max(value, low), high))
    return float(min(max(float(value), low), high))


def _from_fader(param: Param, value: Any) -> float | int:
    if not param.fader:
        raise ValueError(f"{param.name}: has no /norm form")
    position = min(max(float(_number(param, value)), 0.0), 1.0)
    return _clamped_number(param, param.minimum + position * (param.maximum - param.minimum))


def _boolean(param: Param, value: Any) -> bool:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "true", "on", "yes"):
            return True
        if text in ("0", "false", "off", "no"):
            return False
        raise ValueError(f"{param.name}: {text[:20]!r} is not on/off")
    return _number(param, value) != 0


def _int_list(param: Param, args: tuple) -> tuple[int, ...]:
    """Integers as separate arguments, or one string "32,45" / "32 45"; clamped, strictly increasing."""
    if len(args) == 1 and isinstance(args[0], str):
        if len(args[0]) > param.max_items * 8:
            raise ValueError(f"{param.name}: string too long for {param.max_items} indices")
        args = tuple(args[0].replace(",", " ").split())
    if not 1 <= len(args) <= param.max_items:
        raise ValueError(f"{param.name}: expects 1 to {param.max_items} integers, got {len(args)}")
    low, high = int(param.minimum), int(param.maximum)
    values = tuple(min(max(_whole(param, _number(param, item)), low), high) for item in args)
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{param.name}: {list(values)} must be strictly increasing")
    return values


def _size(param: Param, args: tuple) -> tuple[int, int]:
    """Width and height as two numbers, or one string "768x448" / "768 448"; whole numbers in
    range, never clamped (a size other than the one asked for is a different picture)."""
    if len(args) == 1 and isinstance(args[0], str):
        if len(args[0]) > 24:
            raise ValueError(f"{param.name}: string too long for a size")
        args = tuple(args[0].lower().replace("x", " ").replace(",", " ").split())
    if len(args) != 2:
        raise ValueError(f"{param.name}: expects a width and a height, got {len(args)} value(s)")
    values = tuple(_whole(param, _number(param, item)) for item in args)
    for side, value in zip(("width", "height"), values):
        if not param.minimum <= value <= param.maximum:
            raise ValueError(f"{param.name}: {side} {value} is outside {param.minimum:g}..{param.maximum:g}")
    return values


def _prompt_blend(param: Param, args: tuple) -> tuple[tuple[str, float], ...]:
    """Pairs (prompt, weight); weights clamped to 0..1, at least one above 0."""
    if not args or len(args) % 2 or len(args) // 2 > param.max_items:
        raise ValueError(f"{param.name}: expects 1 to {param.max_items} (prompt, weight) pairs, got {len(args)} arguments")
    pairs = []
    for text, weight in zip(args[::2], args[1::2]):
        number = float(_number(param, weight))
        pairs.append((_string(param, text), min(max(number, param.minimum), param.maximum)))
    if not any(weight > 0 for _, weight in pairs):
        raise ValueError(f"{param.name}: at least one weight must be above 0")
    return tuple(pairs)


def _seed_blend(param: Param, args: tuple) -> tuple[tuple[int, float], ...]:
    """Pairs (seed, weight); seeds whole numbers in 0..INT32_MAX (refused outside: another seed
    is another picture), weights clamped to 0..1, at least one above 0."""
    if not args or len(args) % 2 or len(args) // 2 > param.max_items:
        raise ValueError(f"{param.name}: expects 1 to {param.max_items} (seed, weight) pairs, "
                         f"got {len(args)} arguments")
    pairs = []
    for seed, weight in zip(args[::2], args[1::2]):
        whole = _whole(param, _number(param, seed))
        if not 0 <= whole <= INT32_MAX:
            raise ValueError(f"{param.name}: seed {whole} is outside 0..{INT32_MAX}")
        number = float(_number(param, weight))
        pairs.append((whole, min(max(number, param.minimum), param.maximum)))
    if not any(weight > 0 for _, weight in pairs):
        raise ValueError(f"{param.name}: at least one weight must be above 0")
    return tuple(pairs)


def check_presets(presets: dict) -> dict[int, dict[str, Any]]:
    """Presets from a config file ({cue: {name: value}}), validated strictly (no clamping
    surprises at show time: an out-of-range value is an error here, naming cue and field)."""
    checked: dict[int, dict[str, Any]] = {}
    for cue, values in (presets or {}).items():
        try:
            number = int(cue)
        except (TypeError, ValueError):
            raise ValueError(f"presets: cue {cue!r} is not an integer") from None
        if not isinstance(values, dict) or not values:
            raise ValueError(f"presets.{number}: must be a non-empty table of parameter values")
        if number in checked:
            raise ValueError(f"presets: cue {cue!r} is cue {number} again")
        for pair in (("strength", "t_index_list"), ("prompt", "prompt_blend"), ("seed", "seed_blend")):
            if set(pair) <= values.keys():  # two views of one setting: which would win is not what was meant
                raise ValueError(f"presets.{number}: give {pair[0]} or {pair[1]}, not both")
        checked[number] = {name: _preset_value(number, name, value) for name, value in values.items()}
    return checked


def _preset_value(cue: int, name: str, value: Any) -> Any:
    param = BY_NAME.get(name)
    if param is None or param.target != "engine":
        raise ValueError(f"presets.{cue}.{name}: unknown parameter; known: {', '.join(ENGINE_NAMES)}")
    if param.kind in ("prompt_blend", "seed_blend") and isinstance(value, (list, tuple)):
        args = tuple(item for pair in value for item in pair)
    else:
        args = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    try:
        converted = convert(param, args)
    except ValueError as exc:
        reason = str(exc).removeprefix(f"{name}: ")
        raise ValueError(f"presets.{cue}.{name}: {value!r}: {reason}") from None
    if param.kind in ("float", "int") and converted != value:
        raise ValueError(f"presets.{cue}.{name}: {value!r} is outside {param.minimum:g}..{param.maximum:g}")
    given = args[0].replace(",", " ").split() if len(args) == 1 and isinstance(args[0], str) else args
    if param.kind == "int_list" and [float(item) for item in given] != [float(item) for item in converted]:
        raise ValueError(f"presets.{cue}.{name}: {value!r} has an index outside {param.minimum:g}..{param.maximum:g}")
    if param.kind in ("prompt_blend", "seed_blend") and [weight for _, weight in converted] != list(args[1::2]):
        raise ValueError(f"presets.{cue}.{name}: {value!r} has a weight outside {param.minimum:g}..{param.maximum:g}")
    return converted
