"""Thin socket adapters around a `handle(data, sender)` callable: UDP, and TCP with OSC 1.0
(int32 length prefix) or OSC 1.1 (SLIP) framing, detected per connection from its first byte.

Both run on daemon threads, wake at least every `POLL_SECONDS` to notice close(), and never
hold more than one packet's worth of bytes per connection. `close()` is idempotent.
"""

from __future__ import annotations

import logging
import socket
import struct
import sys
import threading
import time
from typing import Callable

from ..ratelimit import RateLimitedLog
from .osc import OSCError, slip_decode

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # how often blocked receive loops look at the close flag
UDP_BUFFER_BYTES = 65535  # recvfrom size: any UDP datagram (max payload 65507) is read in full
UDP_SOCKET_BUFFER = 1 << 20  # kernel receive buffer: absorbs bursts; beyond it the kernel drops
MAX_TCP_CONNECTIONS = 16  # more are accepted and closed at once, unless one of these is idle:
EVICT_IDLE_SECONDS = 10.0  # then the one idle longest (at least this long) is closed for the newcomer
TCP_READ_BYTES = 65536

Handler = Callable[[bytes, tuple], None]
ErrorHandler = Callable[[OSCError, tuple], None]  # (what went wrong, peer): for counters and logs


def _log_error(error: OSCError, peer: tuple) -> None:
    log.warning("OSC TCP from %s: %s", peer[0], error)


def _address_family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def socket_options(kind: int, platform: str = sys.platform) -> list[tuple[int, int]]:
    """The SOL_SOCKET (option, value) pairs a server socket of `kind` gets before binding.

    UDP: a large receive buffer (bursts). TCP on POSIX: SO_REUSEADDR, so that a restart binds
    while the last run's connections sit in TIME_WAIT. Not on Windows, where SO_REUSEADDR means
    something else: it lets a socket bind a port another one already listens on (a second
    bridge would take 7450 beside the first, silently). There, as `socket.create_server` does,
    no option: a second bind of the port fails. (Not SO_EXCLUSIVEADDRUSE either: Microsoft
    documents that its port stays taken while the closed socket's connections linger, which
    would refuse a quick Stop-then-Start from TouchDesigner or OBS.)"""
    options = [(socket.SO_RCVBUF, UDP_SOCKET_BUFFER)] if kind == socket.SOCK_DGRAM else []
    if kind == socket.SOCK_STREAM and platform != "win32":
        options.append((socket.SO_REUSEADDR, 1))
    return options


def _bound_socket(host: str, port: int, kind: int) -> socket.socket:
    """A socket of `kind` with its `socket_options`, bound to (host, port), polling every
    POLL_SECONDS; closed again if any step fails."""
    sock = socket.socket(_address_family(host), kind)
    try:
        for option, value in socket_options(kind):
            sock.setsockopt(socket.SOL_SOCKET, option, value)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.settimeout(POLL_SECONDS)
    return sock


def _stop(server) -> bool:
    """Close `server` (a UDPServer or TCPServer): set its close flag, wait for its receive loop
    (it notices within POLL_SECONDS), close its socket. False if it was closed already."""
    if server._closed.is_set():
        return False
    server._closed.set()
    server._thread.join(2 * POLL_SECONDS + 1.0)
    server._socket.close()
    return True


class UDPServer:
    """Receives datagrams on (host, port) and hands each to `handler` on its own thread."""

    def __init__(self, *, host: str, port: int, handler: Handler) -> None:
        self._handler = handler
        self._socket = _bound_socket(host, port, socket.SOCK_DGRAM)
        self.port = self._socket.getsockname()[1]
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdbridge osc udp", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                data, sender = self._socket.recvfrom(UDP_BUFFER_BYTES)
            except socket.timeout:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                continue  # e.g. ICMP port unreachable reported on Windows; keep receiving
            self._handler(data, sender)

    def close(self) -> None:
        _stop(self)


