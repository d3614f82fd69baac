"""Show-safety, promise 8: the network surface is small.

- A running `sdbridge run` listens on 127.0.0.1 only (its sockets, read through psutil from
  /proc/net for the child's own socket inodes), unless another interface is configured.
- With --osc-allow, packets (UDP) and connections (TCP) from other addresses are dropped and
  counted: the sender binds 127.0.0.2 (Linux routes all of 127/8 to lo).
- No control message reaches a file: no parameter takes a path, string values land only in the
  prompts, and path-like values sent to every address (and to OSCQuery over HTTP) open, list,
  import or run nothing (Python's audit hooks see every open()).
"""

import http.client
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import psutil
import pytest
from pythonosc.osc_message import OscMessage

from bridge.control import ControlPlane, ControlSettings
from bridge.control.osc import encode_message
from bridge.control.table import BY_NAME, PARAMETERS, RUNTIME_NAMES
from bridge.params import LORA_NAMES, ParameterStore, apply_pending
from bridge.settings import RunSettings
from test_cli import REPO, TINY, child_env
from test_run_osc import free_port, query, wait_until

FREE_TEXT = {"prompt", "negative_prompt", "prompt_blend"}  # the only parameters that take free text


def listening(pid: int) -> list[tuple[str, str, int]]:
    """(kind, address, port) of every inet socket the process listens on or sends from: UDP
    sockets, and TCP sockets in LISTEN (an accepted connection from this test is not a server)."""
    kinds = {socket.SOCK_DGRAM: "udp", socket.SOCK_STREAM: "tcp"}
    return sorted(
        (kinds[c.type], c.laddr.ip, c.laddr.port)
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.type == socket.SOCK_DGRAM or c.status == psutil.CONN_LISTEN
    )


def test_run_listens_on_loopback_only_and_drops_senders_outside_the_allow_list():
    osc_port, query_port = free_port(), free_port()
    status = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    status.bind(("127.0.0.1", 0))
    status.settimeout(0.2)
    command = [sys.executable, "-m", "bridge.cli", "run", "--sink", "null", *TINY, "--fps", "5",
               "--osc-port", str(osc_port), "--oscquery-port", str(query_port), "--osc-allow", "127.0.0.1",
               "--status-target", f"127.0.0.1:{status.getsockname()[1]}"]
    process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert wait_until(lambda: query(query_port, "/?HOST_INFO"), 60), "OSCQuery never answered"
        sockets = listening(process.pid)
        for expected in [("udp", "127.0.0.1", osc_port), ("tcp", "127.0.0.1", osc_port), ("tcp", "127.0.0.1", query_port)]:
            assert expected in sockets, sockets
        servers = [s for s in sockets if s[2] in (osc_port, query_port)]
        assert len(servers) == 3, sockets  # nothing else listens
        assert {address for _, address, _ in sockets} == {"127.0.0.1"}, sockets  # status out too

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as outsider, \
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as outsider_tcp, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as insider:
            outsider.bind(("127.0.0.2", 0))
            for _ in range(5):
                outsider.sendto(encode_message("/sd/seed", 9), ("127.0.0.1", osc_port))
            outsider_tcp.bind(("127.0.0.2", 0))
            outsider_tcp.connect(("127.0.0.1", osc_port))
            packet = encode_message("/sd/seed", 10)
            try:
                outsider_tcp.sendall(struct.pack(">i", len(packet)) + packet)
            except OSError:
                pass  # already closed by the server: as good
            insider.bind(("127.0.0.1", 0))
            insider.sendto(encode_message("/sd/seed", 5), ("127.0.0.1", osc_port))
        assert wait_until(lambda: query(query_port, "/sd/seed?VALUE")["VALUE"] == [5], 30)
        outsider_http = http.client.HTTPConnection("127.0.0.1", query_port, timeout=5, source_address=("127.0.0.2", 0))
        with pytest.raises((http.client.HTTPException, OSError)):  # OSCQuery keeps the allow list too
            outsider_http.request("GET", "/?HOST_INFO")
            outsider_http.getresponse()
        outsider_http.close()

        def refused():
            try:
                message = OscMessage(status.recv(65536))
            except socket.timeout:
                return None
            return message.address == "/sd/status/osc_refused" and message.params[0] == 6

        assert wait_until(refused, 15), "status never reported 6 refused (5 UDP packets, 1 TCP connection)"
        assert query(query_port, "/sd/seed?VALUE")["VALUE"] == [5]  # 9 and 10 never applied
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=15)
        status.close()
    assert process.returncode == 0, err
    assert "OSC from 127.0.0.2 dropped: not in --osc-allow" in err


def test_loopback_is_the_default_and_another_interface_is_only_by_choice():
    assert RunSettings(sink=("null",)).osc_bind == ControlSettings().osc_bind == "127.0.0.1"
    with ControlPlane(store=ParameterStore(), settings=ControlSettings(osc_port=0, osc_bind="127.0.0.2")) as plane:
        sockets = listening(psutil.Process().pid)
        assert ("udp", "127.0.0.2", plane.osc_port) in sockets and ("tcp", "127.0.0.2", plane.osc_port) in sockets
        assert ("tcp", "127.0.0.2", plane.oscquery_port) in sockets
        assert not [s for s in sockets if s[2] in (plane.osc_port, plane.oscquery_port) and s[1] != "127.0.0.2"]


