"""OSCQuery: the parameter table as JSON over HTTP (Vidvox OSCQuery proposal), read-only.

    GET /                 the whole tree: FULL_PATH, CONTENTS, TYPE, RANGE, VALUE, ACCESS, DESCRIPTION
    GET /sd/guidance      one node
    GET /sd/guidance?VALUE  {"VALUE": [1.2]}  (any attribute; 204 when the node has none, 400 when unknown)
    GET /?HOST_INFO       NAME, OSC_IP, OSC_PORT, OSC_TRANSPORT, EXTENSIONS

Only the prefixed addresses are advertised (the StreamDiffusionTD aliases work but are not
listed). VALUE comes from the parameter store's applied values, else the table's default. A
parameter this run cannot take (a live LoRA slot with no LoRA in it) has ACCESS 0 and says why
in its DESCRIPTION.
Tree building and query answering are pure functions; the HTTP server is a thin adapter.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from .servers import socket_options
from .table import INT32_MAX, Param, addresses

log = logging.getLogger(__name__)

ATTRIBUTES = ("FULL_PATH", "CONTENTS", "TYPE", "RANGE", "VALUE", "ACCESS", "DESCRIPTION", "CLIPMODE",
              "UNIT", "EXTENDED_TYPE", "CRITICAL", "TAGS", "OVERLOADS", "HOST_INFO")
EXTENSIONS = {"ACCESS": True, "VALUE": True, "RANGE": True, "DESCRIPTION": True, "TAGS": False,
              "EXTENDED_TYPE": False, "UNIT": False, "CRITICAL": False, "CLIPMODE": True,
              "LISTEN": False, "PATH_CHANGED": False}
REQUEST_TIMEOUT_SECONDS = 5.0  # a client that sends nothing is dropped after this long
REQUEST_DEADLINE_SECONDS = 10.0  # and any connection after this long, however slowly it sends
MAX_CONNECTIONS = 32  # at once; more are closed at once (the OSC servers keep their descriptors)


def leaf(param: Param, normalized: bool, full_path: str, value: Any, unavailable: str | None = None) -> dict:
    """The OSCQuery attributes of one address; `unavailable`: why this run cannot take it (then
    ACCESS 0, neither readable nor writable, and no VALUE)."""
    if unavailable is not None:
        node = leaf(param, normalized, full_path, None)
        node.pop("VALUE", None)
        return {**node, "ACCESS": 0, "DESCRIPTION": f"{node['DESCRIPTION']} [unavailable: {unavailable}]"}
    node: dict[str, Any] = {"FULL_PATH": full_path, "DESCRIPTION": param.description,
                            "ACCESS": 3 if param.target == "engine" and not normalized else 2}
    if normalized:
        node.update(TYPE="f", RANGE=[{"MIN": 0.0, "MAX": 1.0}], CLIPMODE="both",
                    DESCRIPTION=f"{param.description} (0..1 mapped onto {param.minimum:g}..{param.maximum:g})")
        return node
    values = _as_list(param, value)
    node["TYPE"] = _type_for(param, values)
    ranges = _ranges(param, len(values) if values is not None else None)
    if ranges is not None:
        node["RANGE"] = ranges
    if param.kind in ("float", "int"):
        node["CLIPMODE"] = "both"
    if values is not None and param.target == "engine":
        node["VALUE"] = values
    return node


def _as_list(param: Param, value: Any) -> list | None:
    if value is None:
        return None
    if param.kind in ("int_list", "size"):
        return [int(v) for v in value]
    if param.kind in ("prompt_blend", "seed_blend"):
        return [item for pair in value for item in pair]
    return [value]


def _type_for(param: Param, values: list | None) -> str:
    if param.kind == "int_list" and values:
        return "i" * len(values)
    if param.kind in ("prompt_blend", "seed_blend") and values:
        return param.osc_type * (len(values) // 2)
    return param.osc_type


def _ranges(param: Param, count: int | None) -> list | None:
    numeric = {"MIN": param.minimum, "MAX": param.maximum}
    if param.kind in ("float", "int"):
        return [numeric]
    if param.kind == "int_list":
        return [numeric] * (count or len(param.default or (0,)))
    if param.kind == "size":
        return [numeric, numeric]
    if param.kind == "prompt_blend":
        return [{}, numeric] * max(1, (count or 2) // 2)
    if param.kind == "seed_blend":
        return [{"MIN": 0, "MAX": INT32_MAX}, numeric] * max(1, (count or 2) // 2)
    if param.kind == "choice":
        return [{"VALS": list(param.choices)}]
    return None


def build_tree(*, prefix: str, values: dict[str, Any], unavailable: dict[str, str] | None = None) -> dict:
    """The whole OSCQuery tree for the table under `prefix` (aliases are not advertised);
    `unavailable`: parameters this run cannot take, with why (see `leaf`)."""
    unavailable = unavailable or {}
    root: dict[str, Any] = {"FULL_PATH": "/", "DESCRIPTION": "sdbridge live parameters", "ACCESS": 0,
                            "CONTENTS": {}}
    for full_path, (param, normalized) in addresses(prefix, aliases=False).items():
        node = root
        parts = full_path[1:].split("/")
        for depth, part in enumerate(parts):
            contents = node.setdefault("CONTENTS", {})
            if part not in contents:
                contents[part] = {"FULL_PATH": "/" + "/".join(parts[:depth + 1]), "ACCESS": 0}
            node = contents[part]
        value = values.get(param.name, param.default)
        node.update(leaf(param, normalized, full_path, value, unavailable.get(param.name)))
    return root


def find_node(tree: dict, path: str) -> dict | None:
    node = tree
    for part in [p for p in path.split("/") if p]:
        node = node.get("CONTENTS", {}).get(part)
        if node is None:
            return None
    return node


def answer(tree: dict, target: str, host_info: dict) -> tuple[int, dict | None]:
    """(HTTP status, JSON body or None) for a GET of `target` (path and optional ?ATTR); 400 for
    a target that is not a URL."""
    try:
        parts = urlsplit(target)
    except ValueError:
        return 400, None
    path, query = unquote(parts.path) or "/", parts.query.split("&")[0].upper()
    if query == "HOST_INFO":
        return 200, host_info
    node = find_node(tree, path)
    if node is None:
        return 404, None
    if not query:
        return 200, node
    if query not in ATTRIBUTES:
        return 400, None
    if query not in node:
        return 204, None
    return 200, {query: node[query]}


def _server_bind(httpd) -> None:
    """HTTPServer's bind with the socket options of the OSC servers (servers.socket_options): not
    SO_REUSEADDR on Windows, where it would let a second bridge bind the port beside this one."""
    for option, value in socket_options(socket.SOCK_STREAM):
        httpd.socket.setsockopt(socket.SOL_SOCKET, option, value)
    ThreadingHTTPServer.server_bind(httpd)


class OSCQueryServer:
    """Serves `answer(...)` over HTTP on (host, port). `values()` gives the current values.
    Only peers `allow(peer)` accepts are answered (the OSC servers' allow list); at most
    `max_connections` at once, each closed after `request_deadline_seconds`; a client's broken
    request or early hang-up is a debug line, not a traceback."""

    def __init__(self, *, host: str, port: int, prefix: str, osc_port: int,
                 values: Callable[[], dict], unavailable: Callable[[], dict] = dict, name: str = "sdbridge",
                 allow: Callable[[tuple], bool] = lambda peer: True, max_connections: int = MAX_CONNECTIONS,
                 request_deadline_seconds: float = REQUEST_DEADLINE_SECONDS) -> None:
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT_SECONDS
            server_version = "sdbridge-oscquery"

            def setup(self) -> None:
                super().setup()
                self._deadline = threading.Timer(request_deadline_seconds, _shut, (self.connection,))
                self._deadline.daemon = True
                self._deadline.start()

            def finish(self) -> None:
                self._deadline.cancel()
                super().finish()

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server_self._get(self)

            def log_message(self, format: str, *args) -> None:  # noqa: A002
                log.debug("oscquery %s: " + format, self.client_address[0], *args)

        self._prefix, self._osc_port, self._values, self._name = prefix, osc_port, values, name
        self._unavailable = unavailable
        self._slots = threading.BoundedSemaphore(max_connections)
        self.refused_connections = 0
        server_class = type("OSCQueryHTTPServer", (ThreadingHTTPServer,), {
            "address_family": _family(host), "daemon_threads": True,
            "allow_reuse_address": False, "server_bind": _server_bind,  # the OSC servers' options (Windows)
            "verify_request": lambda httpd, request, peer: allow(peer) and self._take_slot(),
            "process_request_thread": _releasing(ThreadingHTTPServer.process_request_thread, self._slots),
            "handle_error": lambda httpd, request, peer: log.debug("oscquery %s: request failed", peer[0],
                                                                   exc_info=True),
        })
        self._httpd = server_class((host, port), Handler)
        self.port = self._httpd.server_address[1]
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="sdbridge oscquery", daemon=True)
        self._thread.start()

    def _get(self, request: BaseHTTPRequestHandler) -> None:
        try:
            values, unavailable = dict(self._values() or {}), dict(self._unavailable() or {})
        except Exception:
            log.exception("oscquery: reading the current values failed")
            values, unavailable = {}, {}
        host_info = {"NAME": self._name, "OSC_IP": request.connection.getsockname()[0],
                     "OSC_PORT": self._osc_port, "OSC_TRANSPORT": "UDP", "EXTENSIONS": EXTENSIONS}
        tree = build_tree(prefix=self._prefix, values=values, unavailable=unavailable)
        status, body = answer(tree, request.path, host_info)
        payload = b"" if body is None else json.dumps(body).encode("utf-8")
        request.send_response(status)
        if body is not None:
            request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(payload)))
        request.end_headers()
        request.wfile.write(payload)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._httpd.shutdown()
        self._thread.join(2.0)
        self._httpd.server_close()

    def _take_slot(self) -> bool:
        if self._slots.acquire(blocking=False):
            return True
        self.refused_connections += 1
        return False


def _releasing(process_request_thread, slots: threading.BoundedSemaphore):
    """`process_request_thread` that gives its connection's slot back when done."""

    def run(httpd, request, peer) -> None:
        try:
            process_request_thread(httpd, request, peer)
        finally:
            slots.release()

    return run


def _shut(connection: socket.socket) -> None:
    """End a connection that outlived its deadline (its handler's next read or write fails)."""
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
