"""What the inference thread does when the engine fails: report, free memory, roll back.

A step that raises (a bug, CUDA out of memory, a driver hiccup) costs that frame only: the
output keeps showing the last good frame, the error goes to the log and to status out
(telemetry's last_error), and the next frame is tried. When ROLLBACK_AFTER frames in a row
fail, the engine is put back to the last configuration that produced a good frame (a change
such as more denoising steps that no longer fits in memory is undone), or, when the
configuration did not change, its frames in flight are reset.

A bad output (NaN, inf, or black from a picture that is not) never reaches the output: the
engine replaces it with its last good one and counts it. One such output can come from a
passing fault, and then the few frames still in flight carry it out; when they keep coming
(`bad_output_limit` in a row), what changed since the last clean frame made them (a guidance,
delta or live LoRA strength that overflows), and it is rolled back the same way, so the output
moves again instead of holding one picture until an operator notices.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from .params import lora_values
from .ratelimit import RateLimitedLog
from .telemetry import Telemetry

log = logging.getLogger("bridge.runtime")

ROLLBACK_AFTER = 3  # failed frames in a row before the engine is rolled back (or reset)


def runtime_settings() -> frozenset[str]:
    """The engine settings `update` may change while frames flow (pipeline.RUNTIME_SETTINGS)."""
    from pipeline import RUNTIME_SETTINGS

    return RUNTIME_SETTINGS


def config_changes(current, target) -> dict[str, Any]:
    """The run-time settings of `target` (an engine config) that differ in `current`."""
    if current is None or target is None or current is target:
        return {}
    missing = object()
    changes = {}
    for name in sorted(runtime_settings()):
        wanted = getattr(target, name, missing)
        if wanted is not missing and getattr(current, name, missing) != wanted:
            changes[name] = wanted
    return changes


def restore_config(engine, target) -> dict[str, Any]:
    """Put `engine` back to the run-time settings of `target` with one `engine.update`; the values
    restored ({} when nothing differed). Raises what `update` raises."""
    changes = config_changes(getattr(engine, "config", None), target)
    if changes:
        engine.update(**changes)
    return changes


def bad_output_limit(config) -> int:
    """Bad outputs in a row before a rollback under `config`: ROLLBACK_AFTER more than the frames
    in flight (one per denoising step), which a single passing fault can still spoil."""
    in_flight = len(getattr(config, "t_index_list", ()) or ()) * getattr(config, "frame_buffer_size", 1)
    return ROLLBACK_AFTER + in_flight


def _as_parameters(values: dict[str, Any], config) -> dict[str, Any]:
    """Restored engine settings under the control parameters' names: a restored width or height
    is reported as `resolution`, the pair the engine runs at now (`config`)."""
    sizes = {"width", "height"}
    renamed = {name: value for name, value in values.items() if name not in sizes}
    if sizes & values.keys():
        renamed["resolution"] = (config.width, config.height)
    return renamed


def describe(exc: BaseException) -> str:
    """`Type: message` on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def free_memory(exc: BaseException) -> None:
    """After an out-of-memory error: hand the failed step's cached blocks back to the device.
    No gc.collect() here: a full collection holds the GIL for hundreds of ms in a process this
    size and would stall the output thread (the step's tensors are freed by reference counting)."""
    from pipeline.errors import is_out_of_memory, release_cached_memory

    if is_out_of_memory(exc):
        release_cached_memory()


def _lora_scales(engine) -> tuple[float, ...]:
    """The engine's live LoRA strengths (() for an engine without them)."""
    return tuple(getattr(engine, "lora_scales", ()))


def restore_loras(engine, scales: tuple[float, ...]) -> dict[str, float]:
    """Put `engine`'s live LoRA strengths back to `scales` with one `set_lora_scales`; the values
    restored under their parameters' names ({} when nothing differed). Raises what it raises."""
    now = _lora_scales(engine)
    if len(now) != len(scales) or now == scales:
        return {}
    engine.set_lora_scales(list(scales))
    before = lora_values(now)
    return {name: value for name, value in lora_values(scales).items() if value != before[name]}


