"""What the inference thread does when the engine fails: report, free memory, roll back.

A step that raises (a bug, CUDA out of memory, a driver hiccup) costs that frame only: the
output keeps showing the last good frame, the error goes to the log and to status out
(telemetry's last_error), and the next frame is tried. When ROLLBACK_AFTER frames in a row
fail, the engine is put back to the last configuration that produced a good frame (a change
such as more denoising steps that no longer fits in memory is undone), or, when the
configuration did not change, its frames in flight are reset.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

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
    if "OutOfMemory" not in type(exc).__name__ and "out of memory" not in str(exc).lower():
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class EngineGuard:
    """Tracks the engine's last good configuration and answers its failures (inference thread only)."""

    def __init__(self, *, engine, telemetry: Telemetry, params=None, holding=contextlib.nullcontext) -> None:
        """`holding()`: a context within which the output holds its last frame (a rollback's
        `update` may compile for as long as any settings change: it is not a stall)."""
        self.engine, self.telemetry, self.params, self._holding = engine, telemetry, params, holding
        self.good_config = getattr(engine, "config", None)  # the last configuration that produced a good frame
        self.failures = 0  # failed frames in a row
        self._log = RateLimitedLog(log)  # repeated failures at most every 5 s (all are counted)

    def good_frame(self) -> None:
        """A frame came out: its configuration is the one to come back to."""
        self.failures = 0
        config = getattr(self.engine, "config", None)
        if config is not self.good_config:
            self.good_config = config

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
            self._recover()

    def _recover(self) -> None:
        """Roll back to the last good configuration; or, when it is the current one, reset the stream."""
        self.failures = 0
        try:
            with self._holding():
                restored = restore_config(self.engine, self.good_config)
        except Exception as exc:
            self.telemetry.error(f"engine: rollback failed: {describe(exc)}")
            log.error("engine: rolling back to the last working configuration failed: %s", describe(exc))
            return
        if restored:
            self.telemetry.count("rollbacks")
            names = ", ".join(f"{name}={value!r}" for name, value in restored.items())
            text = f"engine: {ROLLBACK_AFTER} frames failed in a row; restored the last working settings {names}"
            self.telemetry.error(text)
            log.error("%s", text)
            if self.params is not None:
                self.params.report_restored(_as_parameters(restored, self.engine.config),
                                            "frames failed with this value; the last working one is restored")
        elif hasattr(self.engine, "reset"):
            try:
                self.engine.reset()
            except Exception as exc:
                log.error("engine: reset failed: %s", describe(exc))
