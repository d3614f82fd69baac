"""The control plane: OSC in (UDP + TCP), OSC status out, OSCQuery, over one parameter table.

    plane = ControlPlane(store=runtime.params, settings=ControlSettings.from_args(args),
                         telemetry=runtime.snapshot, on_pause=runtime.pause, on_resume=runtime.resume,
                         presets=presets)
    with plane:                      # start(): binds the sockets (UserError when a port is taken)
        ...                          # values arrive in the store; the runtime applies them between frames
    # leaving the block (or close(), idempotent) stops every thread and closes every socket

What it writes into the store (`store.update`, one call per OSC packet, names as in
bridge.params.PARAMETERS): prompt, negative_prompt, guidance_scale, delta, seed, strength,
t_index_list, similarity_filter, similarity_threshold, similarity_max_skip, and (once the store
knows them) prompt_blend, prompt_blend_method. What it calls: on_pause(), on_resume(),
on_record_stop(), on_record_start() — from a receive thread; they must only set a flag (or
hand a request to another thread). Presets ({cue: {name: value}}) are recalled by
writing their values into the store.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UserError
from .router import Router, parse_allow
from .servers import TCPServer, UDPServer
from .status import StatusSender, parse_target
from .table import check_prefix

log = logging.getLogger(__name__)

# 7450: no common show tool listens here (to our knowledge): not TouchOSC/Ableton/desks'
# 7000/8000/8001/9000, QLab's 53000/53001, ETC Eos's 3032, OBS WebSocket's 4455, the 7700-7707
# block, StreamDiffusionTD's 8247/8248, NDI's 5960+, Art-Net's 6454, sACN's 5568, TUIO's 3333,
# SuperCollider's 57110/57120; unassigned in /etc/services; below Linux's ephemeral range.
DEFAULT_OSC_PORT = 7450
DEFAULT_BIND = "127.0.0.1"


@dataclass(frozen=True)
class ControlSettings:
    """How the control plane listens and reports; validated on construction."""

    osc_port: int = DEFAULT_OSC_PORT  # UDP and TCP port for OSC in (0: any free port)
    osc_bind: str = DEFAULT_BIND  # interface to listen on; another one is an explicit choice
    osc_allow: tuple[str, ...] | None = None  # sender addresses/networks allowed (None: all that reach us)
    osc_prefix: str = "/sd"  # address prefix of every parameter
    osc_aliases: bool = True  # also accept StreamDiffusionTD's /prompt, /guidance_scale, /t_list ...
    osc_tcp: bool = True  # also listen on TCP (OSC 1.0 length-prefixed or OSC 1.1 SLIP)
    status_target: str | None = None  # host:port for OSC status out (None: off)
    status_interval: float = 1.0  # seconds between status messages
    oscquery: bool = True  # serve OSCQuery over HTTP
    oscquery_port: int | None = None  # None: osc_port + 1 (any free port when osc_port is 0)
    zeroconf: bool = False  # advertise OSCQuery and the OSC ports over mDNS (bridge/control/mdns.py)

    def __post_init__(self) -> None:
        for name in ("osc_port", "oscquery_port"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535):
                raise ValueError(f"{name}: {value!r} must be a port number in 0..65535")
        if not _is_bind_address(self.osc_bind):
            raise ValueError(f"osc_bind: {self.osc_bind!r} must be an IP address of this machine "
                             "(127.0.0.1: this machine only; 0.0.0.0: every interface) or localhost")
        if isinstance(self.osc_allow, str):
            object.__setattr__(self, "osc_allow", (self.osc_allow,))
        parse_allow(self.osc_allow)
        check_prefix(self.osc_prefix)
        if self.status_target is not None:
            parse_target(self.status_target)
        if not 0.05 <= self.status_interval <= 60:
            raise ValueError(f"status_interval: {self.status_interval!r} must be in 0.05..60 seconds")
        if self.zeroconf:
            from .mdns import zeroconf_problem

            problem = zeroconf_problem()
            if problem:
                raise ValueError(problem)

    @property
    def resolved_oscquery_port(self) -> int | None:
        if not self.oscquery:
            return None
        if self.oscquery_port is not None:
            return self.oscquery_port
        return self.osc_port + 1 if 0 < self.osc_port < 65535 else 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ControlSettings":
        """From the flags `add_arguments` defines (None: the default); ValueError naming the field."""
        def given(name: str, default):
            value = getattr(args, name, None)
            return default if value is None else value

        query_port = getattr(args, "oscquery_port", None)
        allow = getattr(args, "osc_allow", None)
        return cls(
            osc_port=given("osc_port", DEFAULT_OSC_PORT), osc_bind=given("osc_bind", DEFAULT_BIND),
            osc_allow=tuple(allow) if allow else None, osc_prefix=given("osc_prefix", "/sd"),
            osc_aliases=given("osc_aliases", True), status_target=getattr(args, "status_target", None),
            oscquery=query_port != "off", oscquery_port=None if query_port in (None, "off") else int(query_port),
            zeroconf=given("zeroconf", False),
        )


def _is_bind_address(text) -> bool:
    """An IP address literal, or localhost: never a name resolved through DNS at start."""
    if not isinstance(text, str) or not text:
        return False
    if text == "localhost":
        return True
    try:
        ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return False
    return True


def _query_port(text: str):
    if text == "off":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number or 'off'") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The control plane's flags (for `sdbridge run`). Every default is None, so that a config
    file can set the value and a flag given on the command line wins over it."""
    group = parser.add_argument_group("OSC control")
    add = group.add_argument
    add("--osc-port", dest="osc_port", type=int, help=f"UDP and TCP port for OSC in (default {DEFAULT_OSC_PORT})")
    add("--osc-bind", dest="osc_bind", help="interface to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for all)")
    add("--osc-allow", dest="osc_allow", action="append", metavar="ADDR[,ADDR]",
        help="only accept OSC from these addresses or networks (e.g. 192.168.1.20,10.0.0.0/24)")
    add("--osc-prefix", dest="osc_prefix", help="address prefix (default /sd)")
    add("--no-osc-aliases", dest="osc_aliases", action="store_const", const=False,
        help="do not accept StreamDiffusionTD's addresses (/prompt, /guidance_scale, /t_list ...)")
    add("--no-osc", dest="osc", action="store_const", const=False, help="no OSC control at all (no port is opened)")
    add("--status-target", dest="status_target", metavar="HOST:PORT",
        help="send /sd/status/... once a second to this OSC receiver (default off)")
    add("--oscquery-port", dest="oscquery_port", type=_query_port, metavar="PORT|off",
        help="OSCQuery HTTP port on the OSC interface (default: OSC port + 1)")
    add("--zeroconf", dest="zeroconf", action="store_const", const=True,
        help="advertise OSCQuery (_oscjson._tcp) and the OSC ports (_osc._udp, _osc._tcp) over mDNS, on the "
             "--osc-bind interface, so that OSCQuery clients find the bridge (default off)")


