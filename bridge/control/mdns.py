"""Advertising the control plane over mDNS/DNS-SD (`--zeroconf`), so that OSCQuery clients
(TouchDesigner's OSCQuery support, Chataigne, Vezér ...) find the bridge without being told
its host and ports.

What is advertised, as the OSCQuery proposal names it: `_oscjson._tcp` on the OSCQuery HTTP
port (when OSCQuery is on), and the OSC ports themselves as `_osc._udp` and `_osc._tcp`. The
instance is "sdbridge on HOST (port 7450)": the OSC port keeps two bridges on one machine apart.
The addresses are the interface's the control plane listens on: 127.0.0.1 reaches only this
machine (its loopback), 0.0.0.0 every IPv4 address of every interface (:: every IPv6 one).

Nothing here may stop the show: registering (a second or two of probing) runs on its own
thread, and a failure is a warning; closing sends the goodbyes within a bounded time.
Opt-in: an mDNS announcement tells every machine on the network that a control port is here.
"""

from __future__ import annotations

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
        import zeroconf
    except ImportError:
        return "zeroconf: the zeroconf package is not installed: pip install 'sdbridge[zeroconf]'"
    log.debug("python-zeroconf %s", zeroconf.__version__)
    return None


def advertised_addresses(bind: str, interface_addresses: list[str]) -> list[str]:
    """The addresses to advertise for a control plane bound to `bind`: that address itself, or
    for a wildcard every one of `interface_addresses` of its family (0.0.0.0: IPv4; "::": IPv6,
    since a socket bound to it may take IPv6 only, Windows' default), never a link-local one
    (it needs its scope) and no loopback one unless there is nothing else (a LAN client
    handed 127.0.0.1 would talk to itself)."""
    if bind == "localhost":
        bind = "127.0.0.1"
    address = ipaddress.ip_address(bind.split("%")[0])
    if not address.is_unspecified:
        return [str(address)]
    routable, loopback = [], []
    for text in interface_addresses:
        try:
            candidate = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        if candidate.version != address.version or candidate.is_link_local:
            continue
        chosen = loopback if candidate.is_loopback else routable
        if str(candidate) not in chosen:
            chosen.append(str(candidate))
    return routable or loopback


def _interface_addresses() -> list[str]:
    """Every IP address of this machine's interfaces (ifaddr: zeroconf's own dependency)."""
    import ifaddr

    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            found.append(ip.ip if isinstance(ip.ip, str) else ip.ip[0])  # IPv6 comes as (address, flow, scope)
    return found


def _host_name() -> str:
    """This machine's name without its domain (what mDNS names a host)."""
    return socket.gethostname().split(".")[0] or "sdbridge"


class Advertiser:
    """The control plane's services on mDNS, registered beside the show (each service's probing
    takes a second or two; they probe side by side); `close()` takes them back (goodbye packets)
    within CLOSE_SECONDS, also while they are still being registered."""

    def __init__(self, *, bind: str, osc_port: int, osc_tcp: bool, oscquery_port: int | None,
                 instance: str | None = None) -> None:
        self._bind = bind
        self._ports = {"osc_udp": osc_port}
        if osc_tcp:
            self._ports["osc_tcp"] = osc_port
        if oscquery_port is not None:
            self._ports["oscquery"] = oscquery_port
        # unique by itself: two bridges on one machine (python-zeroconf renames a taken name only
        # when the other's records happen to be in its cache while it probes)
        self.instance = instance or f"sdbridge on {_host_name()} (port {osc_port})"
        self.registered: list[str] = []  # the service names registered so far
        self._zeroconf = None
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
            version = ipaddress.ip_address(addresses[0]).version
            ip_version = IPVersion.V6Only if version == 6 else IPVersion.V4Only
            specific = not ipaddress.ip_address(self._bind.replace("localhost", "127.0.0.1").split("%")[0]).is_unspecified
            server = f"{_host_name()}.local."
            with self._lock:
                if self._closed:
                    return
                # a specific address: its interface only; a wildcard: every interface (the default)
                self._zeroconf = (Zeroconf(interfaces=addresses, ip_version=ip_version) if specific
                                  else Zeroconf(ip_version=ip_version))
            infos = [ServiceInfo(SERVICE_TYPES[kind], f"{self.instance}.{SERVICE_TYPES[kind]}", port=port,
                                 parsed_addresses=addresses, server=server,
                                 properties={"txtvers": "1"} if kind == "oscquery" else {})
                     for kind, port in self._ports.items()]
            threads = [threading.Thread(target=self._register_one, args=(info,), name="sdbridge-mdns-probe",
                                        daemon=True) for info in infos]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if self.registered and not self._closed:
                log.info("advertised over mDNS at %s: %s", ", ".join(addresses), "; ".join(self.registered))
        except Exception as exc:  # advertising is a convenience: never the show's problem
            if not self._closed:
                log.warning("mDNS advertising failed (%s: %s); clients need the host and ports given to them",
                            type(exc).__name__, exc)

    def _register_one(self, info) -> None:
        try:
            self._zeroconf.register_service(info, allow_name_change=True)
        except Exception as exc:  # (closed meanwhile: the close took it back)
            if not self._closed:
                log.warning("mDNS: could not advertise %s (%s: %s)", info.name, type(exc).__name__, exc)
            return
        with self._lock:
            self.registered.append(info.name)

    def close(self) -> None:
        """Take the services back (goodbyes) and stop, within CLOSE_SECONDS: a registration still
        probing is cut short (the library's close unregisters what it holds)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            zeroconf = self._zeroconf
            announced = bool(self.registered)
        if zeroconf is None:
            return
        closer = threading.Thread(target=zeroconf.close, name="sdbridge-mdns-close", daemon=True)
        closer.start()
        if not announced:  # nothing to say goodbye to yet: the library's close (about 1 s while
            return  # probes run) finishes beside the stop, or not at all if the process ends first
        closer.join(CLOSE_SECONDS)
        if closer.is_alive():
            log.warning("mDNS: the goodbyes took over %.1f s; left to finish in the background", CLOSE_SECONDS)
