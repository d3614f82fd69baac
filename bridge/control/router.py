"""The OSC router: bytes and a sender in, validated values into the ParameterStore. No sockets.

    router = Router(store=store, actions={"pause": runtime_pause, "resume": runtime_resume})
    router.handle(packet_bytes, ("127.0.0.1", 50123))

`handle` never raises and never blocks on anything but the store's lock: every refusal is
counted (`counters`) and logged at most once per `LOG_INTERVAL_SECONDS` (bridge/ratelimit.py) per reason
(a refused value: per parameter, so a bad guidance does not hide a bad t_index_list). All values of
one packet (a message, or a bundle with everything nested in it) are written with one
`store.update`, so they reach the engine together, between two frames.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from typing import Any, Callable, Iterable

from ..ratelimit import RateLimitedLog
from .osc import DEFAULT_LIMITS, Limits, Message, OSCError, decode_packet
from .patterns import PatternError, compile_pattern, has_wildcards, matches
from .table import Ignored, Param, addresses, check_presets, check_prefix, convert

log = logging.getLogger(__name__)

COUNTERS = (
    "packets",  # packets handed to the router
    "messages",  # messages decoded from them
    "applied",  # values written into the store or actions run
    "dropped_sender",  # packets from an address outside --osc-allow
    "malformed",  # packets or bundle elements that could not be decoded
    "over_limit",  # packets or elements over a size, depth, length or count limit
    "unknown_address",  # messages matching no address
    "bad_pattern",  # wildcard patterns that are malformed or too complex
    "rejected",  # values of the wrong type, or unusable
    "ignored",  # trigger releases (/sd/pause 0)
    "internal_errors",  # bugs caught so that the receive loop keeps going
)
_LIMIT_REASONS = ("too_large", "too_deep", "too_long", "too_many_arguments", "too_many_messages")


def parse_allow(entries: Iterable[str] | None) -> tuple | None:
    """--osc-allow entries (addresses or networks, comma-separated) as networks; None: everyone."""
    if entries is None:
        return None
    networks = []
    for entry in entries:
        for item in str(entry).split(","):
            if not item.strip():
                continue
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ValueError(f"osc_allow: {item.strip()!r} is not an IP address or network") from None
    return tuple(networks)


class Router:
    """Validates, converts, clamps and writes; knows no transport (see module docstring)."""

    def __init__(self, *, store, prefix: str = "/sd", aliases: bool = True, allow: tuple | None = None,
                 actions: dict[str, Callable[[], None]] | None = None, presets: dict | None = None,
                 limits: Limits = DEFAULT_LIMITS, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._table = addresses(check_prefix(prefix), aliases=aliases)
        self._parts = [(tuple(address[1:].split("/")), entry) for address, entry in self._table.items()]
        self._allow = allow
        self._actions = dict(actions or {})
        self._presets = check_presets(presets or {})
        self._limits = limits
        self._lock = threading.Lock()
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._refusals = RateLimitedLog(log, clock=clock)
        self.last_error: str | None = None  # the latest refusal, for the status output
        self.last_error_time: float | None = None  # when it came (time.monotonic)

    @property
    def addresses(self) -> dict[str, tuple[Param, bool]]:
        return dict(self._table)

    @property
    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def handle(self, data: bytes, sender: tuple) -> None:
        """One packet (a message or a bundle) from `sender` (host, port). Never raises."""
        try:
            self._handle(data, sender)
        except Exception as exc:  # a bug here must not stop the receive loop
            self._count("internal_errors")
            self._refuse("internal_errors", sender, f"{type(exc).__name__}: {exc}")
            log.debug("router failure", exc_info=True)

    def _handle(self, data: bytes, sender: tuple) -> None:
        self._count("packets")
        if not self.accepts(sender):
            return
        try:
            packet = decode_packet(data, self._limits)
        except OSCError as exc:
            self._decode_refused(exc, sender)
            return
        for error in packet.errors:
            self._decode_refused(error, sender)
        self._count("messages", len(packet.messages))
        values: dict[str, Any] = {}
        actions: list[str] = []
        for message in packet.messages:
            self._dispatch(message, sender, values, actions)
        self._write(values, sender)
        for name in actions:
            self._run_action(name, sender)

    def report_error(self, error: OSCError, sender: tuple) -> None:
        """A framing error found by a transport (TCP length prefix, SLIP): counted and logged."""
        self._decode_refused(error, sender)

    def accepts(self, sender: tuple) -> bool:
        """Whether `sender` is on the allow-list; a refusal is counted and logged."""
        if self._allowed(sender):
            return True
        self._count("dropped_sender")
        self._refusals.warning("sender", "OSC from %s dropped: not in --osc-allow", sender[0])
        return False

    def _allowed(self, sender: tuple) -> bool:
        if self._allow is None:
            return True
        try:
            host = ipaddress.ip_address(str(sender[0]).split("%")[0])
        except ValueError:
            return False
        if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
            host = host.ipv4_mapped
        return any(host in network for network in self._allow)

    def _decode_refused(self, exc: OSCError, sender: tuple) -> None:
        counter = "over_limit" if exc.reason in _LIMIT_REASONS else "malformed"
        self._count(counter)
        self._refuse(exc.reason, sender, str(exc))

    def _targets(self, message: Message, sender: tuple) -> list[tuple[Param, bool]]:
        address = message.address
        if not has_wildcards(address):
            entry = self._table.get(address)
            return [entry] if entry is not None else []
        try:
            parts = compile_pattern(address)
        except PatternError as exc:
            self._count("bad_pattern")
            self._refuse("bad_pattern", sender, f"{address[:64]!r}: {exc}")
            return []
        return [entry for target, entry in self._parts if matches(parts, target)]

    def _dispatch(self, message: Message, sender: tuple, values: dict, actions: list) -> None:
        targets = self._targets(message, sender)
        if not targets:
            self._count("unknown_address")
            self._refuse("unknown_address", sender, f"no parameter at {message.address[:64]!r}")
            return
        for param, normalized in dict.fromkeys(targets):  # a pattern may hit an alias twice
            try:
                value = convert(param, message.args, normalized=normalized)
            except Ignored:
                self._count("ignored")
                continue
            except ValueError as exc:
                self._count("rejected")
                text = f"{message.address[:64]} ,{message.typetags[:16]}: {exc}"
                self._refuse(f"rejected {param.name}", sender, text)  # per parameter: one bad fader hides no other
                continue
            if param.target == "runtime" and param.name == "preset":
                self._recall(value, sender, values)
            elif param.target == "runtime":
                actions.append(param.name)
            else:
                _put(values, param.name, value)

    def _recall(self, cue: int, sender: tuple, values: dict) -> None:
        preset = self._presets.get(cue)
        if preset is None:
            self._count("rejected")
            known = ", ".join(str(n) for n in sorted(self._presets)) or "none configured"
            self._refuse("preset", sender, f"preset: no preset {cue} (known: {known})")
            return
        for name, value in preset.items():
            _put(values, name, value)

    def _write(self, values: dict, sender: tuple) -> None:
        if not values:
            return
        try:
            self._store.update(values)
        except ValueError:  # one the store refuses (its type check): write the others alone
            for name, value in values.items():
                try:
                    self._store.set(name, value)
                except ValueError as exc:
                    self._count("rejected")
                    self._refuse(f"rejected {name}", sender, str(exc))
                else:
                    self._count("applied")
            return
        self._count("applied", len(values))

    def _run_action(self, name: str, sender: tuple) -> None:
        action = self._actions.get(name)
        if action is None:
            self._count("rejected")
            self._refuse("action", sender, f"{name}: not available in this process")
            return
        try:
            action()
        except Exception as exc:
            self._count("internal_errors")
            self._refuse("action", sender, f"{name} failed: {type(exc).__name__}: {exc}")
        else:
            self._count("applied")

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counters[name] += amount

    def _refuse(self, key: str, sender: tuple, text: str) -> None:
        self.last_error, self.last_error_time = text, time.monotonic()
        self._refusals.warning(key, "OSC from %s:%s refused: %s", sender[0], sender[1], text)


def _put(values: dict, name: str, value: Any) -> None:
    """Latest wins; strength and t_index_list are two views of one setting: the later one wins."""
    other = {"strength": "t_index_list", "t_index_list": "strength"}.get(name)
    if other is not None:
        values.pop(other, None)
    values.pop(name, None)  # re-insert at the end: the dict keeps arrival order
    values[name] = value