def test_no_parameter_takes_a_path():
    for param in PARAMETERS:
        text = f"{param.name} {param.address} {' '.join(param.aliases)}".lower()
        if param.name in LORA_NAMES:  # a live LoRA's strength: a number; which file is named only at start
            assert param.kind == "float" and param.address.startswith("/lora/"), param
            continue
        assert not any(word in text for word in ("path", "file", "folder", "dir", "model", "vae", "lora", "config")), param
        assert param.kind in ("string", "prompt_blend", "choice", "float", "int", "bool", "int_list", "size", "trigger",
                              "cue", "seed_blend")  # seed_blend: numbers only
        if param.kind in ("string", "prompt_blend"):
            assert param.name in FREE_TEXT and param.target == "engine", param
    # actions: no argument reaches a file (/record/start opens the file sink's own name, given at start)
    assert set(RUNTIME_NAMES) == {"pause", "resume", "record_stop", "record_start", "preset"}
    assert all(BY_NAME[name].kind == "trigger" for name in ("record_stop", "record_start"))
    choice = [p for p in PARAMETERS if p.kind == "choice"]
    assert [(p.name, p.choices) for p in choice] == [("prompt_blend_method", ("linear", "slerp")),
                                                     ("input_fit", ("crop", "letterbox", "stretch"))]


class AuditLog:
    """Every open / listdir / import / process / exec event while `active` (Python's audit hooks)."""

    WATCHED = ("open", "os.listdir", "os.scandir", "os.remove", "os.rename", "os.mkdir", "os.chmod", "shutil.",
               "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "import", "exec", "compile",
               "ctypes.")  # not urllib or socket.connect: the test itself is the HTTP client

    def __init__(self) -> None:
        self.active = False
        self.events: list[tuple[str, tuple]] = []
        self._lock = threading.Lock()
        sys.addaudithook(self._hook)  # cannot be removed: inert once `active` is False

    def _hook(self, event: str, args: tuple) -> None:
        if self.active and event.startswith(self.WATCHED):
            with self._lock:
                self.events.append((event, tuple(str(a)[:300] for a in args)))

    def mentioning(self, needles) -> list:
        with self._lock:
            return [(e, a) for e, a in self.events if any(n in part for part in a for n in needles)]


def test_path_like_values_to_every_address_open_nothing(tmp_path):
    from pipeline import StreamConfig, StreamDiffusion, random_components

    canary = tmp_path / "canary-secret.txt"
    canary.write_text("secret")
    values = [str(canary), str(tmp_path / "canary-new.png"), "/etc/passwd", "../../../../etc/shadow",
              "file:///etc/hostname", "~/.ssh/id_rsa", "\\\\server\\share\\canary", "os.system",
              f"__import__('os').system('touch {tmp_path}/canary-pwned')", "sdbridge_canary_module:run"]
    needles = [v for v in values] + ["canary", "passwd", "shadow", "hostname", "id_rsa"]
    engine = StreamDiffusion(random_components("tiny", device="cpu", seed=0),
                             StreamConfig(width=64, height=64, device="cpu", t_index_list=(32, 45)))
    store = ParameterStore()
    store.attach_prompt_encoder(engine.prepare_prompt)
    audit = AuditLog()
    plane = ControlPlane(store=store, settings=ControlSettings(osc_port=0), presets={1: {"seed": 3}},
                         on_pause=lambda: None, on_resume=lambda: None)
    with plane, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        addresses = sorted(plane.router.addresses)
        audit.active = True
        try:
            for address in addresses:
                for value in values:
                    sender.sendto(encode_message(address, value), ("127.0.0.1", plane.osc_port))
                sender.sendto(encode_message(address, values[0], 0.5, values[2], 0.5), ("127.0.0.1", plane.osc_port))
            expected = len(addresses) * (len(values) + 1)
            assert wait_until(lambda: plane.counters["packets"] == expected, 30), plane.counters
            wait_until(lambda: store.applied.get("prompt") in values or "prompt_blend" in store.applied, 10)
            for _ in range(3):
                apply_pending(store, engine)
                engine(np.zeros((64, 64, 3), np.uint8))
            for target in [f"/..{canary}", "/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", f"/{canary}",
                           "/sd/prompt/../../../../etc/passwd?VALUE", f"/sd/prompt?{canary}"]:
                status, body = _http_get(plane.oscquery_port, target)
                assert status in (200, 400, 404) and "secret" not in body and "root:" not in body, (target, body)
        finally:
            audit.active = False
    assert audit.mentioning(needles) == []
    assert not (tmp_path / "canary-new.png").exists() and not (tmp_path / "canary-pwned").exists()
    assert "sdbridge_canary_module" not in sys.modules
    landed = {name for name, value in {**store.applied, **store.rejected}.items()
              if any(v in str(value) for v in values)}
    assert landed and landed <= FREE_TEXT, landed  # path-like strings are prompts, and only prompts
    assert plane.counters["internal_errors"] == 0


def _http_get(port: int, target: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{target}", timeout=5) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
