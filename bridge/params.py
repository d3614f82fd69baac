"""The parameter store: where the control plane (OSC, the CLI) writes, and the inference thread reads.

Writers call `set(name, value)` from any thread; the newest value per name wins and earlier
unapplied ones are dropped. Between two frames the inference thread calls `take()` for every
pending change at once and applies them to the engine, then `report_applied` / `report_rejected`
with the result; listeners (the control plane's replies, the status line) hear about both.
Values are checked for type here; ranges are the engine's to check (its ValueError names the
field and becomes the rejection message).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parameter:
    """One live parameter of the engine."""

    name: str  # the engine.update keyword (or "prompt" / "negative_prompt" for set_prompt)
    kind: type  # str, float, int, bool or tuple (a list of ints)
    description: str


PARAMETERS = {
    p.name: p
    for p in (
        Parameter("prompt", str, "what to turn the input into"),
        Parameter("negative_prompt", str, "what to steer away from (cfg full / initialize)"),
        Parameter("guidance_scale", float, "CFG scale; off at 1.0 or below"),
        Parameter("delta", float, "RCFG residual-noise scale"),
        Parameter("seed", int, "noise seed"),
        Parameter("strength", float, "img2img strength in (0, 1]: how far from the input"),
        Parameter("t_index_list", tuple, "timestep indices, one per denoising step"),
        Parameter("similarity_filter", bool, "skip frames nearly equal to the last one"),
        Parameter("similarity_threshold", float, "cosine similarity above which frames may be skipped"),
        Parameter("similarity_max_skip", int, "most consecutive frames skipped"),
    )
}
PROMPT_NAMES = ("prompt", "negative_prompt")


def coerce(name: str, value: Any) -> Any:
    """`value` as the parameter's type; ValueError naming the parameter when it cannot be."""
    if name not in PARAMETERS:
        raise ValueError(f"{name}: unknown parameter; known: {', '.join(PARAMETERS)}")
    kind = PARAMETERS[name].kind
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "on", "off", "yes", "no"):
                    raise TypeError
                return value.lower() in ("1", "true", "on", "yes")
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise TypeError
        if kind is tuple:
            items = value.replace(",", " ").split() if isinstance(value, str) else value
            return tuple(_whole(v) for v in items)
        if kind is int:
            return _whole(value)
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is not a valid {kind.__name__}") from None


def _whole(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise TypeError
    return int(value)


class ParameterStore:
    """Thread-safe latest-value-per-name store of pending engine parameter changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._applied: dict[str, Any] = {}  # the values the engine last accepted
        self._rejected: dict[str, tuple[Any, str]] = {}  # name -> (value, reason) of the last refusal
        self._listeners: list[Callable[[str, Any, str | None], None]] = []

    def set(self, name: str, value: Any) -> None:
        """Queue `value` for the next frame; ValueError (naming the parameter) for a wrong type."""
        value = coerce(name, value)
        with self._lock:
            self._pending[name] = value

    def update(self, values: dict[str, Any]) -> None:
        """Several values at once, applied together (all are type-checked before any is queued)."""
        checked = {name: coerce(name, value) for name, value in values.items()}
        with self._lock:
            self._pending.update(checked)

    def take(self) -> dict[str, Any]:
        """Every pending change (newest per name), removing them; {} when none."""
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def report_applied(self, values: dict[str, Any]) -> None:
        with self._lock:
            self._applied.update(values)
            for name in values:
                self._rejected.pop(name, None)
            listeners = list(self._listeners)
        for name, value in values.items():
            self._notify(listeners, name, value, None)

    def report_rejected(self, name: str, value: Any, reason: str) -> None:
        log.warning("parameter %s=%r rejected: %s", name, value, reason)
        with self._lock:
            self._rejected[name] = (value, reason)
            listeners = list(self._listeners)
        self._notify(listeners, name, value, reason)

    def add_listener(self, callback: Callable[[str, Any, str | None], None]) -> None:
        """`callback(name, value, error)` after each apply (error None) or rejection (error text)."""
        with self._lock:
            self._listeners.append(callback)

    def _notify(self, listeners, name: str, value: Any, error: str | None) -> None:
        for callback in listeners:
            try:
                callback(name, value, error)
            except Exception:  # a listener's bug must not stop the inference thread
                log.exception("parameter listener failed")

    @property
    def applied(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._applied)

    @property
    def rejected(self) -> dict[str, tuple[Any, str]]:
        with self._lock:
            return dict(self._rejected)


def apply_pending(store: ParameterStore, engine) -> None:
    """Apply every pending change to `engine` (between frames): prompts via set_prompt, the rest
    via one engine.update; when that update is refused, each value is tried alone so good ones
    still land and only the bad ones are reported."""
    changes = store.take()
    if not changes:
        return
    prompts = {name: changes.pop(name) for name in PROMPT_NAMES if name in changes}
    if prompts:
        _apply_prompts(store, engine, prompts)
    if not changes:
        return
    try:
        engine.update(**changes)
    except (ValueError, TypeError) as exc:
        if len(changes) == 1:
            name, value = next(iter(changes.items()))
            store.report_rejected(name, value, str(exc))
            return
        for name, value in changes.items():
            apply_pending_one(store, engine, name, value)
        return
    except Exception as exc:  # the engine's own bug: report, keep running
        for name, value in changes.items():
            store.report_rejected(name, value, f"{type(exc).__name__}: {exc}")
        return
    store.report_applied(changes)


def apply_pending_one(store: ParameterStore, engine, name: str, value: Any) -> None:
    try:
        engine.update(**{name: value})
    except Exception as exc:
        store.report_rejected(name, value, str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")
    else:
        store.report_applied({name: value})


def _apply_prompts(store: ParameterStore, engine, prompts: dict[str, Any]) -> None:
    applied = store.applied
    prompt = prompts.get("prompt", applied.get("prompt", ""))
    negative = prompts.get("negative_prompt", applied.get("negative_prompt"))
    try:
        engine.set_prompt(prompt, negative_prompt=negative)
    except Exception as exc:
        for name, value in prompts.items():
            store.report_rejected(name, value, str(exc))
    else:
        store.report_applied(prompts)
