"""The control plane over real sockets on 127.0.0.1: liblo's oscsend/oscdump, python-osc's
SLIP client, OSCQuery over HTTP, a flood against a stand-in render loop. Needs liblo-tools."""

import json
import pathlib
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from pythonosc.tcp_client import SimpleTCPClient
from pythonosc.udp_client import SimpleUDPClient

from bridge.control import ControlPlane, ControlSettings, add_arguments
from bridge.control.osc import encode_bundle, encode_message
from bridge.control.table import PARAMETERS, addresses
from bridge.errors import UserError
from bridge.params import PARAMETERS as STORE_PARAMETERS
from bridge.params import ParameterStore
from osc_fuzzing import flood

needs_liblo = pytest.mark.skipif(shutil.which("oscsend") is None, reason="liblo-tools (oscsend, oscdump) not installed")
WAIT_SECONDS = 5.0


def wait_for(condition, seconds=WAIT_SECONDS):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


class Actions:
    def __init__(self):
        self.calls = []

    def pause(self):
        self.calls.append("pause")

    def resume(self):
        self.calls.append("resume")

    def record_stop(self):
        self.calls.append("record_stop")

    def record_start(self):
        self.calls.append("record_start")


@pytest.fixture
def plane():
    store, actions = ParameterStore(), Actions()
    settings = ControlSettings(osc_port=0, oscquery_port=0)
    with ControlPlane(store=store, settings=settings, on_pause=actions.pause, on_resume=actions.resume,
                      on_record_stop=actions.record_stop, on_record_start=actions.record_start,
                      presets={0: {"prompt": "preset zero"}}) as control:
        control.test_store, control.test_actions = store, actions
        yield control


def pending(store, collected):
    collected.update(store.take())
    return collected


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@needs_liblo
@pytest.mark.parametrize("url", ["udp", "tcp"])
def test_oscsend_sets_prompt_and_guidance(plane, url):
    target = f"osc.{url}://127.0.0.1:{plane.osc_port}"
    subprocess.run(["oscsend", target, "/sd/prompt", "s", "a watercolor city at night"], check=True, timeout=10)
    subprocess.run(["oscsend", target, "/sd/guidance", "f", "2.5"], check=True, timeout=10)
    subprocess.run(["oscsend", target, "/guidance_scale", "d", "3.5"], check=True, timeout=10)  # alias, double
    got = {}
    assert wait_for(lambda: pending(plane.test_store, got).get("guidance_scale") == 3.5)
    assert got["prompt"] == "a watercolor city at night"


def test_slip_over_tcp_from_python_osc(plane):
    client = SimpleTCPClient("127.0.0.1", plane.osc_port, mode="1.1", timeout=5)
    try:
        client.send_message("/sd/similarity/threshold", 0.5)
        client.send_message("/sd/t_index_list", [10, 20, 30])
    finally:
        client.close()
    got = {}
    assert wait_for(lambda: pending(plane.test_store, got).get("t_index_list") == (10, 20, 30))
    assert got["similarity_threshold"] == 0.5


def test_big_udp_datagrams_are_read_in_full(plane):
    prompts = [encode_message("/sd/prompt", f"{i} " + "x" * 1990) for i in range(30)]
    bundle = encode_bundle(prompts)
    assert 60_000 < len(bundle) <= 65507
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(bundle, ("127.0.0.1", plane.osc_port))
        sender.sendto(b"\x00" * 65504, ("127.0.0.1", plane.osc_port))
    got = {}
    assert wait_for(lambda: pending(plane.test_store, got).get("prompt", "").startswith("29 "))
    assert wait_for(lambda: plane.counters["malformed"] == 1)


def test_tcp_bad_length_prefix_closes_that_connection_only(plane):
    with socket.create_connection(("127.0.0.1", plane.osc_port), timeout=5) as bad:
        bad.sendall(struct.pack(">i", 2**31 - 1))
        bad.settimeout(5)
        assert bad.recv(1) == b""  # closed by the server
    message = encode_message("/sd/seed", 42)
    with socket.create_connection(("127.0.0.1", plane.osc_port), timeout=5) as good:
        good.sendall(struct.pack(">i", len(message)) + message)
    got = {}
    assert wait_for(lambda: pending(plane.test_store, got).get("seed") == 42)
    assert plane.counters["malformed"] == 1