class TCPServer:
    """Accepts up to MAX_TCP_CONNECTIONS; each connection's packets go to `handler`. When all
    are taken, a newcomer replaces the connection idle longest, if that one has sent nothing for
    EVICT_IDLE_SECONDS (vanished or silent peers never lock the others out; a desk idle between
    cues keeps its connection until the slots run out). Refusals are logged at most every 5 s."""

    def __init__(self, *, host: str, port: int, handler: Handler, max_packet_bytes: int = 65507,
                 on_error: ErrorHandler = _log_error, allow: Callable[[tuple], bool] = lambda peer: True,
                 max_connections: int = MAX_TCP_CONNECTIONS, evict_idle_seconds: float = EVICT_IDLE_SECONDS) -> None:
        self._handler = handler
        self._max_connections, self._evict_idle_seconds = max_connections, evict_idle_seconds
        self._allow = allow
        self._on_error = on_error
        self._max_packet = max_packet_bytes
        self._socket = _bound_socket(host, port, socket.SOCK_STREAM)
        try:
            self._socket.listen(8)
        except OSError:
            self._socket.close()
            raise
        self.port = self._socket.getsockname()[1]
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._last_heard: dict[threading.Thread, float] = {}  # time.monotonic() of each one's last bytes
        self.refused_connections = 0
        self._log = RateLimitedLog(log)  # refusals and accept errors, at most every 5 s each
        self._thread = threading.Thread(target=self._accept, name="sdbridge osc tcp", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                connection, peer = self._socket.accept()
            except socket.timeout:
                continue
            except OSError as exc:  # e.g. out of file descriptors: the connection stays queued, so wait
                if self._closed.is_set():
                    return
                self._log.warning("accept", "OSC TCP: accepting a connection failed: %s", exc)
                self._closed.wait(POLL_SECONDS)
                continue
            if not self._allow(peer):
                connection.close()
                continue
            with self._lock:
                if len(self._connections) >= self._max_connections and not self._closed.is_set():
                    self._evict_idle()
                if len(self._connections) >= self._max_connections or self._closed.is_set():
                    self.refused_connections += 1
                    connection.close()
                    self._log.warning("refused", "OSC TCP connection from %s refused: %d already open (%d refused so far)",
                                               peer[0], self._max_connections, self.refused_connections)
                    continue
                connection.settimeout(POLL_SECONDS)
                thread = threading.Thread(target=self._serve, args=(connection, peer), daemon=True,
                                          name=f"sdbridge osc tcp {peer[0]}:{peer[1]}")
                self._connections[thread] = connection
                self._last_heard[thread] = time.monotonic()
            thread.start()

    def _evict_idle(self) -> None:
        """(With the lock held.) Shut down the connection idle longest if it has been idle for
        EVICT_IDLE_SECONDS; its thread then closes it and frees the slot at once."""
        thread = min(self._last_heard, key=self._last_heard.get, default=None)
        idle = time.monotonic() - self._last_heard[thread] if thread is not None else 0.0
        if idle < self._evict_idle_seconds:
            return
        connection = self._connections.pop(thread)
        self._last_heard.pop(thread)
        log.info("OSC TCP: closing %s, idle for %.0f s, for a new connection", thread.name, idle)
        try:
            connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # already gone
            pass

    def _serve(self, connection: socket.socket, peer: tuple) -> None:
        framer = StreamFramer(max_packet_bytes=self._max_packet)
        me = threading.current_thread()
        try:
            while not self._closed.is_set():
                try:
                    chunk = connection.recv(TCP_READ_BYTES)
                except socket.timeout:
                    continue
                if not chunk:
                    return
                with self._lock:
                    if me in self._last_heard:
                        self._last_heard[me] = time.monotonic()
                packets = framer.feed(chunk)
                for error in framer.take_errors():
                    self._on_error(error, peer)
                for packet in packets:
                    self._handler(packet, peer)
        except OSCError as exc:  # the stream cannot be read on: close it
            self._on_error(exc, peer)
        except OSError as exc:  # a reset peer (one line each: debug, not the show's log)
            log.debug("OSC TCP connection from %s closed: %s", peer[0], exc)
        finally:
            connection.close()
            with self._lock:
                self._connections.pop(me, None)
                self._last_heard.pop(me, None)

    def close(self) -> None:
        if not _stop(self):
            return
        with self._lock:
            threads = list(self._connections)
        for thread in threads:
            thread.join(2 * POLL_SECONDS + 1.0)


class StreamFramer:
    """Splits a TCP byte stream into OSC packets. The first byte decides the framing for the
    whole connection: 0xC0 (SLIP END), '/' or '#' -> OSC 1.1 SLIP; anything else -> OSC 1.0
    int32 big-endian length prefix. Holds at most one packet (plus one read) in memory.

    Length-prefix errors (a length over the limit, negative, or not a multiple of 4) leave the
    stream unreadable: OSCError, and the connection is closed. A SLIP frame over the limit is
    skipped up to its END byte (the frame boundary is still known), like a frame with a bad
    escape; both are reported by `take_errors()`."""

    def __init__(self, *, max_packet_bytes: int) -> None:
        self._max = max_packet_bytes
        self._buffer = bytearray()
        self._mode: str | None = None
        self._skipping = False  # SLIP: inside an oversized frame, dropping bytes until END
        self._errors: list[OSCError] = []

    def take_errors(self) -> list[OSCError]:
        errors, self._errors = self._errors, []
        return errors

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._mode is None and chunk:
            self._mode = "slip" if chunk[0] in (0xC0, ord("/"), ord("#")) else "length"
        self._buffer += chunk
        return self._slip_packets() if self._mode == "slip" else self._length_packets()

    def _length_packets(self) -> list[bytes]:
        packets = []
        while len(self._buffer) >= 4:
            size = struct.unpack_from(">i", self._buffer, 0)[0]
            if size < 0 or size > self._max or size % 4:
                raise OSCError("malformed", f"TCP length prefix {size} is invalid (limit {self._max})")
            if len(self._buffer) < 4 + size:
                break
            if size:
                packets.append(bytes(self._buffer[4:4 + size]))
            del self._buffer[:4 + size]
        return packets

    def _slip_packets(self) -> list[bytes]:
        packets = []
        while True:
            end = self._buffer.find(b"\xc0")
            if end < 0:
                if len(self._buffer) > 2 * self._max + 2:  # escaped bytes can double the size
                    self._buffer.clear()
                    if not self._skipping:
                        self._errors.append(OSCError("too_large", f"SLIP frame over {self._max} bytes"))
                    self._skipping = True
                return packets
            frame = bytes(self._buffer[:end])
            del self._buffer[:end + 1]
            if self._skipping:
                self._skipping = False
                continue
            if not frame:
                continue  # the leading END of the double-END form
            try:
                packet = slip_decode(frame)
            except OSCError as exc:  # a bad escape drops this frame only
                self._errors.append(exc)
                continue
            if len(packet) > self._max:
                self._errors.append(OSCError("too_large", f"SLIP frame of {len(packet)} bytes over {self._max}"))
                continue
            packets.append(packet)
