"""The OBS script (obs/sdbridge_obs.py) loaded with the stand-in obspython: properties generated
from the real parameter table, script_update / buttons / scene changes driven, a real UDP peer
receiving exactly the expected messages; its hand-written OSC encoder checked against python-osc's
parser and liblo's oscdump."""

import functools
import importlib.util
import json
import pathlib
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from pythonosc.osc_message import OscMessage

import obspython_standin
from bridge.cli import build_parser
from bridge.control.status import status_messages
from bridge.control.table import PARAMETERS
from test_touchdesigner import check_guide

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "obs" / "sdbridge_obs.py"
WAIT_SECONDS = 5.0


def load_script():
    sys.modules["obspython"] = obspython_standin
    obspython_standin.standin.reset()
    spec = importlib.util.spec_from_file_location("sdbridge_obs_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Receiver:
    """A real UDP peer on 127.0.0.1; messages parsed by python-osc."""

    def __init__(self):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]

    def messages(self, quiet=0.3, limit=WAIT_SECONDS):
        """Everything that arrives until `quiet` seconds pass without a datagram."""
        got, deadline = [], time.monotonic() + limit
        self.socket.settimeout(quiet)
        while time.monotonic() < deadline:
            try:
                data = self.socket.recv(65535)
            except socket.timeout:
                break
            message = OscMessage(data)
            got.append((message.address, list(message.params)))
        return got

    def close(self):
        self.socket.close()


# `sdbridge run` as the fake runs it: like the real bridge it ignores nothing but SIGTERM here, so a
# stop has to come through its stdin (as from OBS on Windows, where CTRL_BREAK cannot be sent)
FAKE_RUN = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "--stop-on-stdin-eof" in sys.argv:
    sys.stdin.buffer.read()
    sys.exit(0)
time.sleep(30)
"""
DEAF_RUN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(30)
"""  # deaf to every stop request: only a kill ends it


def make_fake_sdbridge(folder, *, run=FAKE_RUN, params="cd '{root}' && exec '{python}' -m bridge.cli \"$@\""):
    """An executable answering `params --json` (the real CLI by default) and recording `run`'s arguments."""
    folder.mkdir(exist_ok=True)
    (folder / "run.py").write_text(run)
    path = folder / "sdbridge"
    path.write_text(f"""#!/bin/sh
if [ "$1" = "params" ]; then {params.format(root=ROOT, python=sys.executable)}; fi
printf '%s\\n' "$@" > '{folder}/argv.txt'
exec '{sys.executable}' '{folder}/run.py' "$@"
""")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def fake_sdbridge(tmp_path):
    return make_fake_sdbridge(tmp_path)


def wait_for_table(script, seconds=30.0):
    """Run OBS's timers until the table loading on its thread has been applied."""
    deadline = time.monotonic() + seconds
    while getattr(script.state, "loading", None) is not None and time.monotonic() < deadline:
        obspython_standin.standin.run_timers()
        time.sleep(0.02)
    assert getattr(script.state, "loading", None) is None, "the table did not load"


