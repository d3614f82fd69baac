"""NDI transport over real NDI, on loopback, inside a network namespace this test creates.

Every NDI call (discovery included) happens in tests/ndi_peer.py, run under `unshare -rn` with
only `lo` up and an NDI config (NDI_CONFIG_DIR) that names 127.0.0.1: nothing reaches a real
network, and this pytest process never creates an NDI finder, sender or receiver. The end-to-end
test runs `sdbridge run` in a second namespace nested in the first, joined to it by a veth pair
(NDI processes sharing a namespace cannot discover each other without Avahi).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.transports.base import TransportUnavailable
from bridge.transports.ndi import NDISink, NDISource, matches_ndi_name

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "tests" / "ndi_peer.py"
MACHINE_NAME = "sdbridge-ns"  # set by the config below; seeing it proves NDI read the config



def ndi_config(machine_name: str, local: str, remote: str) -> dict:
    """NDI's ndi-config.v1.json: only the adapter with address `local`, sources looked up at
    `remote` (no mDNS needed), no multicast, video over plain TCP. The machine name shows that
    NDI read the file."""
    return {
        "ndi": {
            "machinename": machine_name,
            "networks": {"ips": remote, "discovery": ""},
            "adapters": {"allowed": [local]},
            "multicast": {"send": {"enable": False}, "recv": {"enable": False}},
            "rudp": {"send": {"enable": False}, "recv": {"enable": False}},
            "unicast": {"send": {"enable": False}, "recv": {"enable": False}},
            "tcp": {"send": {"enable": True}, "recv": {"enable": True}},
        }
    }


def write_ndi_config(folder: Path, machine_name: str, local: str, remote: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ndi-config.v1.json").write_text(json.dumps(ndi_config(machine_name, local, remote), indent=2))
    return folder


BRIDGE_ARGS = ["--source", "ndi:IN", "--sink", "ndi:OUT", "--model", "random:tiny", "--width", "128", "--height", "128"]


@functools.lru_cache(maxsize=1)
def namespace_problem() -> str | None:
    """Why NDI cannot be tested in a private network namespace here, or None."""
    if importlib.util.find_spec("cyndilib") is None:
        return "cyndilib is not installed: pip install 'sdbridge[ndi]'"
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            return f"`{tool}` ({package}) is needed to isolate NDI in a network namespace"
    try:
        probe = subprocess.run(
            ["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        return "`unshare -rn sh -c 'ip link set lo up'` did not finish in 20 s"
    if probe.returncode != 0:
        reason = (probe.stderr or probe.stdout).strip().splitlines()
        return f"cannot create a network namespace (`unshare -rn`): {reason[-1] if reason else probe.returncode}"
    return None


def run_peer(config_dir: Path, *args: str, timeout: float = 60) -> dict:
    """tests/ndi_peer.py ARGS in a fresh network namespace with only loopback; its JSON result."""
    env = {**os.environ, "NDI_CONFIG_DIR": str(config_dir), "PYTHONPATH": str(ROOT)}
    command = ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, str(PEER), *args]
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in process.stdout.splitlines() if line.startswith("{")]
    assert process.returncode == 0 and lines, (
        f"ndi_peer {args[0]} exited {process.returncode}\n"
        f"stdout:\n{process.stdout[-3000:]}\nstderr:\n{process.stderr[-3000:]}"
    )
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def ndi_namespace(tmp_path_factory) -> Path:
    """The NDI config folder, once a namespace works and NDI discovery finds a sender in it."""
    problem = namespace_problem()
    if problem:
        pytest.skip(problem)
    config_dir = write_ndi_config(tmp_path_factory.mktemp("ndi-config"), MACHINE_NAME, "127.0.0.1", "127.0.0.1")
    probe = run_peer(config_dir, "probe", timeout=30)
    if not probe["visible"]:
        pytest.skip(f"NDI discovery inside the namespace did not see its own sender {probe['sender']!r} in 5 s")
    return config_dir


# ---- without NDI ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [NDISource, NDISink])
def test_missing_cyndilib_is_one_clear_line(monkeypatch, cls):
    monkeypatch.setitem(sys.modules, "cyndilib", None)  # import cyndilib -> ImportError
    with pytest.raises(TransportUnavailable) as caught:
        cls(name="anything")
    assert str(caught.value) == "NDI needs cyndilib: pip install 'sdbridge[ndi]'"


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [
        (NDISource, {"name": ""}, "name"),
        (NDISource, {"name": "x", "timeout": 0}, "timeout"),
        (NDISource, {"name": "x", "timeout": "soon"}, "timeout"),
        (NDISource, {"name": "x", "pixel_format": "RGB"}, "pixel_format"),
        (NDISource, {"name": "x", "bandwidth": "max"}, "bandwidth"),
        (NDISink, {"name": " "}, "name"),
        (NDISink, {"name": "x", "width": 64}, "width, height"),
        (NDISink, {"name": "x", "width": "64.5", "height": 32}, "width"),
        (NDISink, {"name": "x", "frame_rate": -1}, "frame_rate"),
        (NDISink, {"name": "x", "alpha": "maybe"}, "alpha"),
        (NDISink, {"name": "x", "follow_size": "sometimes"}, "follow_size"),
        (NDISink, {"name": "x", "pixel_format": "BGR"}, "pixel_format"),
    ],
)
def test_bad_arguments_name_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        cls(**kwargs)  # validation comes before cyndilib is imported: no NDI here


def test_short_and_full_names_match():
    assert matches_ndi_name("STUDIO-PC (TD Out)", "TD Out")
    assert matches_ndi_name("STUDIO-PC (TD Out)", "STUDIO-PC (TD Out)")
    assert matches_ndi_name("STUDIO-PC (Cam (2))", "Cam (2)")
    assert not matches_ndi_name("STUDIO-PC (TD Out)", "TD")
    assert not matches_ndi_name("STUDIO-PC (TD Out)", "STUDIO-PC")


# ---- real NDI, inside the namespace ------------------------------------------------------------


@pytest.mark.timeout(90)
def test_round_trip_keeps_size_colour_and_order(ndi_namespace):
    result = run_peer(ndi_namespace, "roundtrip")
    frames, sent = result["frames"], result["sent"]
    assert result["first_read"] is None, "read() before any frame was sent must give None"
    assert result["send_error"] is None
    numbers = [f["number"] for f in frames]
    assert numbers and numbers[-1] == sent - 1, f"the last frame did not arrive: {numbers}"
    assert numbers == sorted(set(numbers)), f"frames out of order or repeated: {numbers}"
    assert len(numbers) >= (sent - numbers[0]) // 2, f"too many frames lost after connecting: {numbers}"
    assert [f["sequence"] for f in frames] == list(range(len(frames)))
    assert {tuple(f["size"]) for f in frames} == {(128, 64)}
    assert {f["pixel_format"] for f in frames} == {"RGBA"}
    assert max(f["colour_error"] for f in frames) <= 16, "colours came back wrong (channel order?)"
    assert min(f["alpha_min"] for f in frames) == 255, "a sender without alpha must give alpha 255"
    assert result["send_ms_max"] < 50, f"send() blocked for {result['send_ms_max']:.1f} ms"
    # the source found the sink by its short name, and a second one by NDI's full name
    full_name = f"{MACHINE_NAME} (sdbridge-test)"
    assert [name.lower() for name in result["full_names"]] == [full_name] * 3
    assert result["by_full_name"]["number"] == sent


@pytest.mark.timeout(90)
def test_close_frees_the_name_at_once(ndi_namespace):
    result = run_peer(ndi_namespace, "rename")
    assert "reopen_error" not in result, result.get("reopen_error")
    assert result["reopen_ms"] < 500
    assert result["second_full_name"] == result["first_full_name"], "the name must not become 'name 2'"
    # the source that was never reopened followed the new sender by itself
    assert result["before"] and all(100 <= n < 120 for n in result["before"]), result["before"]
    assert any(n >= 200 for n in result["after"]), f"no frame from the new sender: {result['after']}"
    # a name in use is one clear error, in this process and from another (not a crash)
    assert result["same_process_duplicate"].startswith("TransportUnavailable: NDI sender name 'sdbridge-name'")
    other = result["other_process_duplicate"]
    assert other["returncode"] == 0, other
    assert '"claimed": false' in other["stdout"] and "has that name" in other["stdout"], other


@pytest.mark.timeout(90)
def test_read_gives_none_then_source_lost(ndi_namespace):
    result = run_peer(ndi_namespace, "lost")
    assert result["before"], "no frames before the sender went idle"
    # idle but connected for twice the timeout: None each time, never SourceLost
    assert len(result["idle"]) >= 5 and set(result["idle"]) == {"none"}, result["idle"]
    # sender closed: None within each read's timeout, SourceLost once `timeout` (1 s) passed
    after = result["after_close"]
    assert after["reads"] and {r["result"] for r in after["reads"]} == {"none"}
    assert max(r["ms"] for r in after["reads"]) < 150, "read() blocked past its timeout"
    assert after["lost_after"] is not None and 0.9 <= after["lost_after"] < 2.5, after
    assert "lost: no connection" in after["message"]
    assert result["read_after_close"].startswith("SourceLost: NDI source 'sdbridge-lost' is closed")
    # reopened on both sides: frames flow again
    assert result["reopened"] and all(n >= 500 for n in result["reopened"]), result["reopened"]
    # never there at all
    assert result["not_found"] is not None and 0.5 <= result["not_found"]["seconds"] < 2
    assert "'sdbridge-nobody' not found within 0.5 s" in result["not_found"]["message"]


@pytest.mark.timeout(90)
def test_a_source_closed_after_its_sender_vanished_does_not_reconnect_to_it(ndi_namespace):
    """close() left the receiver pointed at the vanished sender (cyndilib's disconnect() is a
    no-op without a live connection): when the sender came back, the closed source connected
    and pulled its video for as long as the receiver lived (for the first source of a run,
    frozen by gc.freeze(), until the process ended)."""
    result = run_peer(ndi_namespace, "closed_while_lost")
    assert result["before"], "no frames before the sender went away"
    assert result["lost"] and "lost: no connection" in result["lost"], result["lost"]
    assert result["connections"] and max(result["connections"]) == 0, (
        f"the returning sender had connections from a closed source: {result['connections']}")


@pytest.mark.timeout(180)
def test_reopening_a_source_does_not_leak_threads_or_sockets(ndi_namespace):
    """cyndilib's Receiver (with its frame-sync) and Finder sit in reference cycles: close()
    dropping them destroyed nothing until a full garbage collection, which a show process runs
    rarely (and never on the first source, frozen by gc.freeze()). Every reconnect left about 5
    NDI threads and 8 file descriptors behind: about 650 reconnects an hour while a sender is
    away."""
    result = run_peer(ndi_namespace, "reopen", timeout=170)
    assert result["cycles"] == 50, result
    assert result["lost"] == 10, result
    assert not result["stale"], f"a reopened source gave a frame older than its opening: {result['stale']}"
    counts = result["counts"]
    threads, fds = counts["5"]  # after the first cycles: whatever NDI keeps for the process
    for label in ("25", "50", "lost"):
        assert counts[label][0] <= threads + 2 and counts[label][1] <= fds + 4, (
            f"threads and file descriptors grew across reopens: {counts}")


@pytest.mark.timeout(90)
def test_sink_without_size_follows_the_frames_and_so_does_the_runtimes(ndi_namespace):
    """The runtime's NDI sink (open_sink: opened at the engine's size) follows /sd/resolution."""
    result = run_peer(ndi_namespace, "adaptive")
    assert result["full_name_before_first_frame"] is None
    assert result["opened_full_name_before_first_frame"] is not None  # opened at start
    for label, size in [(variant + label, size) for variant in ("", "opened_")
                        for label, size in (("rgb", (64, 32)), ("bgr", (96, 48)))]:
        assert result[label + "_send_error"] is None
        frames = result[label]
        assert frames and {tuple(f["size"]) for f in frames} == {size}, frames
        assert max(f["colour_error"] for f in frames) <= 16, f"{label}: colours came back wrong"
    # ndi:NAME?size=96x48&fit=crop: a sender of a fixed size, whatever the engine's
    assert result["sized"] == ["96x48 RGBA", "crop"], result["sized"]
    assert result["sized_frames"] and {tuple(f["size"]) for f in result["sized_frames"]} == {(96, 48)}
    assert "expected 96x48 RGBA, got 64x32 RGBA" in result["sized_other_size"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bridge_between_two_ndi_names(ndi_namespace, tmp_path):
    # the bridge runs in a namespace of its own, 10.77.0.2, linked to the peer's, 10.77.0.1
    # (see ndi_peer.start_in_linked_namespace); each side's NDI looks for the other's address
    peer_config = write_ndi_config(tmp_path / "peer", "sdbridge-peer", "10.77.0.1", "10.77.0.2")
    bridge_config = write_ndi_config(tmp_path / "bridge", "sdbridge-bridge", "10.77.0.2", "10.77.0.1")
    result = run_peer(peer_config, "bridge", str(bridge_config), *BRIDGE_ARGS, timeout=150)
    output = result.get("bridge_output", "")
    assert result["exit_before_sigterm"] is None, f"the bridge stopped by itself:\n{output}"
    assert result["frame_count"] >= 10, f"{result['frame_count']} frames from ndi:OUT\n{output}"
    assert {tuple(f["size"]) for f in result["frames"]} == {(128, 128)}
    assert result["distinct_frames"] >= 3, f"the output froze\n{output}"
    assert result["returncode"] == 0 and result["exit_seconds"] < 3, f"SIGTERM: {result}\n{output}"
    assert result["out_full_name"].lower() == "sdbridge-bridge (out)"
