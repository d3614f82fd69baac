"""OSC status out: once a second, one value per address, to `--status-target host:port`.

    /sd/status/alive          i  1
    /sd/status/fps            f  frames the engine processed per second
    /sd/status/output_fps     f  frames sent to the sinks per second
    /sd/status/inference_ms   f  median engine time per frame
    /sd/status/latency_ms     f  median capture-to-publish time
    /sd/status/frames_skipped i  frames the similarity filter skipped (total)
    /sd/status/frames_dropped i  frames replaced before the next stage took them (total)
    /sd/status/state          i  0 starting, 1 running, 2 paused, 3 source lost, 4 stopping, 5 stopped, 6 stalled, 7 updating, -1 other
    /sd/status/state_name     s  the same as text
    /sd/status/osc_refused    i  OSC messages refused so far (malformed, unknown, out of the allow-list ...)
    /sd/status/sink_errors    i  sends to a sink that failed (total)
    /sd/status/sink_missed    i  frames a sink never got because its earlier sends were still running (total)
    /sd/status/recording      i  files the file sinks are writing now (0 after /sd/record/stop)
    /sd/status/error          s  the latest error, when there is one
    /sd/status/backend        s  what runs the frames, e.g. "compiled+step graph", "eager (fallback from tensorrt)"
    /sd/status/size           s  the processing size, e.g. "704x384" (it changes with /sd/resolution, and with
                                 --aspect source when the source changes shape)

Numbers go one per address so TouchDesigner's OSC In CHOP shows each as a channel; the
strings are for an OSC In DAT. A figure that has no value yet (no frame processed) is not sent.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Callable

from .osc import encode_message

log = logging.getLogger(__name__)

STATES = {"starting": 0, "running": 1, "paused": 2, "source lost": 3, "stopping": 4, "stopped": 5, "stalled": 6,
          "updating": 7}
# (address suffix, snapshot key, type)
FIGURES = (
    ("fps", "processed_fps", float),
    ("output_fps", "output_fps", float),
    ("inference_ms", "inference_ms_median", float),
    ("latency_ms", "latency_ms_median", float),
    ("frames_skipped", "frames_skipped", int),
    ("frames_dropped", "frames_dropped", int),
    ("osc_refused", "osc_refused", int),
    ("sink_errors", "sink_errors", int),
    ("sink_missed", "sink_missed", int),
    ("recording", "recording", int),
)


def parse_target(text: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError naming status_target."""
    host, separator, port_text = str(text).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not separator or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"status_target: {text!r} must be host:port, e.g. 127.0.0.1:7452")
    return host, int(port_text)


def status_messages(snapshot: dict, *, prefix: str = "/sd", last_error: str | None = None) -> list[bytes]:
    """The encoded messages for one status tick (a pure function of the snapshot)."""
    base = prefix + "/status"
    messages = [encode_message(base + "/alive", 1)]
    for suffix, key, kind in FIGURES:
        value = snapshot.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            messages.append(encode_message(f"{base}/{suffix}", kind(value)))
    state = str(snapshot.get("state", "unknown"))
    messages.append(encode_message(base + "/state", STATES.get(state, -1)))
    messages.append(encode_message(base + "/state_name", state[:64]))
    if snapshot.get("backend"):
        messages.append(encode_message(base + "/backend", str(snapshot["backend"])[:128]))
    if snapshot.get("size"):
        messages.append(encode_message(base + "/size", str(snapshot["size"])[:32]))
    error = snapshot.get("last_error") or last_error
    if error:
        messages.append(encode_message(base + "/error", str(error)[:512].replace("\x00", " ")))
    return messages


class StatusSender:
    """Sends `status_messages(snapshot())` to `target` every `interval` seconds on a daemon thread."""

    def __init__(self, *, target: tuple[str, int], snapshot: Callable[[], dict], prefix: str = "/sd",
                 interval: float = 1.0) -> None:
        if not 0.05 <= interval <= 60:
            raise ValueError(f"interval: {interval!r} must be in 0.05..60 seconds")
        try:
            infos = socket.getaddrinfo(target[0], target[1], type=socket.SOCK_DGRAM)  # resolved once
        except OSError as exc:
            raise ValueError(f"status_target: cannot resolve {target[0]!r}: {exc.strerror or exc}") from None
        family, _, _, _, address = infos[0]
        self._address = address
        self._snapshot, self._prefix, self._interval = snapshot, prefix, interval
        self._socket = socket.socket(family, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        # connected: the kernel picks the local address on the route to the target (127.0.0.1 for a
        # local receiver) instead of binding 0.0.0.0, and delivers datagrams from the target only
        self._connected = False
        self._closed = threading.Event()
        self._failures = 0
        self.sent = 0  # ticks sent
        self._thread = threading.Thread(target=self._run, name="sdbridge osc status", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            self.tick()
            self._closed.wait(self._interval)

    def tick(self) -> None:
        try:
            snapshot = dict(self._snapshot() or {})
        except Exception as exc:  # telemetry's bug: still say we are alive, with the error
            snapshot = {"state": "unknown", "last_error": f"status: {type(exc).__name__}: {exc}"}
        try:
            if not self._connected:  # no route yet (a desk's network still coming up): next tick
                self._socket.connect(self._address)
                self._connected = True
            for message in status_messages(snapshot, prefix=self._prefix):
                self._socket.send(message)
            self.sent += 1
        except (OSError, ValueError) as exc:  # unreachable target, full buffer: try again next tick
            self._failures += 1
            if self._failures in (1, 10, 100) or self._failures % 1000 == 0:
                log.warning("OSC status to %s failed (%d times): %s", self._address, self._failures, exc)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join(self._interval + 1.0)
        self._socket.close()