STATUS_PEER = r"""
import json, socket, subprocess, time
from bridge.control import ControlPlane, ControlSettings
from bridge.control.osc import encode_message
from bridge.params import PARAMETERS as STORE_PARAMETERS
from bridge.params import ParameterStore
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); probe.bind(("127.0.0.1", 0))
port = probe.getsockname()[1]; probe.close()
# liblo's oscdump binds every interface: this runs in a namespace with nothing but loopback
dump = subprocess.Popen(["oscdump", "-L", str(port)], stdout=subprocess.PIPE, text=True)
snapshot = {"state": "running", "processed_fps": 24.5, "output_fps": 30.0, "inference_ms_median": 31.0,
            "latency_ms_median": 80.0, "frames_skipped": 3, "frames_dropped": 1}
settings = ControlSettings(osc_port=0, oscquery=False, status_target=f"127.0.0.1:{port}", status_interval=0.1)
try:
    time.sleep(0.3)
    with ControlPlane(store=ParameterStore(), settings=settings, telemetry=lambda: snapshot) as control:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(encode_message("/sd/nothing", 1), ("127.0.0.1", control.osc_port))
        time.sleep(0.8)
finally:
    dump.terminate()
    print(dump.communicate(timeout=10)[0])
"""


def namespace_problem():
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare (util-linux) and ip (iproute2)"
    probe = subprocess.run(["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=20)
    return None if probe.returncode == 0 else f"cannot create a network namespace: {probe.stderr[-200:]!r}"


@needs_liblo
def test_status_out_reaches_oscdump():
    problem = namespace_problem()
    if problem:
        pytest.skip(problem)
    root = pathlib.Path(__file__).resolve().parent.parent
    result = subprocess.run(["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable,
                             "-c", STATUS_PEER], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {line.split(" ", 1)[1] for line in result.stdout.splitlines() if " " in line}
    for expected in ("/sd/status/alive i 1", "/sd/status/fps f 24.500000", "/sd/status/inference_ms f 31.000000",
                     "/sd/status/latency_ms f 80.000000", "/sd/status/frames_skipped i 3",
                     "/sd/status/frames_dropped i 1", "/sd/status/state i 1", "/sd/status/osc_refused i 1"):
        assert expected in lines, (expected, sorted(lines)[:20])
    assert any(line.startswith("/sd/status/error s") and "no parameter" in line for line in lines)


def fetch(plane, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{plane.oscquery_port}{path}", timeout=5) as response:
            body = response.read()
            return response.status, json.loads(body) if body else None
    except urllib.error.HTTPError as exc:
        return exc.code, None


def leaves(node):
    if "TYPE" in node:
        yield node
    for child in node.get("CONTENTS", {}).values():
        yield from leaves(child)


def test_oscquery_tree_matches_the_table(plane):
    status, tree = fetch(plane, "/")
    assert status == 200 and tree["FULL_PATH"] == "/"
    advertised = {node["FULL_PATH"]: node for node in leaves(tree)}
    table = addresses("/sd", aliases=False)
    assert set(advertised) == set(table)
    for path, (param, normalized) in table.items():
        node = advertised[path]
        assert node["DESCRIPTION"].startswith(param.description)
        if normalized:
            assert node["TYPE"] == "f" and node["RANGE"] == [{"MIN": 0.0, "MAX": 1.0}]
        else:
            assert node["TYPE"] == param.osc_type
            if param.kind in ("float", "int"):
                assert node["RANGE"] == [{"MIN": param.minimum, "MAX": param.maximum}]
            assert node["ACCESS"] == (3 if param.target == "engine" else 2)
    assert fetch(plane, "/sd/guidance?VALUE") == (200, {"VALUE": [1.2]})  # the default until applied
    plane.test_store.report_applied({"guidance_scale": 4.0, "t_index_list": (5, 9, 20)})
    assert fetch(plane, "/sd/guidance?VALUE") == (200, {"VALUE": [4.0]})
    assert fetch(plane, "/sd/t_index_list")[1]["TYPE"] == "iii"
    host = fetch(plane, "/?HOST_INFO")[1]
    assert host["OSC_IP"] == "127.0.0.1" and host["OSC_PORT"] == plane.osc_port and host["OSC_TRANSPORT"] == "UDP"
    assert fetch(plane, "/sd/nothing")[0] == 404
    assert fetch(plane, "/sd/guidance?BOGUS")[0] == 400
    assert fetch(plane, "/sd/pause?VALUE")[0] == 204


def test_oscquery_marks_what_this_run_cannot_take(plane):
    """Live LoRA slots with no LoRA loaded: ACCESS 0 and the reason, on the address and its
    /norm form; a loaded slot stays read-write with its value."""
    from bridge.params import empty_lora_slots, lora_values

    plane.test_store.report_applied(lora_values((0.8,)))
    plane.test_store.mark_unavailable(empty_lora_slots(1))
    loaded, empty, empty_norm = (fetch(plane, path)[1] for path in ("/sd/lora/1", "/sd/lora/2", "/sd/lora/2/norm"))
    assert loaded["ACCESS"] == 3 and loaded["VALUE"] == [0.8]
    for node in (empty, empty_norm):
        assert node["ACCESS"] == 0 and "VALUE" not in node
        reason = "no live LoRA in slot 2 (1 loaded; load one with --live-lora)"
        assert node["DESCRIPTION"].endswith(f"[unavailable: {reason}]")
    assert empty["TYPE"] == "f" and empty["RANGE"] == [{"MIN": 0.0, "MAX": 2.0}]  # what it would take
    assert fetch(plane, "/sd/lora/4?ACCESS") == (200, {"ACCESS": 0})
    assert fetch(plane, "/sd/guidance?ACCESS") == (200, {"ACCESS": 3})


def _arguments_for(node):
    """Values a generic OSCQuery client would send, from TYPE and RANGE alone."""
    ranges = node.get("RANGE", [{}] * len(node["TYPE"]))
    args = []
    for index, (tag, limits) in enumerate(zip(node["TYPE"], ranges)):
        if "VALS" in limits:
            args.append(limits["VALS"][-1])
        elif tag == "s":
            args.append("an advertised string")
        elif tag == "T":
            args.append(True)
        elif tag == "i":
            args.append(int(limits.get("MIN", 0)) + index)
        elif tag == "f":
            args.append((limits["MIN"] + limits["MAX"]) / 2 if "MIN" in limits else 0.5)
    return args


def test_every_advertised_address_works_when_sent(plane):
    tree = fetch(plane, "/")[1]
    client = SimpleUDPClient("127.0.0.1", plane.osc_port)
    nodes = [node for node in leaves(tree) if node["ACCESS"] & 2]
    for number, node in enumerate(nodes, start=1):
        args = _arguments_for(node)
        client.send_message(node["FULL_PATH"], args if args else [])
        assert wait_for(lambda: plane.counters["messages"] == number), node["FULL_PATH"]
    counters = plane.counters
    assert counters["rejected"] == 0
    assert counters["internal_errors"] == 0 and counters["malformed"] == 0 and counters["unknown_address"] == 0
    assert plane.test_actions.calls == ["pause", "resume", "record_stop", "record_start"]  # (the table's order)
    got = pending(plane.test_store, {})
    assert got["prompt"] == "preset zero"  # /sd/preset 0 came after /sd/prompt
    # each exclusive pair keeps the one set last: the preset's prompt, seed_blend after seed, then
    # t_index_list after strength
    superseded = {"prompt_blend", "seed", "strength"}
    assert set(got) == {p.name for p in PARAMETERS if p.target == "engine"} - superseded
    assert set(STORE_PARAMETERS) == {p.name for p in PARAMETERS if p.target == "engine"}


def test_status_reports_the_newest_error_of_run_engine_and_osc():
    """The run's own last error (telemetry), the engine's refusal of a value and the OSC router's
    refusal of a packet: status out shows whichever came last."""
    run = {"state": "running", "last_error": "source lost: camera unplugged", "last_error_age": 5.0}
    store = ParameterStore()
    settings = ControlSettings(osc_port=0, oscquery=False)
    with ControlPlane(store=store, settings=settings, telemetry=lambda: dict(run)) as control:
        assert control.snapshot()["last_error"] == "source lost: camera unplugged"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(encode_message("/sd/guidance_scale", "loud"), ("127.0.0.1", control.osc_port))
        deadline = time.monotonic() + 10
        while control.router.last_error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        newest = control.snapshot()
        assert "guidance_scale" in newest["last_error"] and newest["last_error_age"] < 5.0
        store.report_rejected("seed", 666, "out of memory")  # the engine refused a value after that
        assert control.snapshot()["last_error"] == "seed: out of memory"
        run.update(last_error="source lost: again", last_error_age=0.0)  # and now the run itself
        assert control.snapshot()["last_error"] == "source lost: again"


def test_allow_list_over_real_sockets():
    store = ParameterStore()
    settings = ControlSettings(osc_port=0, oscquery=False, osc_allow=("10.1.2.3",))
    with ControlPlane(store=store, settings=settings) as control:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(encode_message("/sd/seed", 1), ("127.0.0.1", control.osc_port))
        with socket.create_connection(("127.0.0.1", control.osc_port), timeout=5) as connection:
            connection.settimeout(5)
            assert connection.recv(1) == b""  # refused at accept
        assert wait_for(lambda: control.counters["dropped_sender"] == 2)
    assert store.take() == {}


def test_close_is_idempotent_and_releases_ports():
    settings = ControlSettings(osc_port=0, oscquery_port=0, status_target="127.0.0.1:9", status_interval=0.1)
    control = ControlPlane(store=ParameterStore(), settings=settings).start()
    port, query_port = control.osc_port, control.oscquery_port
    started = time.monotonic()
    control.close()
    control.close()
    assert time.monotonic() - started < 3.0
    again = ControlSettings(osc_port=port, oscquery_port=query_port)
    with ControlPlane(store=ParameterStore(), settings=again) as reopened:
        assert reopened.osc_port == port


def test_a_taken_port_is_a_user_error_naming_the_flag():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        settings = ControlSettings(osc_port=taken.getsockname()[1], oscquery=False)
        with pytest.raises(UserError, match="osc-port"):
            ControlPlane(store=ParameterStore(), settings=settings).start()


def test_settings_and_flags():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--osc-port", "9100", "--osc-allow", "10.0.0.0/8,127.0.0.1", "--no-osc-aliases",
                              "--status-target", "127.0.0.1:9200", "--oscquery-port", "off"])
    settings = ControlSettings.from_args(args)
    assert (settings.osc_port, settings.osc_aliases, settings.resolved_oscquery_port) == (9100, False, None)
    defaults = ControlSettings.from_args(parser.parse_args([]))
    assert (defaults.osc_port, defaults.osc_bind, defaults.resolved_oscquery_port) == (7450, "127.0.0.1", 7451)
    assert defaults.status_target is None and defaults.osc_allow is None
    for bad, field in ((dict(osc_port=70000), "osc_port"), (dict(osc_prefix="sd"), "osc_prefix"),
                       (dict(status_target="nowhere"), "status_target"), (dict(osc_allow=("x",)), "osc_allow")):
        with pytest.raises(ValueError, match=field):
            ControlSettings(**bad)


FLOOD_RATE = 10_000  # packets per second, half of them broken
FLOOD_SECONDS = 3.0  # the benchmark floods for 10 s (bench/osc_fuzz.py)
FLOOD_FPS = 60.0


def test_flood_keeps_the_render_loop_on_time_and_memory_flat(plane, record_property):
    import logging

    logging.getLogger("bridge.control.router").setLevel(logging.ERROR)
    try:
        result = flood(port=plane.osc_port, store=plane.test_store, rate=FLOOD_RATE, seconds=FLOOD_SECONDS, fps=FLOOD_FPS)
    finally:
        logging.getLogger("bridge.control.router").setLevel(logging.NOTSET)
    result["packets_handled"] = plane.counters["packets"]
    print("flood:", json.dumps(result))
    record_property("flood", json.dumps(result))
    assert result["packets_sent"] >= FLOOD_RATE * FLOOD_SECONDS * 0.8
    assert result["packets_handled"] >= result["packets_sent"] * 0.5
    assert result["frame_interval_p99_ms"] < result["nominal_ms"] + 15.0  # generous for busy CI (issue: +5 ms)
    assert result["rss_growth_bytes"] < 32 * 2**20
    assert plane.counters["internal_errors"] == 0


def _http(port, raw: bytes, seconds=5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as client:
        client.sendall(raw)
        reply = b""
        while chunk := client.recv(4096):
            reply += chunk
    return reply


def test_oscquery_answers_a_broken_request_400_without_a_traceback(plane, capfd):
    assert _http(plane.oscquery_port, b"GET http://[ HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 400")
    with socket.create_connection(("127.0.0.1", plane.oscquery_port), timeout=5) as early:
        early.sendall(b"GET / HTTP/1.0\r\n\r\n")  # and hangs up before the answer
    time.sleep(0.3)
    assert "Traceback" not in capfd.readouterr().err


def test_oscquery_closes_slow_clients_and_caps_its_connections():
    """A client sending a header line every few seconds kept its thread and descriptor for ever,
    and any number of them could (at the descriptor limit the OSC servers could accept nothing)."""
    from bridge.control import oscquery

    server = oscquery.OSCQueryServer(host="127.0.0.1", port=0, prefix="/sd", osc_port=9000, values=dict,
                                     max_connections=2, request_deadline_seconds=0.5)
    try:
        slow = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(2)]
        for client in slow:
            client.sendall(b"GET / HTTP/1.0\r\n")  # and never the end of the headers
        time.sleep(0.2)
        assert _http(server.port, b"GET / HTTP/1.0\r\n\r\n") == b""  # a third: closed at once
        assert wait_for(lambda: server.refused_connections == 1)
        started = time.monotonic()
        for client in slow:
            assert client.recv(4096) == b""  # closed at the deadline
            client.close()
        assert time.monotonic() - started < 2.0
        # slots free again: a closed client's slot is given back by its thread just after the close,
        # so on a loaded machine the first request may still find them taken
        assert wait_for(lambda: _http(server.port, b"GET /?HOST_INFO HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200"),
                        seconds=2.0)
    finally:
        server.close()


def test_osc_tcp_replaces_an_idle_connection_when_all_are_taken():
    """Silent or vanished peers holding every TCP slot locked every other client out for good."""
    from bridge.control import servers

    received = []
    server = servers.TCPServer(host="127.0.0.1", port=0, handler=lambda packet, peer: received.append(packet),
                               max_connections=3, evict_idle_seconds=0.3)
    try:
        silent = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(3)]
        time.sleep(0.5)
        message = encode_message("/sd/seed", 42)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as newcomer:
            newcomer.sendall(struct.pack(">i", len(message)) + message)
            assert wait_for(lambda: received == [message])
        assert server.refused_connections == 0
        closed = 0
        for client in silent:
            client.settimeout(0.5)
            try:
                closed += client.recv(1) == b""
            except socket.timeout:
                pass
            client.close()
        assert closed == 1  # the one idle longest made room
    finally:
        server.close()


def test_server_sockets_cannot_be_shared_by_a_second_bridge(monkeypatch):
    """The options each server socket gets: on POSIX, TCP may rebind over TIME_WAIT; on Windows,
    where SO_REUSEADDR would let a second bridge bind a port already listened on, none (as
    socket.create_server does there). Every server, the OSCQuery one too, binds with them."""
    from bridge.control import oscquery, servers
    from bridge.control.servers import UDP_SOCKET_BUFFER, socket_options

    assert socket_options(socket.SOCK_STREAM, "win32") == []
    assert socket_options(socket.SOCK_DGRAM, "win32") == [(socket.SO_RCVBUF, UDP_SOCKET_BUFFER)]
    assert socket_options(socket.SOCK_STREAM, "linux") == [(socket.SO_REUSEADDR, 1)]
    assert socket_options(socket.SOCK_DGRAM, "darwin") == [(socket.SO_RCVBUF, UDP_SOCKET_BUFFER)]
    with ControlPlane(store=ParameterStore(), settings=ControlSettings(osc_port=0)) as first:
        with pytest.raises(UserError, match=f"osc-port: cannot listen on 127.0.0.1:{first.osc_port}"):
            ControlPlane(store=ParameterStore(), settings=ControlSettings(osc_port=first.osc_port)).start()
    # what socket_options says is what every server socket gets (a marker option stands in for
    # Windows' empty list, whose effect, no SO_REUSEADDR, only Windows can show)
    marker = [(socket.SO_KEEPALIVE, 1)]
    monkeypatch.setattr(servers, "socket_options", lambda kind: marker)
    monkeypatch.setattr(oscquery, "socket_options", lambda kind: marker)
    with ControlPlane(store=ParameterStore(), settings=ControlSettings(osc_port=0)) as plane:
        sockets = [part._socket for part in plane._parts[:2]] + [plane._parts[2]._httpd.socket]
        assert [s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) for s in sockets] == [1, 1, 1]
        assert [s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) for s in sockets] == [0, 0, 0]
