"""`sdbridge run` with its control plane, driven by liblo's oscsend (a foreign client), read back
over OSCQuery (real HTTP) and OSC status out (a real UDP socket), then stopped with SIGTERM."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from pythonosc.osc_message import OscMessage

from test_cli import REPO, TINY, child_env

pytestmark = pytest.mark.skipif(shutil.which("oscsend") is None,
                                reason="liblo's oscsend is not installed (Debian package liblo-tools)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        tcp.bind(("127.0.0.1", port))  # the same number free for TCP too
        return port


def query(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
        return json.loads(response.read())


def wait_until(check, seconds: float):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = check()
        except (OSError, ValueError):  # not answering yet, or no value yet (an empty answer)
            value = None
        if value:
            return value
        time.sleep(0.1)
    return None


def stop_bridge(process, status_socket) -> tuple[str, str]:
    """SIGTERM, then the bridge's (stdout, stderr); the status socket closed."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.communicate(timeout=10)
    finally:
        status_socket.close()


def test_oscsend_changes_a_running_bridge_and_status_reports_it(tmp_path):
    osc_port, query_port = free_port(), free_port()
    status = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    status.bind(("127.0.0.1", 0))
    status.settimeout(0.2)
    config = tmp_path / "show.toml"
    config.write_text('[presets.3]\nprompt = "preset three"\nguidance_scale = 2.5\n')
    command = [sys.executable, "-m", "bridge.cli", "run", "--config", str(config), "--source", "testpattern",
               "--sink", "null", *TINY, "--fps", "10", "--osc-port", str(osc_port), "--oscquery-port", str(query_port),
               "--status-target", f"127.0.0.1:{status.getsockname()[1]}"]
    process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: query(query_port, "/?HOST_INFO"), 60), "OSCQuery never answered"
        assert query(query_port, "/?HOST_INFO")["OSC_PORT"] == osc_port

        def send(*args):
            subprocess.run(["oscsend", "127.0.0.1", str(osc_port), *args], check=True, timeout=5)

        send("/sd/guidance", "f", "1.7")
        send("/sd/prompt", "s", "a neon harbour")
        assert wait_until(lambda: query(query_port, "/sd/guidance?VALUE")["VALUE"] == [pytest.approx(1.7)], 30)
        assert wait_until(lambda: query(query_port, "/sd/prompt?VALUE")["VALUE"] == ["a neon harbour"], 30)
        subprocess.run(["oscsend", f"osc.tcp://127.0.0.1:{osc_port}", "/sd/preset", "i", "3"], check=True, timeout=5)
        assert wait_until(lambda: query(query_port, "/sd/prompt?VALUE")["VALUE"] == ["preset three"], 30)

        def status_text(name="state_name"):
            try:
                message = OscMessage(status.recv(65536))
            except socket.timeout:
                return None
            return message.params[0] if message.address == f"/sd/status/{name}" else None

        def state():
            return status_text()

        assert wait_until(lambda: state() == "running", 10)
        assert wait_until(lambda: status_text("backend") == "eager", 10)
        send("/sd/pause")
        assert wait_until(lambda: state() == "paused", 10)
        send("/sd/resume")
        assert wait_until(lambda: state() == "running", 10)
        send("/sd/t_index_list", "ii", "40", "10")  # not increasing: refused, the run goes on
        send("/sd/seed", "i", "5")
        assert wait_until(lambda: query(query_port, "/sd/seed?VALUE")["VALUE"] == [5], 30)
        send("/sd/seed_blend", "ifif", "5", "0.6", "11", "0.4")
        blend = [5, pytest.approx(0.6), 11, pytest.approx(0.4)]
        assert wait_until(lambda: query(query_port, "/sd/seed_blend?VALUE").get("VALUE") == blend, 30)
        send("/sd/input_fit", "s", "letterbox")  # the test pattern is 4:3, the engine square
        send("/sd/input_zoom/norm", "f", "0.5")  # 0..1 onto 1..8
        send("/sd/input_pan_x", "f", "-1")
        assert wait_until(lambda: query(query_port, "/sd/input_pan_x?VALUE").get("VALUE") == [-1.0], 30)
        assert query(query_port, "/sd/input_fit?VALUE")["VALUE"] == ["letterbox"]
        assert query(query_port, "/sd/input_zoom?VALUE")["VALUE"] == [pytest.approx(4.5)]
        assert process.poll() is None
    finally:
        out, err = stop_bridge(process, status)
    assert process.returncode == 0, err
    assert "t_index_list" in err and "strictly increasing" in err, err  # the refusal was logged
    assert "source 640x480 into 64x64: its middle 480x480 is used (input_fit crop" in err, err  # at the first frame
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
        udp.bind(("127.0.0.1", osc_port))  # the ports are free again at once
        tcp.bind(("127.0.0.1", osc_port))


