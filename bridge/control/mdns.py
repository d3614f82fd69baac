"""Advertising the control plane over mDNS/DNS-SD (`--zeroconf`), so that OSCQuery clients
(TouchDesigner's OSCQuery support, Chataigne, Vezér ...) find the bridge without being told
its host and ports.

What is advertised, as the OSCQuery proposal names it: `_oscjson._tcp` on the OSCQuery HTTP
port (when OSCQuery is on), and the OSC ports themselves as `_osc._udp` and `_osc._tcp`. The
instance is "sdbridge on HOST" (the library picks "... (2)" when another bridge took it).
The addresses are the interface's the control plane listens on: 127.0.0.1 reaches only this
machine (its loopback), 0.0.0.0 (or ::) every address of every interface.

Nothing here may stop the show: registering (a second or two of probing) runs on its own
thread, and a failure is a warning; closing sends the goodbyes within a bounded time.
Opt-in: an mDNS announcement tells every machine on the network that a control port is here.
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
import socket
import threading

log = logging.getLogger(__name__)

SERVICE_TYPES = {"oscquery": "_oscjson._tcp.local.", "osc_udp": "_osc._udp.local.", "osc_tcp": "_osc._tcp.local."}
CLOSE_SECONDS = 1.5  # at most this long for the goodbyes at close (the whole stop has 3 s)


def zeroconf_problem() -> str | None:
    """Why `--zeroconf` cannot work here (the package missing), or None."""
    try:
        importlib.import_module("zeroconf")
    except ImportError:
        return "zeroconf: the zeroconf package is not installed: pip install 'sdbridge[zeroconf]'"
    return None


def advertised_addresses(bind: str, interface_addresses: list[str]) -> list[str]:
    """The addresses to advertise for a control plane bound to `bind`: that address itself, or
    for a wildcard (0.0.0.0, ::) every one of `interface_addresses` of that family (both for ::),
    loopback last so that a client on another machine tries a reachable one first."""
    if bind == "localhost":
        bind = "127.0.0.1"
    address = ipaddress.ip_address(bind.split("%")[0])
    if not address.is_unspecified:
        return [str(address)]
    families = (4, 6) if address.version == 6 else (4,)
    chosen = []
    for text in interface_addresses:
        try:
            candidate = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        if candidate.version in families and not candidate.is_link_local and str(candidate) not in chosen:
            chosen.append(str(candidate))
    return sorted(chosen, key=lambda text: ipaddress.ip_address(text).is_loopback)


def _interface_addresses() -> list[str]:
    """Every IP address of this machine's interfaces (ifaddr: zeroconf's own dependency)."""
    import ifaddr

    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            found.append(ip.ip if isinstance(ip.ip, str) else ip.ip[0])  # IPv6 comes as (address, flow, scope)
    return found


class Advertiser:
    """The control plane's services on mDNS, registered on a thread of its own; `close()` takes
    them back (goodbye packets) within CLOSE_SECONDS."""

    def __init__(self, *, bind: str, osc_port: int, osc_tcp: bool, oscquery_port: int | None,
                 instance: str | None = None) -> None:
        self._bind = bind
        self._ports = {"osc_udp": osc_port}
        if osc_tcp:
            self._ports["osc_tcp"] = osc_port
        if oscquery_port is not None:
            self._ports["oscquery"] = oscquery_port
        self.instance = instance or f"sdbridge on {socket.gethostname().split('.')[0] or 'this machine'}"
        self.registered: list[str] = []  # the service names registered so far
        self._zeroconf = None
        self._infos: list = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._register, name="sdbridge-mdns", daemon=True)
        self._thread.start()

    def _register(self) -> None:
        try:
            from zeroconf import IPVersion, ServiceInfo, Zeroconf

            addresses = advertised_addresses(self._bind, _interface_addresses())
            if not addresses:
                log.warning("mDNS: no address to advertise for %s; not advertised", self._bind)
                return
            versions = {ipaddress.ip_address(a).version for a in addresses}
            ip_version = IPVersion.All if versions == {4, 6} else IPVersion.V6Only if versions == {6} else IPVersion.V4Only
            specific = not ipaddress.ip_address(self._bind.replace("localhost", "127.0.0.1").split("%")[0]).is_unspecified
            host = socket.gethostname().split(".")[0] or "sdbridge"
            with self._lock:
                if self._closed:
                    return
                # a specific address: its interface only; a wildcard: every interface (the default)
                self._zeroconf = (Zeroconf(interfaces=addresses, ip_version=ip_version) if specific
                                  else Zeroconf(ip_version=ip_version))
            for kind, port in self._ports.items():
                info = ServiceInfo(
                    SERVICE_TYPES[kind], f"{self.instance}.{SERVICE_TYPES[kind]}", port=port,
                    parsed_addresses=addresses, server=f"{host}.local.",
                    properties={"txtvers": "1"} if kind == "oscquery" else {},
                )
                with self._lock:
                    if self._closed:
                        return
                self._zeroconf.register_service(info, allow_name_change=True)
                with self._lock:
                    self._infos.append(info)
                    self.registered.append(info.name)
            log.info("advertised over mDNS as %r (%s) at %s", self.instance,
                     ", ".join(f"{SERVICE_TYPES[kind].split('.')[0]} {port}" for kind, port in self._ports.items()),
                     ", ".join(addresses))
        except Exception as exc:  # advertising is a convenience: never the show's problem
            if not self._closed:
                log.warning("mDNS advertising failed (%s: %s); clients need the host and ports given to them",
                            type(exc).__name__, exc)

    def close(self) -> None:
        """Take the services back (goodbyes) and stop; bounded by CLOSE_SECONDS."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        closer = threading.Thread(target=self._unregister, name="sdbridge-mdns-close", daemon=True)
        closer.start()
        closer.join(CLOSE_SECONDS)
        if closer.is_alive():
            log.warning("mDNS: the goodbyes took over %.1f s; left to finish in the background", CLOSE_SECONDS)

    def _unregister(self) -> None:
        self._thread.join(CLOSE_SECONDS)  # a registration under way ends at its next service
        zeroconf = self._zeroconf
        if zeroconf is None:
            return
        try:
            if self._infos:
                zeroconf.unregister_all_services()
        except Exception as exc:
            log.debug("mDNS unregister failed: %s", exc)
        finally:
            zeroconf.close()