class ControlPlane:
    """OSC in, status out and OSCQuery around one ParameterStore. Constructed idle; start()
    binds; close() is idempotent; a context manager. Thread-safe counters in `counters`."""

    def __init__(self, *, store, settings: ControlSettings = ControlSettings(),
                 telemetry: Callable[[], dict] | None = None, on_pause: Callable[[], None] | None = None,
                 on_resume: Callable[[], None] | None = None, presets: dict[int, dict[str, Any]] | None = None,
                 on_record_stop: Callable[[], None] | None = None,
                 on_record_start: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self._store = store
        self._telemetry = telemetry
        actions = {name: fn for name, fn in (("pause", on_pause), ("resume", on_resume), ("record_stop", on_record_stop),
                                             ("record_start", on_record_start)) if fn is not None}
        self.router = Router(store=store, prefix=settings.osc_prefix, aliases=settings.osc_aliases,
                             allow=parse_allow(settings.osc_allow), actions=actions, presets=presets)
        self._parts: list = []
        self._started = self._closed = False
        self._store_error: tuple[str, float] | None = None  # the latest refusal by the engine, and when
        self.osc_port: int | None = None
        self.oscquery_port: int | None = None

    def start(self) -> "ControlPlane":
        if self._started:
            return self
        self._started = True
        try:
            self._start_parts()
        except BaseException:
            self.close()
            raise
        return self

    def _start_parts(self) -> None:
        from .oscquery import OSCQueryServer

        s = self.settings
        udp = self._bind("osc_port", lambda: UDPServer(host=s.osc_bind, port=s.osc_port, handler=self.router.handle))
        self.osc_port = udp.port
        if s.osc_tcp:
            self._bind("osc_port", lambda: TCPServer(host=s.osc_bind, port=udp.port, handler=self.router.handle,
                                                     on_error=self.router.report_error, allow=self.router.accepts))
        query_port = s.resolved_oscquery_port
        if query_port is not None:
            server = self._bind("oscquery_port", lambda: OSCQueryServer(
                host=s.osc_bind, port=query_port, prefix=s.osc_prefix, osc_port=udp.port, values=self._values,
                unavailable=self._unavailable, allow=self.router.accepts))
            self.oscquery_port = server.port
        if s.status_target is not None:
            try:
                sender = StatusSender(target=parse_target(s.status_target), snapshot=self.snapshot,
                                      prefix=s.osc_prefix, interval=s.status_interval)
            except ValueError as exc:  # e.g. a host name that does not resolve
                raise UserError(str(exc)) from None
            self._parts.append(sender)
        if s.zeroconf:
            from .mdns import Advertiser

            self._parts.append(Advertiser(bind=s.osc_bind, osc_port=udp.port, osc_tcp=s.osc_tcp,
                                          oscquery_port=self.oscquery_port))
        self._store.add_listener(self._heard)
        log.info("OSC on %s:%d (UDP%s), OSCQuery %s, status %s", s.osc_bind, udp.port, " + TCP" if s.osc_tcp else "",
                 f"http://{s.osc_bind}:{self.oscquery_port}/" if self.oscquery_port else "off",
                 s.status_target or "off")

    def _bind(self, field: str, make):
        bind = self.settings.osc_bind
        port = self.settings.osc_port if field == "osc_port" else self.settings.resolved_oscquery_port
        try:
            part = make()
        except OSError as exc:
            reason = exc.strerror or exc
            if exc.errno == errno.EADDRNOTAVAIL:
                raise UserError(f"osc_bind: {bind!r} is not an address of this machine ({reason}); "
                                "choose another with --osc-bind") from None
            flag = field.replace("_", "-")
            raise UserError(f"{flag}: cannot listen on {bind}:{port}: {reason}; choose another with --{flag}") from None
        self._parts.append(part)
        return part

    def _heard(self, name: str, value: Any, error: str | None) -> None:
        """Store listener (runs on the inference thread): keep the latest rejection only."""
        if error is not None and not self._closed:
            self._store_error = (f"{name}: {error}", time.monotonic())

    def _values(self) -> dict:
        return self._store.applied

    def _unavailable(self) -> dict:
        return self._store.unavailable

    def snapshot(self) -> dict:
        """The telemetry snapshot plus the control plane's own figures (for status out)."""
        snapshot = dict(self._telemetry() or {}) if self._telemetry is not None else {"state": "running"}
        counters = self.router.counters
        snapshot["osc_refused"] = sum(counters[k] for k in (
            "dropped_sender", "malformed", "over_limit", "unknown_address", "bad_pattern", "rejected"))
        now = time.monotonic()
        errors = []
        if snapshot.get("last_error"):
            errors.append((now - (snapshot.get("last_error_age") or 0.0), snapshot["last_error"]))
        if self._store_error is not None:
            errors.append(self._store_error[::-1])
        if self.router.last_error is not None:
            errors.append((self.router.last_error_time, self.router.last_error))
        if errors:  # the newest of the run's, the engine's and the OSC router's
            when, text = max(errors, key=lambda error: error[0])
            snapshot["last_error"], snapshot["last_error_age"] = text, now - when
        return snapshot

    @property
    def counters(self) -> dict[str, int]:
        return self.router.counters

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for part in reversed(self._parts):
            try:
                part.close()
            except Exception:
                log.exception("closing %s failed", type(part).__name__)
        self._parts.clear()

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()


__all__ = ["ControlPlane", "ControlSettings", "DEFAULT_OSC_PORT", "add_arguments"]