def test_resolution_changes_while_running_and_a_fixed_size_sink_gets_it_letterboxed(tmp_path):
    """/sd/resolution from oscsend: the engine switches size between frames, OSCQuery reports it,
    a size the model cannot take is refused with the run going on, and the PNG sink (opened at
    the start size) gets the wider picture with black bars above and below, not stretched."""
    import av

    osc_port, query_port = free_port(), free_port()
    frames = tmp_path / "frames"
    frames.mkdir()
    command = [sys.executable, "-m", "bridge.cli", "run", "--source", "testpattern", "--sink",
               f"file:{frames}/%05d.png", *TINY, "--fps", "10", "--osc-port", str(osc_port),
               "--oscquery-port", str(query_port)]
    process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: query(query_port, "/?HOST_INFO"), 60), "OSCQuery never answered"
        assert wait_until(lambda: len(list(frames.iterdir())) >= 3, 30), "no frames before the switch"
        before = len(list(frames.iterdir()))

        def send(*args):
            subprocess.run(["oscsend", "127.0.0.1", str(osc_port), *args], check=True, timeout=5)

        assert query(query_port, "/sd/resolution?VALUE")["VALUE"] == [64, 64]  # as started
        send("/sd/resolution", "ii", "128", "64")
        assert wait_until(lambda: query(query_port, "/sd/resolution?VALUE")["VALUE"] == [128, 64], 30)
        switched = len(list(frames.iterdir()))
        send("/sd/resolution", "s", "72x64")  # 72 is not a multiple of 16 for this model: refused
        send("/sd/seed", "i", "5")
        assert wait_until(lambda: query(query_port, "/sd/seed?VALUE")["VALUE"] == [5], 30)
        assert wait_until(lambda: len(list(frames.iterdir())) >= switched + 5, 30), "no frames after the switch"
        assert query(query_port, "/sd/resolution?VALUE")["VALUE"] == [128, 64]
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    assert "width: 72 must be a multiple of 16" in err, err

    def pixels(path):
        with av.open(str(path)) as container:
            return next(container.decode(video=0)).to_ndarray(format="rgb24")

    paths = sorted(frames.iterdir())
    first, last = pixels(paths[before - 1]), pixels(paths[-1])
    assert first.shape == last.shape == (64, 64, 3)  # the sink keeps the size it was opened with
    assert first[:8].any(), "the frames before the switch fill the sink"
    assert not last[:16].any() and not last[-16:].any(), "128x64 in 64x64: 16 black rows above and below"
    assert last[16:48].any()


def test_oscsend_stops_and_starts_the_recording(tmp_path):
    """The record button from a foreign client: /sd/record/stop finishes show.mp4, status says
    recording 0, /sd/record/start records into show-2.mp4, and the exit summary lists both."""
    osc_port = free_port()
    status = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    status.bind(("127.0.0.1", 0))
    status.settimeout(0.2)
    command = [sys.executable, "-m", "bridge.cli", "run", "--source", "testpattern", "--sink", f"file:{tmp_path}/show.mp4",
               *TINY, "--fps", "10", "--osc-port", str(osc_port), "--oscquery-port", "off",
               "--status-target", f"127.0.0.1:{status.getsockname()[1]}"]
    process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def recording():
        """The latest /sd/status/recording value among the messages waiting (all read: a status
        tick is a dozen messages, more than one read per poll would keep up with), plus one
        (0 is falsy); None when none came."""
        latest = None
        for _ in range(1000):  # (bounded; a tick is ~15 messages)
            try:
                message = OscMessage(status.recv(65536))
            except socket.timeout:
                break
            if message.address == "/sd/status/recording":
                latest = message.params[0] + 1
        return latest

    try:
        started = wait_until(lambda: recording() == 2, 90)
        if started:  # (else the bridge's own words, below, say why)
            time.sleep(1.0)
            subprocess.run(["oscsend", "127.0.0.1", str(osc_port), "/sd/record/stop"], check=True, timeout=5)
            assert wait_until(lambda: recording() == 1, 10)
            subprocess.run(["oscsend", "127.0.0.1", str(osc_port), "/sd/record/start", "i", "1"], check=True, timeout=5)
            assert wait_until(lambda: recording() == 2, 10)
            time.sleep(1.0)
            assert process.poll() is None
    finally:
        out, err = stop_bridge(process, status)
    assert started, f"no status with one file recording in 90 s; the bridge said: {err[-3000:]}"
    assert process.returncode == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["show-2.mp4", "show.mp4"]
    assert f"recorded: {tmp_path}/show.mp4 (" in out and f"), {tmp_path}/show-2.mp4 (" in out, out
    assert "recording stopped" in err and "recording to" in err


def test_port_in_use_is_one_line_before_the_model_loads():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "bridge.cli", "run", "--sink", "null", *TINY, "--osc-port", str(port)],
                                cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "osc-port: cannot listen" in result.stderr and "Traceback" not in result.stderr
    assert "building random-weight" not in result.stderr
