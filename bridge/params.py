"""The parameter store: where the control plane (OSC, the CLI) writes, and the inference thread reads.

Writers call `set(name, value)` / `update(values)` from any thread; the newest value per name
wins and earlier unapplied ones are dropped. Between two frames the inference thread calls
`apply_pending(store, engine)`, which takes every pending change at once and applies it, then
reports the result to listeners (the control plane's status, the status line).

Which names exist and their types come from the one parameter table (bridge.control.table):
only its "engine" parameters are stored, so no message can set anything else. Ranges are the
engine's to check (its ValueError names the field and becomes the rejection message).

Prompts are encoded off the frame loop: with a `prompt_encoder` attached, new prompt texts go
to a worker thread that runs the text encoder first, and are queued only when ready, so the
inference thread never waits for the encoder.

Changes that would compile are readied off the frame loop too: with a readier attached (an
engine whose `ready` can compile beside running frames: the compiled backend), a new step count
or size that was not readied at start goes to a worker thread that compiles for it while frames
go on with the current settings, and is queued once compiled; applying it then costs the frame
loop a step graph's capture at most. A value of the same setting set meanwhile is newer and wins.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from typing import Any, Callable

from . import openmp
from .ratelimit import RateLimitedLog
from .control.table import BY_NAME, ENGINE_NAMES, LIVE_LORA_SLOTS

log = logging.getLogger(__name__)

PARAMETERS = {name: BY_NAME[name] for name in ENGINE_NAMES}
PROMPT_NAMES = ("prompt", "negative_prompt", "prompt_blend", "prompt_blend_method")
LORA_NAMES = tuple(name for name in ENGINE_NAMES if name.startswith("lora_"))  # lora_1 ..: live LoRA strengths
# Setting one of a group replaces any pending value of the others (they describe the same thing).
EXCLUSIVE = ({"strength", "t_index_list"}, {"prompt", "prompt_blend"}, {"seed", "seed_blend"})

CLOSE_SECONDS = 0.5  # how long close() waits for a prompt encode in progress (shutdown stays under 3 s)
# Python's GIL switch interval while the readier compiles (the default is 5 ms). Every torch call
# on the frame thread lets go of the GIL and must take it back from the compiling thread, which
# hands it over only after this interval: at 5 ms a frame of many calls waits seconds. Measured on
# the 2-core CPU (bench/ready_check.py, tiny, empty cache): 758 frames in 41.1 s of compiling with
# the default, max gap 1.74 s; 1045 frames in 50.2 s at 0.1 ms, max gap 0.56 s. Restored after.
READY_SWITCH_INTERVAL = 0.0001

Listener = Callable[[str, Any, "str | None"], None]


def coerce(name: str, value: Any) -> Any:
    """`value` as the parameter's type; ValueError naming the parameter when it cannot be."""
    if name not in PARAMETERS:
        raise ValueError(f"{name}: unknown parameter; known: {', '.join(PARAMETERS)}")
    param = PARAMETERS[name]
    try:
        return _COERCE[param.kind](param, value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is not a valid {param.kind.replace('_', ' ')}") from None


def _whole(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise TypeError
    return int(value)


def _boolean(param, value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("1", "0", "true", "false", "on", "off", "yes", "no"):
            raise TypeError
        return value.lower() in ("1", "true", "on", "yes")
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise TypeError


def _number(param, value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError
    return float(value)


def _string(param, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value


def _int_list(param, value: Any) -> tuple[int, ...]:
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    return tuple(_whole(v) for v in items)


def _size(param, value: Any) -> tuple[int, int]:
    items = value.lower().replace("x", " ").replace(",", " ").split() if isinstance(value, str) else value
    width, height = (_whole(v) for v in items)
    return width, height


def _blend(param, value: Any) -> tuple[tuple[str, float], ...]:
    pairs = tuple((str(prompt), float(weight)) for prompt, weight in value)
    if not pairs or not all(isinstance(p, str) for p, _ in value):
        raise TypeError
    return pairs


def _seed_blend(param, value: Any) -> tuple[tuple[int, float], ...]:
    pairs = tuple((_whole(seed), float(weight)) for seed, weight in value)
    if not pairs:
        raise TypeError
    return pairs


def _choice(param, value: Any) -> str:
    if value not in param.choices:
        raise ValueError
    return value


_COERCE = {
    "string": _string, "float": _number, "int": lambda p, v: _whole(v), "bool": _boolean,
    "int_list": _int_list, "size": _size, "prompt_blend": _blend, "seed_blend": _seed_blend,
    "choice": _choice,
}


class ParameterStore:
    """Thread-safe latest-value-per-name store of pending engine parameter changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._applied: dict[str, Any] = {}  # the values the engine last accepted
        self._rejected: dict[str, tuple[Any, str]] = {}  # name -> (value, reason) of the last refusal
        self._unavailable: dict[str, str] = {}  # name -> why this run cannot take it (mark_unavailable)
        self._listeners: list[Listener] = []
        self._encoder: _PromptWorker | None = None
        self.readier: _Readier | None = None  # compiles for changes beside the frames (attach_readier)
        self._generations: dict[str, int] = {}  # per setting (a name and its EXCLUSIVE group): values set so far
        self._taken_generations: dict[str, int] = {}  # the same when `take` last took the pending values
        self._rejections_log = RateLimitedLog(log)  # per parameter: a storm of bad values must not flood the log

    def set(self, name: str, value: Any) -> None:
        """Queue `value` for the next frame; ValueError (naming the parameter) for a wrong type."""
        self.update({name: value})

    def update(self, values: dict[str, Any]) -> None:
        """Several values at once, applied together (all are type-checked before any is queued;
        of two that set the same thing, prompt and prompt_blend say, the later in `values` wins).
        With a prompt among them they wait for its encoding, and a value set again meanwhile
        keeps its newer value."""
        checked = _latest_of_groups({name: coerce(name, value) for name, value in values.items()})
        if _prompt_texts(checked) and self._encoder is not None:
            self._encoder.submit(checked)  # counted there (see _PromptWorker.submit); queued once encoded
        else:
            self._queue(checked)

    def _count(self, checked: dict[str, Any]) -> dict[str, int]:
        """Count `checked` as set now (see `_queue`); their settings' generations."""
        with self._lock:
            for key in {_setting(name) for name in checked}:
                self._generations[key] = self._generations.get(key, 0) + 1
            return {_setting(name): self._generations[_setting(name)] for name in checked}

    def _queue(self, checked: dict[str, Any], *, since: dict[str, int] | None = None,
               counted: dict[str, int] | None = None) -> None:
        """Pend `checked`, new values. `since`: instead, values coming back from the readier, set
        when the settings were at these `generations`; a setting set again since (pending now, or
        applied already) keeps its newer value, and the older one is dropped. `counted`: values
        counted as set (`_count`) when they went to the prompt worker, at these generations; one
        set again since is dropped the same way."""
        with self._lock:
            if counted is not None:
                checked = {name: value for name, value in checked.items()
                           if self._generations.get(_setting(name), 0) == counted.get(_setting(name))}
            elif since is None:
                for name in checked:
                    key = _setting(name)
                    self._generations[key] = self._generations.get(key, 0) + 1
            else:
                checked = {name: value for name, value in checked.items()
                           if self._generations.get(_setting(name), 0) == since.get(_setting(name))
                           and not _same_thing(name) & self._pending.keys()}
            for group in EXCLUSIVE:
                if group & checked.keys():
                    for name in group - checked.keys():
                        self._pending.pop(name, None)
            self._pending.update(checked)

    def taken_generations(self, names) -> dict[str, int]:
        """How many values each of these settings had been set to when the last `take` took
        them (see `_queue`; the frame loop's own take, which it routes right after)."""
        return {_setting(name): self._taken_generations.get(_setting(name), 0) for name in names}

    @property
    def has_pending(self) -> bool:
        """True when a change waits for the next frame (a hint: `take` may still find none)."""
        return bool(self._pending)

    def take(self) -> dict[str, Any]:
        """Every pending change (newest per name), removing them; {} when none."""
        with self._lock:
            pending, self._pending = self._pending, {}
            self._taken_generations = dict(self._generations)
        return pending

    def attach_prompt_encoder(self, encode: Callable[[str], None]) -> None:
        """Encode new prompt texts with `encode` on a worker thread before they are queued."""
        if self._encoder is None:
            self._encoder = _PromptWorker(self, encode)

    def attach_readier(self, ready: Callable[..., None]) -> None:
        """Ready changes that would compile with `ready(**values)` on a worker thread, beside the
        frames, before they are queued (see `apply_pending`)."""
        if self.readier is None:
            self.readier = _Readier(self, ready)

    def close(self) -> None:
        """Stop the prompt worker and the readier (if any). Safe to call twice."""
        if self._encoder is not None:
            self._encoder.close()
        if self.readier is not None:
            self.readier.close()

    def report_applied(self, values: dict[str, Any]) -> None:
        """The engine took `values`; each replaces its EXCLUSIVE partners' applied values (a seed
        the blend of seeds, a strength the t_index_list it was given before)."""
        with self._lock:
            for name in values:
                for other in _same_thing(name) - values.keys():
                    self._applied.pop(other, None)
            self._applied.update(values)
            for name in values:
                self._rejected.pop(name, None)
            listeners = list(self._listeners)
        for name, value in values.items():
            self._notify(listeners, name, value, None)

    def report_rejected(self, name: str, value: Any, reason: str) -> None:
        """Keep and announce a refusal; logged at most once every 5 s per parameter (a storm of
        bad values must not flood the show's log)."""
        self._rejections_log.warning(name, "parameter %s=%r rejected: %s", name, value, reason)
        with self._lock:
            self._rejected[name] = (value, reason)
            listeners = list(self._listeners)
        self._notify(listeners, name, value, reason)

    def report_restored(self, values: dict[str, Any], reason: str) -> None:
        """The engine was put back to `values` (a rollback after failed frames): the applied values
        they replace (and their exclusive partners, e.g. strength for t_index_list) are reported
        rejected with `reason`, then `values` applied."""
        before = self.applied
        self.report_applied({name: value for name, value in values.items() if name in PARAMETERS})
        for name, value in values.items():
            related = next((group for group in EXCLUSIVE if name in group), {name})
            for other in sorted(related):
                if other in before and (other != name or before[other] != value):
                    self.report_rejected(other, before[other], reason)
                    if other != name:
                        self.forget(other)

    def forget(self, name: str) -> None:
        """Drop `name` from the applied values (a blend replaced the plain prompt, or back)."""
        with self._lock:
            self._applied.pop(name, None)

    def add_listener(self, callback: Listener) -> None:
        """`callback(name, value, error)` after each apply (error None) or rejection (error text)."""
        with self._lock:
            self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        with self._lock:
            if callback in self._listeners:
                self._listeners.remove(callback)

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

    def mark_unavailable(self, reasons: dict[str, str]) -> None:
        """Parameters this run cannot take at all (a live LoRA slot with no LoRA loaded), each with
        the reason: OSCQuery lists them as neither readable nor writable, saying why. A value sent
        for one is still refused by the engine, by name."""
        with self._lock:
            self._unavailable.update(reasons)

    @property
    def unavailable(self) -> dict[str, str]:
        with self._lock:
            return dict(self._unavailable)


def _prompt_texts(values: dict[str, Any]) -> list[str]:
    texts = [values[name] for name in ("prompt", "negative_prompt") if name in values]
    texts += [prompt for prompt, _ in values.get("prompt_blend", ())]
    return texts


def _latest_of_groups(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with, of the names of one EXCLUSIVE group, only the last (dicts keep their order)."""
    for group in EXCLUSIVE:
        present = [name for name in values if name in group]
        if len(present) > 1:
            values = {name: value for name, value in values.items() if name not in present[:-1]}
    return values


def _merged(older: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """`older` updated with `newer`, whose names also replace their EXCLUSIVE partners in `older`."""
    replaced = set().union(*(_same_thing(name) for name in newer))
    return {**{name: value for name, value in older.items() if name not in replaced}, **newer}


class _PromptWorker:
    """Runs the text encoder for new prompts on its own thread; the newest request wins: one
    submitted while another waits replaces it (merged: its values win, and only the merged
    values' texts are encoded). Each request's texts, then the negative prompt the engine will
    use with them (a blend of 8 must not push it out of the prompt cache)."""

    def __init__(self, store: ParameterStore, encode: Callable[[str], None]) -> None:
        self._store, self._encode = store, encode
        self._condition = threading.Condition()
        self._request: tuple[dict, dict[str, int]] | None = None  # (values, their generations when counted)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="prompt-encoder", daemon=True)
        self._thread.start()

    def submit(self, values: dict[str, Any]) -> None:
        """Count `values` as set now and make them the request (merged into one waiting): one
        lock around both, so that of two control threads submitting at once, the request counted
        last is the one whose values win."""
        with self._condition:
            counted = self._store._count(values)
            if self._request is not None:  # an older request not started yet: merge, newest values win
                older, older_counted = self._request
                values = _merged(older, values)
                counted = {**older_counted, **counted}
            self._request = (values, counted)
            self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while self._request is None and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
                values, counted = self._request
                self._request = None
            negative = values.get("negative_prompt", self._store.applied.get("negative_prompt")) or ""
            try:
                for text in [*_prompt_texts(values), negative]:
                    self._encode(text)
            except Exception as exc:  # a failed encode: report it, keep the current prompt
                for name in PROMPT_NAMES:
                    if name in values:
                        self._store.report_rejected(name, values.pop(name), f"encoding failed: {type(exc).__name__}: {exc}")
            openmp.release_idle_workers()  # idle until the next prompt: keep the engine's threads fast
            self._store._queue(values, counted=counted)

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout=CLOSE_SECONDS)  # a daemon thread: an encode in progress is not waited for


def _same_thing(name: str) -> set[str]:
    """`name` and the names that set the same thing (its EXCLUSIVE group)."""
    for group in EXCLUSIVE:
        if name in group:
            return set(group)
    return {name}


def _setting(name: str) -> str:
    """The one key of the setting `name` sets (strength and t_index_list set the same one)."""
    return min(_same_thing(name))


class _Readier:
    """Readies the engine for changes that would compile (`engine.ready`), on its own thread,
    while frames go on with the current settings, then queues them back, each with the
    generation its setting had when the frame loop took it: a setting set again since keeps
    the newer value (`ParameterStore._queue`). A request still waiting merges newest-wins."""

    def __init__(self, store: ParameterStore, ready: Callable[..., None]) -> None:
        self._store, self._ready = store, ready
        self._condition = threading.Condition()
        self._waiting: dict[str, Any] | None = None  # the next request
        self._since: dict[str, int] = {}  # its settings' generations when they were handed over
        self._running = False  # a request is being readied
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="sdbridge readier", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """True while a change waits to be readied or is being readied."""
        with self._condition:
            return self._waiting is not None or self._running

    def submit(self, values: dict[str, Any], since: dict[str, int]) -> None:
        """Ready `values` next; `since`: their settings' generations when taken (`taken_generations`)."""
        with self._condition:
            waiting = {name: value for name, value in (self._waiting or {}).items()
                       if not _same_thing(name) & values.keys()}
            self._waiting = {**waiting, **values}
            self._since = {**self._since, **since}
            self._condition.notify()

    def _run(self) -> None:
        while True:
            with self._condition:
                while self._waiting is None and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
                values, since = self._waiting, self._since
                self._running, self._waiting, self._since = True, None, {}
            log.info("readying %s beside the frames (compiling; the current settings keep running)", _listed(values))
            started = time.perf_counter()
            try:
                with _switch_interval(READY_SWITCH_INTERVAL):  # the frame thread takes the GIL back sooner
                    self._ready(**values)
            except Exception as exc:  # refused or failed: the settings stay; say why, keep running
                with self._condition:
                    self._running = False
                reason = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
                for name, value in values.items():
                    self._store.report_rejected(name, value, reason)
                continue
            with self._condition:
                self._running = False
            openmp.release_idle_workers()  # idle until the next change: keep the engine's threads fast
            log.info("ready in %.1f s: %s applies from the next frame unless set again meanwhile",
                     time.perf_counter() - started, _listed(values))
            self._store._queue(values, since=since)

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join(timeout=CLOSE_SECONDS)  # a daemon thread: a compilation in progress is not waited for


@contextlib.contextmanager
def _switch_interval(seconds: float):
    """Python's GIL switch interval set to `seconds` inside, put back after."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _listed(values: dict[str, Any]) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in values.items())


def _route(store: ParameterStore, engine, changes: dict[str, Any]) -> dict[str, Any]:
    """The changes to apply now. Those that would compile go to the readier; while it works,
    those that would capture a step graph wait for it too (no capture beside a compilation)."""
    work = _update_work(engine, changes)
    if work != "compile" and not (work == "capture" and store.readier.busy):
        return changes
    later = {name: value for name, value in changes.items() if _update_work(engine, {name: value})} or changes
    store.readier.submit(later, store.taken_generations(later))
    return {name: value for name, value in changes.items() if name not in later}


def _update_work(engine, values: dict[str, Any]) -> str | None:
    """engine.update_work, or None where it would refuse them (the update says why)."""
    try:
        return engine.update_work(**values)
    except Exception:
        return None


def apply_pending(store: ParameterStore, engine) -> None:
    """Apply every pending change to `engine` (between frames): prompts via set_prompt or
    set_prompt_blend, the rest via one engine.update; when that update is refused, each value is
    tried alone so good ones still land and only the bad ones are reported."""
    changes = store.take()
    if not changes:
        return
    loras = {name: changes.pop(name) for name in LORA_NAMES if name in changes}
    if loras:  # before the prompts: a LoRA with a text-encoder part encodes the prompt shown again
        _apply_loras(store, engine, loras)
    mix = changes.pop("seed_mix", None)
    if mix is not None and not _mix_seeds(store, changes, mix):
        mix = None
    prompts = {name: changes.pop(name) for name in PROMPT_NAMES if name in changes}
    if prompts:  # with the transition sent beside them, if any (it applies to them, not to the next)
        _apply_prompts(store, engine, prompts, transition=changes.get("prompt_transition"))
    if store.readier is not None:
        changes = _route(store, engine, changes)
    if not changes:
        return
    if mix is None and ("seed" in changes or "seed_blend" in changes):
        store.forget("seed_mix")  # a seed or blend of its own: the fader's last position no longer applies
    before = getattr(engine, "config", None)
    try:
        engine.update(**changes)
    except (ValueError, TypeError) as exc:
        _restore(engine, before)
        if len(changes) == 1:
            name, value = next(iter(changes.items()))
            store.report_rejected(name, value, str(exc))
            return
        for name, value in changes.items():
            _apply_one(store, engine, name, value)
        return
    except Exception as exc:  # the engine's own failure (a bug, out of memory): undo, report, keep running
        restored = _restore(engine, before)
        for name, value in changes.items():
            store.report_rejected(name, value, f"{type(exc).__name__}: {exc}{restored}")
        return
    store.report_applied(changes if mix is None else {**changes, "seed_mix": mix})


def _mix_seeds(store: ParameterStore, changes: dict[str, Any], mix: float) -> bool:
    """seed_mix as the seed blend it means (into `changes`): the blend being set or the one
    applied, its first two seeds weighted 1 - mix and mix. False (reported) without a blend."""
    blend = changes.get("seed_blend", store.applied.get("seed_blend"))
    replaced_by_a_seed = "seed" in changes and "seed_blend" not in changes
    if replaced_by_a_seed or not blend or len(blend) < 2:
        store.report_rejected("seed_mix", mix, "seed_mix: needs a blend of two seeds to move between; set one "
                                               "first, e.g. /sd/seed_blend 2 1 9 0")
        return False
    (first, _), (second, _), *rest = blend
    changes["seed_blend"] = ((first, 1.0 - mix), (second, mix), *rest)
    return True


def _apply_one(store: ParameterStore, engine, name: str, value: Any) -> None:
    before = getattr(engine, "config", None)
    try:
        engine.update(**{name: value})
    except Exception as exc:
        restored = _restore(engine, before)
        store.report_rejected(name, value, str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}{restored}")
    else:
        store.report_applied({name: value})


def _restore(engine, before) -> str:
    """After a failed update: put back the configuration the engine had (an update that failed
    half-way may have changed part of it); a note for the rejection message."""
    from .recovery import describe, restore_config

    try:
        restored = restore_config(engine, before)
    except Exception as exc:
        log.error("restoring the engine's settings after a failed update failed: %s", describe(exc))
        return "; restoring the previous settings failed"
    return "; previous settings restored" if restored else ""


def lora_values(scales) -> dict[str, float]:
    """Live LoRA strengths (engine.lora_scales) under their parameters' names."""
    return {f"lora_{index + 1}": scale for index, scale in enumerate(scales)}


def empty_lora_slots(loaded: int) -> dict[str, str]:
    """The live LoRA parameters beyond the `loaded` live LoRAs, each with why it cannot be set."""
    return {f"lora_{slot}": f"no live LoRA in slot {slot} ({loaded} loaded; load one with --live-lora)"
            for slot in range(loaded + 1, LIVE_LORA_SLOTS + 1)}


def _apply_loras(store: ParameterStore, engine, loras: dict[str, float]) -> None:
    """Live LoRA strengths in one engine.set_lora_scales; when refused, each alone."""
    scales = {int(name.removeprefix("lora_")) - 1: value for name, value in loras.items()}
    try:
        engine.set_lora_scales(scales)
    except Exception as exc:
        if len(loras) > 1 and isinstance(exc, ValueError):
            for name, value in loras.items():
                _apply_loras(store, engine, {name: value})
            return
        for name, value in loras.items():
            store.report_rejected(name, value, str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")
        return
    store.report_applied(loras)


def _apply_prompts(store: ParameterStore, engine, prompts: dict[str, Any], *, transition: float | None = None) -> None:
    """The prompt side as one change: a plain prompt or a blend (whichever was set last; the
    store keeps one of them), with the negative prompt and blend method kept when not given."""
    applied = store.applied
    fade = {} if transition is None else {"transition": transition}  # (an engine without transitions takes none)
    negative = prompts.get("negative_prompt", applied.get("negative_prompt"))
    if "prompt" in prompts:
        blend = None
    else:
        blend = prompts.get("prompt_blend", applied.get("prompt_blend"))
    try:
        if blend is not None:
            method = prompts.get("prompt_blend_method", applied.get("prompt_blend_method", "linear"))
            engine.set_prompt_blend(list(blend), negative_prompt=negative, method=method, **fade)
        else:
            engine.set_prompt(prompts.get("prompt", applied.get("prompt", "")), negative_prompt=negative, **fade)
    except Exception as exc:
        for name, value in prompts.items():
            store.report_rejected(name, value, str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")
        return
    store.forget("prompt_blend" if blend is None else "prompt")
    store.report_applied(prompts)
