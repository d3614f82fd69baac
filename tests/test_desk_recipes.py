"""The lighting-desk recipes (lighting-desks.md): each row's message, decoded by that desk's
documented rules and encoded with its exact OSC types, sent over real UDP to a running control
plane with a real ParameterStore; the value the bridge then holds is the row's. One recipe also
goes to a full `sdbridge run` process and is read back over OSCQuery."""

import ast
import json
import pathlib
import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from pythonosc.osc_message_builder import OscMessageBuilder

from bridge.control import ControlPlane, ControlSettings
from bridge.control.table import addresses
from bridge.params import ParameterStore
from test_touchdesigner import check_guide
from test_control_plane import Actions

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDE = ROOT / "lighting-desks.md"
PRESETS = {n: {"seed": 1000 + n} for n in (1, 2, 3)}
WAIT_SECONDS = 5.0


def recipes():
    rows = re.findall(r"^\| ([^|]+?) \| (wire )?`(.+?)` \| `(.+?)` \|$", GUIDE.read_text(), re.M)
    assert len(rows) >= 12, "the recipe table was not found"
    return [(desk, wire + send, result) for desk, wire, send, result in rows]


def number(text):
    return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text) if re.fullmatch(r"[+-]?\d*\.\d+", text) else None


def decode(desk, text):
    """(address, [(type tag, value)]) as that desk puts it on the wire."""
    if text.startswith("wire "):  # address, type tags, arguments
        address, *rest = text[5:].split(" ", 2)
        tags, values = (rest[0], rest[1].split(" ") if len(rest) > 1 else []) if rest else ("", [])
        converters = {"i": int, "f": float, "s": str}
        return address, [(tag, converters[tag](value)) for tag, value in zip(tags, values)]
    if desk == "ETC Eos":  # '=' then comma-separated: decimal point -> float, digits -> int, else string
        address, _, arguments = text.partition("=")
        typed = []
        for item in arguments.split(",") if arguments else []:
            value = number(item)
            typed.append(("s", item) if value is None else ("f" if isinstance(value, float) else "i", value))
        return address, typed
    if desk == "grandMA3":  # SendOSC <line> "/address,types,values"
        address, *parts = re.fullmatch(r'SendOSC \d+ "(.*)"', text).group(1).split(",")
        tags, values, typed = (parts[0] if parts else ""), iter(parts[1:]), []
        for tag in tags:
            typed.append((tag, {"T": True, "F": False}[tag]) if tag in "TF" else
                         (tag, {"i": int, "f": float, "s": str}[tag](next(values))))
        return address, typed
    if desk == "QLab":  # quoted -> string, whole number -> int, decimal -> float
        address, _, arguments = text.partition(" ")
        typed = []
        for quoted, bare in re.findall(r'"([^"]*)"|(\S+)', arguments):
            value = None if quoted or not bare else number(bare)
            typed.append(("s", quoted or bare) if value is None else ("f" if isinstance(value, float) else "i", value))
        return address, typed
    raise AssertionError(f"{desk}: no decoding rule for {text!r}")


def packet(address, typed):
    builder = OscMessageBuilder(address)
    for tag, value in typed:
        builder.add_arg(value, tag)
    return builder.build().dgram


def expectation(text):
    """('store', name, value) | ('preset', n) | ('action', name)."""
    if text.startswith("recalls preset "):
        return ("preset", int(text.split()[-1]))
    if text.endswith("()"):
        return ("action", text[:-2])
    name, _, value = text.partition(" = ")
    return ("store", name, ast.literal_eval(value))


@pytest.fixture(scope="module")
def plane():
    store, actions = ParameterStore(), Actions()
    with ControlPlane(store=store, settings=ControlSettings(osc_port=0, oscquery=False), on_pause=actions.pause,
                      on_resume=actions.resume, on_record_stop=actions.record_stop,
                      on_record_start=actions.record_start, presets=PRESETS) as control:
        control.test_store, control.test_actions = store, actions
        yield control


def test_every_recipe_address_is_in_the_parameter_table():
    known = addresses()
    for desk, send, _ in recipes():
        assert decode(desk, send)[0] in known, f"{desk}: {send}"


@pytest.mark.parametrize("desk, send, result", recipes(), ids=[f"{d}: {s}" for d, s, _ in recipes()])
def test_recipe_reaches_the_parameter_store(plane, desk, send, result):
    address, typed = decode(desk, send)
    store, actions = plane.test_store, plane.test_actions
    store.take()
    actions.calls.clear()
    before = plane.counters["packets"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(packet(address, typed), ("127.0.0.1", plane.osc_port))
    deadline = time.monotonic() + WAIT_SECONDS
    while plane.counters["packets"] == before and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.02)
    expected, pending = expectation(result), store.take()
    assert plane.counters["unknown_address"] == 0, plane.router.last_error
    if expected[0] == "store":
        assert expected[1] in pending, f"{send}: {plane.router.last_error}"
        if isinstance(expected[2], (int, float)):
            assert pending[expected[1]] == pytest.approx(expected[2], rel=1e-6)
        else:
            assert pending[expected[1]] == expected[2]
    elif expected[0] == "preset":
        assert pending == PRESETS[expected[1]]
    else:
        assert actions.calls == [expected[1]]


def test_desk_guide_commands_and_addresses():
    check_guide(GUIDE)
    for desk in ("ETC Eos", "grandMA3", "ChamSys MagicQ", "QLab", "QLC+", "TouchDesigner OSC Out CHOP"):
        assert f"## {desk}" in GUIDE.read_text()


def free_port(kind=socket.SOCK_DGRAM):
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_eos_recipe_changes_a_running_bridge(tmp_path):
    osc_port, query_port, status_port = free_port(), free_port(socket.SOCK_STREAM), free_port()
    status = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    status.bind(("127.0.0.1", status_port))
    status.settimeout(1.0)
    argv = [sys.executable, "-m", "bridge.cli", "-q", "run", "--source", "testpattern", "--sink", "null",
            "--model", "random:tiny", "--width", "64", "--height", "64", "--duration", "90", "--no-status",
            "--osc-port", str(osc_port), "--oscquery-port", str(query_port), "--status-target", f"127.0.0.1:{status_port}"]
    bridge = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and bridge.poll() is None:
            try:
                if b"/sd/status/alive" in status.recv(65535):
                    break
            except socket.timeout:
                continue
        else:
            pytest.fail(f"no status from the bridge: {bridge.stdout.read() if bridge.poll() is not None else 'still silent'}")
        address, typed = decode("ETC Eos", "/sd/guidance=2.5")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(packet(address, typed), ("127.0.0.1", osc_port))
        value, deadline = None, time.monotonic() + 30
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{query_port}/sd/guidance?VALUE", timeout=5) as reply:
                value = json.loads(reply.read())["VALUE"]
            if value == [2.5]:
                break
            time.sleep(0.2)
        assert value == [2.5]
    finally:
        bridge.terminate()
        try:
            bridge.wait(15)
        except subprocess.TimeoutExpired:
            bridge.kill()
            bridge.wait(5)
        status.close()