class Clock:
    """The script's clock (its _now), moved by the test: the typing debounce without sleeping."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def loaded(fake_sdbridge, monkeypatch):
    obs = obspython_standin
    script = load_script()
    clock = Clock()
    monkeypatch.setattr(script, "_now", clock, raising=False)
    script.clock = clock  # for the tests
    receiver = Receiver()
    settings = obs.obs_data_create()
    obs.obs_data_set_string(settings, "executable", str(fake_sdbridge))
    script.script_defaults(settings)
    obs.obs_data_set_int(settings, "osc_port", receiver.port)
    obs.obs_data_set_int(settings, "status_port", free_port())
    script.script_load(settings)
    wait_for_table(script)
    script.script_update(settings)  # OBS calls it after loading: the baseline, nothing is sent
    yield script, settings, receiver
    script.script_unload()
    receiver.close()


def settle(script):
    """The typing pause is over: the timer sends what was typed."""
    script.clock.now += script.DEBOUNCE_SECONDS
    obspython_standin.standin.run_timers()


def test_properties_cover_every_parameter_of_the_table(loaded):
    script, settings, receiver = loaded
    props = script.script_properties()
    kinds = {"string": "text", "float": "float_slider", "int": "int", "bool": "bool", "int_list": "text", "size": "text",
             "prompt_blend": "text", "seed_blend": "text", "choice": "list", "trigger": "button", "cue": "int"}
    for param in PARAMETERS:
        prop = props.items.get("p_" + param.name)
        assert prop is not None, f"{param.name}: no OBS property"
        assert prop.kind == kinds[param.kind], param.name
        assert param.address in prop.long_description
        if param.kind == "float":
            assert (prop.details["min"], prop.details["max"]) == (param.minimum, param.maximum)
    assert [name for name, _ in props.items["p_prompt_blend_method"].items] == ["linear", "slerp"]
    assert receiver.messages(quiet=0.2) == []  # loading sends nothing
    assert obspython_standin.obs_data_get_int(settings, "osc_port") == receiver.port


def test_changes_send_exactly_what_changed(loaded):
    script, settings, receiver = loaded
    obs = obspython_standin
    obs.obs_data_set_double(settings, "p_guidance_scale", 2.5)
    script.script_update(settings)
    assert receiver.messages() == [("/sd/guidance", [2.5])]
    obs.obs_data_set_string(settings, "p_prompt", "a foggy harbour at dawn")
    obs.obs_data_set_bool(settings, "p_similarity_filter", True)
    obs.obs_data_set_string(settings, "p_t_index_list", "20, 35")
    script.script_update(settings)
    assert receiver.messages() == [("/sd/similarity/enable", [True])]  # at once; the texts once settled
    settle(script)
    assert sorted(receiver.messages()) == sorted([("/sd/prompt", ["a foggy harbour at dawn"]),
                                                   ("/sd/t_index_list", [20, 35])])
    script.script_update(settings)  # nothing changed
    settle(script)
    assert receiver.messages(quiet=0.2) == []
    obs.obs_data_set_string(settings, "p_resolution", "768x432")
    script.script_update(settings)
    settle(script)
    assert receiver.messages() == [("/sd/resolution", [768, 432])]


def test_typing_sends_only_the_final_text_once_it_has_settled(loaded):
    """OBS calls script_update on every keystroke: typing 1280x720 must not send 1280x72 (a size
    change the bridge restarts or compiles for), t_index_list 2 then 20, nor a prompt per letter."""
    script, settings, receiver = loaded
    obs, standin = obspython_standin, obspython_standin.standin
    typing = {"p_resolution": ["1", "12", "128", "1280", "1280x", "1280x7", "1280x72", "1280x720"],
              "p_t_index_list": ["2", "20", "20,", "20,4", "20,40"],
              "p_prompt": ["a", "a c", "a ca", "a cat", "a cat i", "a cat in the rain"]}
    sent = []
    for step in range(max(len(texts) for texts in typing.values())):
        for key, texts in typing.items():
            obs.obs_data_set_string(settings, key, texts[min(step, len(texts) - 1)])
        script.script_update(settings)
        script.clock.now += 0.3  # a keystroke every 0.3 s, the timer between them
        standin.run_timers()
        sent += receiver.messages(quiet=0.05)
    # t_index_list was typed first: it settled (and went, once) while the others were still typed
    assert sent == [("/sd/t_index_list", [20, 40])]
    obs.obs_data_set_double(settings, "p_guidance_scale", 3.5)  # a slider meanwhile: at once
    script.script_update(settings)
    assert receiver.messages() == [("/sd/guidance", [3.5])]
    settle(script)
    assert sorted(receiver.messages()) == [("/sd/prompt", ["a cat in the rain"]), ("/sd/resolution", [1280, 720])]
    obs.obs_data_set_string(settings, "p_prompt", "a cat in the rain!")
    script.script_update(settings)
    obs.obs_data_set_string(settings, "p_prompt", "a cat in the rain")  # typed back before it settled
    script.script_update(settings)
    settle(script)
    assert receiver.messages(quiet=0.2) == []


def test_buttons_triggers_presets_and_scenes(loaded):
    script, settings, receiver = loaded
    obs, standin = obspython_standin, obspython_standin.standin
    props = script.script_properties()
    standin.click(props, "p_pause")
    obs.obs_data_set_int(settings, "p_preset", 3)
    script.script_update(settings)
    standin.click(props, "p_preset_recall")
    assert receiver.messages() == [("/sd/pause", []), ("/sd/preset", [3])]
    obs.obs_data_set_string(settings, "scene_presets", "Intro = 4\n# comment\nFinale=9")
    script.script_update(settings)
    standin.change_scene("Intro")
    standin.change_scene("Backstage")  # no preset: nothing
    standin.change_scene("Finale")
    assert receiver.messages() == [("/sd/preset", [4]), ("/sd/preset", [9])]
    standin.click(props, "send_all")
    sent = dict((address, args) for address, args in receiver.messages())
    assert sent["/sd/guidance"] == [pytest.approx(1.2)] and "/sd/pause" not in sent and "/sd/strength" not in sent


def test_start_sends_everything_when_the_bridge_is_alive_and_stop_ends_it(loaded, tmp_path):
    script, settings, receiver = loaded
    obs, standin = obspython_standin, obspython_standin.standin
    obs.obs_data_set_string(settings, "source", "camera:OBS Virtual Camera")
    obs.obs_data_set_string(settings, "sinks", "spout:sdbridge, ndi:sdbridge")
    obs.obs_data_set_string(settings, "p_prompt", "neon jungle")
    script.script_update(settings)
    receiver.messages()
    props = script.script_properties()
    standin.click(props, "start")
    deadline = time.monotonic() + WAIT_SECONDS
    while not (tmp_path / "argv.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    argv = (tmp_path / "argv.txt").read_text().splitlines()
    args = build_parser().parse_args(argv)
    assert (args.source, args.sink, args.osc_port) == ("camera:OBS Virtual Camera", ["spout:sdbridge", "ndi:sdbridge"],
                                                       receiver.port)
    status_port = obs.obs_data_get_int(settings, "status_port")
    assert args.status_target == f"127.0.0.1:{status_port}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bridge:  # the bridge's status, as it sends it
        for packet in status_messages({"state": "running", "processed_fps": 30.0}):
            bridge.sendto(packet, ("127.0.0.1", status_port))
    time.sleep(0.1)
    standin.run_timers()
    sent = dict(receiver.messages())
    assert sent["/sd/prompt"] == ["neon jungle"] and "/sd/t_index_list" in sent
    standin.run_timers()  # still alive: no second snapshot
    assert receiver.messages(quiet=0.2) == []
    assert argv[1] == "--stop-on-stdin-eof"
    process = script.state.process
    started = time.monotonic()
    standin.click(props, "stop")
    # the fake ignores SIGTERM: its stdin closing stopped it (status 0), long before the kill
    assert process.returncode == 0 and time.monotonic() - started < 2.0


def test_stop_kills_a_bridge_deaf_to_every_request_even_when_the_signal_fails(tmp_path, monkeypatch):
    """Windows, OBS without a console: CTRL_BREAK_EVENT raises OSError. The bridge must still not
    be orphaned holding the GPU, camera and OSC port: after the grace time it is killed."""
    obs, standin = obspython_standin, obspython_standin.standin
    script = load_script()
    monkeypatch.setattr(script, "STOP_GRACE_SECONDS", 0.5)

    def no_console(self):
        raise OSError("GenerateConsoleCtrlEvent failed: the handle is invalid")
    monkeypatch.setattr(subprocess.Popen, "terminate", no_console)
    fake = make_fake_sdbridge(tmp_path / "deaf", run=DEAF_RUN)
    settings = obs.obs_data_create()
    obs.obs_data_set_string(settings, "executable", str(fake))
    script.script_defaults(settings)
    obs.obs_data_set_int(settings, "status_port", free_port())
    script.script_load(settings)
    try:
        wait_for_table(script)
        standin.click(script.script_properties(), "start")
        process = script.state.process
        deadline = time.monotonic() + WAIT_SECONDS
        while not (tmp_path / "deaf" / "argv.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        standin.click(script.script_properties(), "stop")
        assert process.poll() is not None and process.returncode != 0  # killed
        assert any("killing it" in text for _, text in standin.log)
    finally:
        script.script_unload()


def test_the_timer_survives_a_stop_between_its_check_and_its_use(loaded):
    """Timers run on OBS's graphics thread, buttons on its UI thread: stop_bridge can set
    state.process to None while the timer is looking at it."""
    script, settings, receiver = loaded

    class StoppedMeanwhile:
        returncode, stdin, pid = 3, None, 1

        def poll(self):
            script.state.process = None  # the Stop button, on the other thread
            return 3

    script.state.process = StoppedMeanwhile()
    obspython_standin.standin.run_timers()
    assert any("exited with status 3" in text for _, text in obspython_standin.standin.log)


def test_script_uses_only_what_the_standin_documents():
    used = set(re.findall(r"(?<![\w-])obs\.([A-Za-z_]+)", SCRIPT.read_text()))
    missing = [name for name in used if not hasattr(obspython_standin, name)]
    assert not missing


def load_with(executable):
    obs = obspython_standin
    script = load_script()
    settings = obs.obs_data_create()
    obs.obs_data_set_string(settings, "executable", str(executable))
    obs.obs_data_set_int(settings, "status_port", free_port())
    script.script_defaults(settings)
    script.script_load(settings)
    return script, settings


def test_missing_program_shows_a_problem_instead_of_parameters(tmp_path):
    script, settings = load_with(tmp_path / "nowhere")
    try:
        wait_for_table(script)
        props = script.script_properties()
        assert "cannot run" in props.items["table_error"].description and "p_prompt" not in props.items
    finally:
        script.script_unload()


def test_a_table_without_the_prefix_the_timer_reads_is_refused(tmp_path):
    from bridge.commands.params import as_json

    table = as_json()
    del table["osc"]["prefix"]
    (tmp_path / "table.json").write_text(json.dumps(table))
    script, settings = load_with(make_fake_sdbridge(tmp_path, params=f"cat '{tmp_path}/table.json'; exit 0"))
    try:
        wait_for_table(script)
        assert script.state.table is None and "printed no parameter table" in script.state.table_error
        obspython_standin.standin.run_timers()  # and the timer runs without a table
    finally:
        script.script_unload()


def test_a_slow_params_launch_never_freezes_obs(tmp_path):
    """`params --json` runs on a thread: loading the script and pressing Reload return at once (Reload
    waits RELOAD_WAIT_SECONDS at most); the timer applies the table when it comes."""
    slow = make_fake_sdbridge(tmp_path, params=f"sleep 2; cd '{ROOT}' && exec '{sys.executable}' -m bridge.cli \"$@\"")
    started = time.monotonic()
    script, settings = load_with(slow)
    try:
        assert time.monotonic() - started < 0.5 and script.state.table is None
        props = script.script_properties()
        assert "table_loading" in props.items and "p_prompt" not in props.items
        started = time.monotonic()
        assert obspython_standin.standin.click(props, "reload") is True  # refreshes the view
        assert time.monotonic() - started < script.RELOAD_WAIT_SECONDS + 0.5
        wait_for_table(script)
        props = script.script_properties()
        assert "p_prompt" in props.items and "table_loading" not in props.items
        assert obspython_standin.obs_data_get_int(settings, "osc_port") == script.state.table["osc"]["port"]
    finally:
        script.script_unload()


def test_reload_shows_a_quick_table_at_once(fake_sdbridge):
    script, settings = load_with(fake_sdbridge)
    try:
        wait_for_table(script)
        props = script.script_properties()
        assert obspython_standin.standin.click(props, "reload") is True
        assert "p_prompt" in script.script_properties().items and script.state.loading is None
    finally:
        script.script_unload()


@pytest.mark.parametrize("first", ["reload", "timer"])
def test_a_finished_load_is_applied_once_when_the_button_and_the_timer_race(fake_sdbridge, monkeypatch, first):
    """The Reload button (OBS's UI thread) and the timer (its graphics thread) both find the same
    finished load: the second, run on another thread right after the first has checked the load,
    applies nothing: one set of defaults on the obs_data_t, one status socket."""
    script, settings = load_with(fake_sdbridge)
    try:
        loading = script.state.loading
        assert loading is not None and loading.done(30)  # finished, not applied: no timer ran yet
        applied = {"defaults": 0, "status socket": 0}
        for name, key in (("_set_table_defaults", "defaults"), ("_open_status_socket", "status socket")):
            def counted(*args, _real=getattr(script, name), _key=key):
                applied[_key] += 1
                return _real(*args)
            monkeypatch.setattr(script, name, counted)
        props = script.script_properties()
        clicks = []
        actions = {"reload": lambda: clicks.append(obspython_standin.standin.click(props, "reload")),
                   "timer": obspython_standin.standin.run_timers}
        second = threading.Thread(target=actions["timer" if first == "reload" else "reload"])
        real_done = loading.done

        def done(wait=0.0):  # the first apply's check of the load: now the other thread tries
            finished = real_done(wait)
            if wait == 0.0 and second.ident is None:
                second.start()
                second.join(0.5)  # it finishes unless a lock holds it back
            return finished
        monkeypatch.setattr(loading, "done", done)
        actions[first]()
        second.join(10)
        assert not second.is_alive() and clicks == [True]
        assert applied == {"defaults": 1, "status socket": 1} and loading.applied and script.state.loading is None
        assert "p_prompt" in script.script_properties().items
    finally:
        script.script_unload()


def test_params_runs_without_a_console_window_on_windows(monkeypatch):
    from bridge.commands.params import as_json

    script = load_script()
    calls = []

    def run(argv, **kwargs):
        calls.append(kwargs)
        return subprocess.CompletedProcess(argv, 0, json.dumps(as_json()), "")
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(subprocess, "CREATE_NO_WINDOW", 0x08000000, raising=False)
    monkeypatch.setattr(subprocess, "run", run)
    assert script.load_table("sdbridge.exe")["osc"]["prefix"] == "/sd"
    assert calls[0]["creationflags"] == 0x08000000


def test_the_standin_is_as_strict_as_obs_about_buttons():
    """OBS adds a button only for a plain function and refreshes the properties only when its
    callback returns exactly True; the stand-in must not accept what OBS would not."""
    obs = obspython_standin
    props = obs.obs_properties_create()

    class Holder:
        def clicked(self, props, prop):
            return True

    for name, callback in (("method", Holder().clicked), ("partial", functools.partial(lambda props, prop: True)),
                           ("builtin", print)):
        assert obs.obs_properties_add_button(props, name, name, callback) is None and name not in props.items
    obs.obs_properties_add_button(props, "one", "returns 1", lambda props, prop: 1)
    obs.obs_properties_add_button(props, "true", "returns True", lambda props, prop: True)
    assert obs.standin.click(props, "one") is False and obs.standin.click(props, "true") is True


TYPED_SAMPLES = {"string": "a watercolor city", "int_list": "10, 20", "size": "768x432",
                 "prompt_blend": "a castle:0.7 | a forest:0.3", "seed_blend": "2:0.7 | 9:0.3"}


@pytest.mark.parametrize("param", [p for p in PARAMETERS if p.kind in TYPED_SAMPLES], ids=lambda p: p.name)
def test_each_typed_text_reaches_the_bridge_as_its_value(param):
    """What a user types in a text box, through the script's own encoder, into the real router."""
    from bridge.control.router import Router
    from bridge.params import ParameterStore

    script, store = load_script(), ParameterStore()
    router = Router(store=store)
    row = {"name": param.name, "kind": param.kind}
    router.handle(script.encode_message("/sd" + param.address, script.value_arguments(row, TYPED_SAMPLES[param.kind])),
                  ("127.0.0.1", 1))
    assert router.counters["rejected"] == router.counters["malformed"] == 0, router.last_error
    assert param.name in store.take()
    if param.kind != "string":
        assert script.value_arguments(row, "  ") is None  # an empty box sends nothing


def test_a_mistyped_seed_blend_says_what_is_wrong():
    script = load_script()
    for bad in ("2", "two:0.5", "2:0.5 | 3"):
        with pytest.raises(ValueError, match="seed_blend: .* must be 'seed:weight'"):
            script.value_arguments({"name": "seed_blend", "kind": "seed_blend"}, bad)


# ------------------------------------------------------------------ the hand-written encoder

ENCODER_CASES = [
    ("/sd/guidance", [2.5]), ("/sd/seed", [-7]), ("/sd/prompt", ["abc"]), ("/sd/prompt", ["abcd"]),
    ("/sd/prompt", ["a watercolor city at night, 東京"]), ("/sd/t_index_list", [0, 20, 999]), ("/sd/pause", []),
    ("/sd/similarity/enable", [True]), ("/sd/similarity/enable", [False]), ("/a", [b"\x01\x02\x03"]),
    ("/sd/prompt_blend", ["a castle", 0.7, "a forest", 0.3]),
]


@pytest.mark.parametrize("address, args", ENCODER_CASES)
def test_encoder_against_python_osc(address, args):
    script = load_script()
    data = script.encode_message(address, args)
    assert len(data) % 4 == 0
    message = OscMessage(data)
    assert message.address == address
    assert list(message.params) == [pytest.approx(a, rel=1e-6) if isinstance(a, float) else a for a in args]
    if all(not isinstance(a, bytes) for a in args):
        assert script.decode_message(data) == (address, [pytest.approx(a, rel=1e-6) if isinstance(a, float) else a
                                                         for a in args])


def test_encoder_refuses_what_osc_cannot_carry():
    with pytest.raises(ValueError, match="cannot send a dict"):
        load_script().encode_message("/sd/x", [{}])


@pytest.mark.skipif(shutil.which("oscdump") is None, reason="liblo-tools (oscdump) not installed")
def test_encoder_against_oscdump():
    script = load_script()
    port = free_port()
    dump = subprocess.Popen(["oscdump", "-L", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        cases = [("/sd/guidance", [2.5]), ("/sd/prompt", ["neon jungle"]), ("/sd/t_index_list", [20, 35]),
                 ("/sd/pause", []), ("/sd/similarity/enable", [True])]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for address, args in cases:
                sender.sendto(script.encode_message(address, args), ("127.0.0.1", port))
        lines, deadline = [], time.monotonic() + WAIT_SECONDS
        while len(lines) < len(cases) and time.monotonic() < deadline:
            line = dump.stdout.readline().strip()
            lines.append(re.sub(r"^[0-9a-f]{8}\.[0-9a-f]{8} ", "", line))  # oscdump's timetag column
    finally:
        dump.terminate()
        dump.wait(5)
    assert lines == ['/sd/guidance f 2.500000', '/sd/prompt s "neon jungle"', "/sd/t_index_list ii 20 35", "/sd/pause",
                     "/sd/similarity/enable T #T"]


def test_scene_preset_text():
    script = load_script()
    assert script.parse_scene_presets("Intro = 1\n\n# x\nPart = Two = 2") == {"Intro": 1, "Part = Two": 2}
    with pytest.raises(ValueError, match="line 1"):
        script.parse_scene_presets("Intro")


def test_obs_guide_matches_the_code():
    check_guide(ROOT / "obs" / "README.md")