class EngineGuard:
    """Tracks the engine's last good configuration and answers its failures (inference thread only)."""

    def __init__(self, *, engine, telemetry: Telemetry, params=None, holding=contextlib.nullcontext) -> None:
        """`holding()`: a context within which the output holds its last frame (a rollback's
        `update` may compile for as long as any settings change: it is not a stall)."""
        self.engine, self.telemetry, self.params, self._holding = engine, telemetry, params, holding
        self.good_config = getattr(engine, "config", None)  # the last configuration that produced a good frame
        self.good_loras = _lora_scales(engine)  # and its live LoRA strengths
        self.failures = 0  # failed frames in a row
        self.bad_outputs = 0  # frames in a row whose output the engine replaced (NaN, inf, black)
        self._log = RateLimitedLog(log)  # repeated failures at most every 5 s (all are counted)

    def good_frame(self) -> None:
        """A frame came out: its configuration and live LoRA strengths are the ones to come back to."""
        self.failures = self.bad_outputs = 0
        config = getattr(self.engine, "config", None)
        if config is not self.good_config:
            self.good_config = config
        self.good_loras = _lora_scales(self.engine)

    def bad_output(self) -> None:
        """A frame came out, but the engine had replaced its output (NaN, inf or black) with its
        last good one (the engine counts these; status's bad_frames includes them). After
        `bad_output_limit` in a row: rolled back, and the frames in flight, which carry the bad
        values, reset."""
        self.bad_outputs += 1
        if self.bad_outputs >= bad_output_limit(getattr(self.engine, "config", None)):
            self._log.warning("bad outputs", "engine: %d outputs in a row were NaN, inf or black (the output "
                              "held the last good frame)", self.bad_outputs)
            self._recover(f"{self.bad_outputs} outputs in a row were NaN, inf or black",
                          "outputs were NaN, inf or black", spoiled=True)

    def failed(self, what: str, exc: BaseException | None = None) -> None:
        """A frame failed (`exc` raised, or `what` describes an unusable result)."""
        self.failures += 1
        self.telemetry.count("bad_frames")
        text = f"engine: {what}" if exc is None else f"engine: {what}: {describe(exc)}"
        self.telemetry.error(text)
        self._log.warning("failed", "%s (frame dropped, output holds the last good frame)", text)
        if exc is not None:
            free_memory(exc)
        if self.failures >= ROLLBACK_AFTER:
            self._recover(f"{ROLLBACK_AFTER} frames failed in a row", "frames failed")

    def _recover(self, what: str, why: str, *, spoiled: bool = False) -> None:
        """Roll back to the last good configuration and live LoRA strengths; then, when nothing
        was restored or the frames in flight are `spoiled`, reset the stream."""
        self.failures = self.bad_outputs = 0
        restored: dict[str, Any] = {}
        try:
            with self._holding():
                restored.update(restore_config(self.engine, self.good_config))
                restored.update(restore_loras(self.engine, self.good_loras))
        except Exception as exc:
            self.telemetry.error(f"engine: rollback failed: {describe(exc)}")
            log.error("engine: rolling back to the last working configuration failed: %s", describe(exc))
            if not restored:  # (else the settings put back before the failure are reported below)
                return
        if restored:
            self.telemetry.count("rollbacks")
            names = ", ".join(f"{name}={value!r}" for name, value in restored.items())
            text = f"engine: {what}; restored the last working settings {names}"
            self.telemetry.error(text)
            log.error("%s", text)
            if self.params is not None:
                self.params.report_restored(_as_parameters(restored, self.engine.config),
                                            f"{why} with this value; the last working one is restored")
        if (spoiled or not restored) and hasattr(self.engine, "reset"):
            try:
                self.engine.reset()
            except Exception as exc:
                log.error("engine: reset failed: %s", describe(exc))
                return
            if not restored:
                text = f"engine: {what}; nothing had changed since the last good frame: frames in flight reset"
                self.telemetry.error(text)
                self._log.warning("reset", "%s", text)
