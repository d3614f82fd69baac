"""The bridge's status messages (/sd/status/*, sent to --status-target) as values.

    board = StatusBoard(prefix="/sd")
    board.update("/sd/status/fps", [29.7], now=time.monotonic())
    board.values["fps"], board.alive(now), board.state_name

Addresses are accepted with or without the leading slash (an OSC In CHOP names its channels
without it). Unknown status names are kept too, so a newer bridge does not break the component.
"""

from __future__ import annotations

from typing import Any

# (name, OSC type) of what the bridge sends once a second; the component's Status page shows each
FIELDS = (
    ("alive", "i"), ("fps", "f"), ("output_fps", "f"), ("inference_ms", "f"), ("latency_ms", "f"),
    ("frames_skipped", "i"), ("frames_dropped", "i"), ("state", "i"), ("state_name", "s"),
    ("osc_refused", "i"), ("sink_errors", "i"), ("sink_missed", "i"), ("recording", "i"), ("error", "s"),
    ("backend", "s"), ("size", "s"),
)
STATE_NAMES = {0: "starting", 1: "running", 2: "paused", 3: "source lost", 4: "stopping", 5: "stopped", 6: "stalled",
               7: "updating", -1: "other"}
ALIVE_TIMEOUT_SECONDS = 3.0  # status comes once a second: three missed ticks mean the bridge is gone
INT_RANGE = (-2**31, 2**31 - 1)  # a TouchDesigner Int parameter holds a 32-bit int


def parse_status(address: str, args: list | tuple, *, prefix: str = "/sd") -> tuple[str, Any] | None:
    """('fps', 29.7) for '/sd/status/fps' [29.7]; None for anything that is not a status message."""
    base = prefix.strip("/") + "/status/"
    path = address.lstrip("/")
    if not path.startswith(base) or not args:
        return None
    name = path[len(base):]
    if not name or "/" in name:
        return None
    value = args[0]
    kind = dict(FIELDS).get(name)
    try:
        if kind == "i":
            value = min(max(int(value), INT_RANGE[0]), INT_RANGE[1])
        elif kind == "f":
            value = float(value)
        elif kind == "s":
            value = str(value)
    except (TypeError, ValueError, OverflowError):  # int(inf): OverflowError, int(nan): ValueError
        return None
    return name, value


class StatusBoard:
    """The latest value of each status field, and when the bridge was last heard."""

    def __init__(self, *, prefix: str = "/sd", alive_timeout: float = ALIVE_TIMEOUT_SECONDS) -> None:
        self.prefix = prefix
        self.alive_timeout = alive_timeout
        self.values: dict[str, Any] = {}
        self.last_heard: float | None = None

    def update(self, address: str, args: list | tuple, *, now: float) -> str | None:
        """Record one message; the field name, or None when it was not a status message."""
        parsed = parse_status(address, args, prefix=self.prefix)
        if parsed is None:
            return None
        name, value = parsed
        self.values[name] = value
        if name == "state":
            self.values["state_name"] = STATE_NAMES.get(value, STATE_NAMES[-1])
        self.last_heard = now
        return name

    def alive(self, now: float) -> bool:
        return self.last_heard is not None and now - self.last_heard <= self.alive_timeout

    @property
    def state_name(self) -> str:
        return str(self.values.get("state_name", "unknown"))

    def clear(self) -> None:
        self.values.clear()
        self.last_heard = None
