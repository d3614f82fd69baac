"""The TouchDesigner component's plain-Python logic (touchdesigner/sdbridge_td), its setup script
against a recorder of the documented TouchDesigner calls, and the guide's commands and addresses."""

import pathlib
import re
import subprocess
import sys
import time

import pytest
from pythonosc.osc_message_builder import OscMessageBuilder

ROOT = pathlib.Path(__file__).resolve().parents[1]
TD_FOLDER = ROOT / "touchdesigner"
sys.path.insert(0, str(TD_FOLDER))

from sdbridge_td import command, component, status, supervisor, table  # noqa: E402

from bridge.cli import build_parser  # noqa: E402
from bridge.commands.params import as_json  # noqa: E402
from bridge.control import DEFAULT_OSC_PORT  # noqa: E402
from bridge.control.router import Router  # noqa: E402
from bridge.control.status import STATES, status_messages  # noqa: E402
from bridge.control.table import PARAMETERS, RUNTIME_NAMES, addresses  # noqa: E402
from bridge.params import PARAMETERS as STORE_PARAMETERS  # noqa: E402
from bridge.params import ParameterStore  # noqa: E402

PRESET_VALUES = {7: {"seed": 77}}


@pytest.fixture(scope="module")
def td_table():
    return table.load_table(as_json())  # generated from bridge.control.table at run time


def osc_bytes(address, values):
    """Encode like TouchDesigner's sendOSC: int -> i, float -> f, str -> s (python-osc as the encoder)."""
    builder = OscMessageBuilder(address)
    for value in values:
        builder.add_arg(value, {int: "i", float: "f", str: "s"}[type(value)])
    return builder.build().dgram


class Actions:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda: self.calls.append(name)


def sample_value(spec):
    """A value a VJ could set, of the TouchDesigner parameter's type."""
    if spec.kind in ("float", "int"):
        middle = spec.minimum + (min(spec.maximum, 1000) - spec.minimum) / 3
        return round(middle) if spec.kind == "int" else middle
    return {"string": "a watercolor city", "bool": True, "int_list": "10, 20", "size": "768x432",
            "prompt_blend": "a castle:0.7 | a forest:0.3", "seed_blend": "2:0.7 | 9:0.3",
            "choice": spec.choices[-1] if spec.choices else "", "trigger": 1, "cue": 7}.get(spec.kind)


# ------------------------------------------------------------------ the table -> page, every entry


def test_every_table_entry_has_a_td_parameter_and_valid_names(td_table):
    pages = component.component_pages(td_table, platform="win32")
    covered = {par.spec for par in pages["Parameters"]}
    assert covered == {param.name for param in PARAMETERS}
    for page in pages.values():
        for par in page:
            assert component.NAME_PATTERN.match(par.name)
            assert par.style in table.STYLES


def test_a_parameter_of_an_unknown_kind_is_refused(td_table):
    data = as_json()
    data["parameters"].append(dict(data["parameters"][0], name="colour_wheel", kind="rgb"))
    with pytest.raises(ValueError, match="colour_wheel: kind 'rgb'"):
        table.parameter_page(table.load_table(data))


def test_td_names():
    assert table.td_name("guidance_scale") == "Guidancescale"
    assert table.td_name("preset", "recall") == "Presetrecall"
    with pytest.raises(ValueError):
        table.td_name("_")


def test_bad_json_is_one_clear_error():
    with pytest.raises(ValueError, match="sdbridge params --json"):
        table.load_table("{}")


# ------------------------------------------------------------------ page -> OSC -> the real router


@pytest.mark.parametrize("param_name", [p.name for p in PARAMETERS])
def test_each_parameter_reaches_the_bridge(td_table, param_name):
    """Every TouchDesigner parameter's message, encoded as sendOSC does, through the real router."""
    store, actions = ParameterStore(), Actions()
    router = Router(store=store, actions={name: getattr(actions, name) for name in RUNTIME_NAMES if name != "preset"},
                    presets=PRESET_VALUES)
    page = table.parameter_page(td_table)
    spec = td_table.by_name(param_name)
    sending = [par for par in page if par.spec == param_name and (par.sends or par.style == "Pulse")]
    assert sending, f"{param_name}: no TouchDesigner parameter sends it"
    for par in sending:
        value = sample_value(spec) if par.style != "Pulse" or spec.kind == "cue" else 1
        for address, values in table.osc_messages(td_table, par, value, page=page):
            router.handle(osc_bytes(address, values), ("127.0.0.1", 50000))
    counters, pending = router.counters, store.take()
    assert counters["unknown_address"] == counters["malformed"] == 0
    if spec.target == "runtime":
        if spec.kind == "cue":
            assert pending == PRESET_VALUES[7]
        else:
            assert actions.calls == [param_name]
    else:
        assert param_name in STORE_PARAMETERS
        assert counters["rejected"] == 0, router.last_error
        assert param_name in pending


def test_texts_parse_or_say_what_is_wrong(td_table):
    spec = td_table.by_name("t_index_list")
    assert table.parse_int_list(spec, "32, 45") == [32, 45]
    with pytest.raises(ValueError, match="t_index_list"):
        table.parse_int_list(spec, "32,forty")
    blend = td_table.by_name("prompt_blend")
    assert table.parse_prompt_blend(blend, "") is None
    with pytest.raises(ValueError, match="prompt:weight"):
        table.parse_prompt_blend(blend, "a castle")
    seeds = td_table.by_name("seed_blend")
    assert table.parse_seed_blend(seeds, " 2:0.7 | 9 : 0.3 ") == [2, 0.7, 9, 0.3]
    assert table.parse_seed_blend(seeds, " ") is None
    for bad in ("2", "two:0.5", "2:half", "2:0.5 | 3"):
        with pytest.raises(ValueError, match="seed_blend: .* must be 'seed:weight'"):
            table.parse_seed_blend(seeds, bad)
    size = td_table.by_name("resolution")
    assert table.parse_size(size, "768 x 432") == [768, 432]
    assert table.parse_size(size, " ") is None
    with pytest.raises(ValueError, match="resolution: '768' must be a width and a height"):
        table.parse_size(size, "768")


def test_snapshot_restores_stored_values_not_actions(td_table):
    page = table.parameter_page(td_table)
    values = {par.name: par.default for par in page if par.style != "Pulse"}
    values["Prompt"] = "a city"
    messages = table.snapshot_messages(td_table, values, page=page)
    sent = {address for address, _ in messages}
    assert "/sd/prompt" in sent and "/sd/guidance" in sent
    assert not sent & {"/sd/pause", "/sd/resume", "/sd/preset", "/sd/strength", "/sd/negative_prompt"}
    store = ParameterStore()
    router = Router(store=store)
    for address, args in messages:
        router.handle(osc_bytes(address, args), ("127.0.0.1", 1))
    assert router.counters["unknown_address"] == router.counters["malformed"] == 0


# ------------------------------------------------------------------ command line


def run_parser():
    return build_parser()


def has_run_flag(flag):
    return flag in run_parser()._subparsers._group_actions[0].choices["run"]._option_string_actions


def test_command_line_uses_the_real_flags(td_table):
    options = component.bridge_options({
        "Executable": "sdbridge", "Transport": "ndi", "Inputname": "td out", "Outputname": "sd out", "Model": "stabilityai/sd-turbo",
        "Width": 512, "Height": 768, "Oscport": td_table.osc_port, "Bridgehost": "127.0.0.1", "Statushost": "127.0.0.1",
        "Statusport": td_table.osc_port + 2, "Config": "show.toml", "Extraargs": "--fps 25", "Prompt": "a city"},
        platform="linux")
    argv = command.build_command(options)
    assert argv[:6] == ["sdbridge", "run", "--source", "ndi:td out", "--sink", "ndi:sd out"]
    assert td_table.osc_port == DEFAULT_OSC_PORT
    assert all(has_run_flag(flag) for flag in ("--osc-port", "--osc-bind", "--status-target"))
    args = run_parser().parse_args(argv[1:])
    assert (args.source, args.sink, args.height, args.prompt, args.fps) == ("ndi:td out", ["ndi:sd out"], 768, "a city", 25.0)


def test_mode_live_loras_and_windows_paths_reach_the_run_flags(td_table):
    """The Mode menu and the Live LoRAs text become --mode and one --live-lora each; on Windows a
    path typed in Extra keeps its backslashes (a POSIX shell split would eat them)."""
    pages = component.component_pages(td_table, platform="win32")
    bridge = {par.name: par for par in pages["Bridge"]}
    assert bridge["Mode"].menu == ("img2img", "txt2img") and bridge["Mode"].default == "img2img"
    assert {"Lora1", "Lora4"} <= {par.name for par in pages["Parameters"]}  # the strengths they set
    values = {"Executable": "sdbridge", "Transport": "spout", "Inputname": "td out", "Outputname": "sd out",
              "Model": "", "Width": 512, "Height": 512, "Oscport": td_table.osc_port, "Bridgehost": "127.0.0.1",
              "Statushost": "127.0.0.1", "Statusport": td_table.osc_port + 2, "Config": "", "Mode": "txt2img",
              "Liveloras": r"C:\loras\ink.safetensors:0.8 |  | D:/neon style.safetensors ",
              "Extraargs": r'--lora C:\loras\fixed.safetensors:0.5 --prompt "a city, at night"'}
    argv = command.build_command(component.bridge_options(values, platform="win32"))
    args = run_parser().parse_args(argv[1:])
    assert args.mode == "txt2img"
    assert args.live_lora == [r"C:\loras\ink.safetensors:0.8", "D:/neon style.safetensors"]
    assert args.lora == [r"C:\loras\fixed.safetensors:0.5"] and args.prompt == "a city, at night"
    plain = command.build_command(component.bridge_options(dict(values, Mode="img2img", Liveloras="", Extraargs=""),
                                                           platform="win32"))
    assert "--mode" not in plain and "--live-lora" not in plain
    assert command.split_flags(r"--lora my\ style.safetensors", platform="linux") == ["--lora", "my style.safetensors"]


@pytest.mark.parametrize("changes, message", [
    ({"mode": "img2vid"}, "mode: 'img2vid' must be one of img2img, txt2img"),
    ({"live_loras": "a | b | c | d | e"}, r"live_loras: 5 given; at most 4 \(Lora1 .. Lora4\)"),
    ({"extra": '--prompt "open'}, "extra: No closing quotation"),
    ({"transport": "spout", "platform": "darwin"}, "spout exists only on Windows"),
    ({"transport": "syphon"}, "syphon exists only on macOS; use ndi here"),
    ({"transport": "syphon", "platform": "win32"}, "syphon exists only on macOS"),
    ({"output_name": "sdbridge-in"}, "must differ"),
    ({"width": 500}, "width"),
    ({"status_port": 7450}, "status_port"),
    ({"executable": " "}, "executable"),
])
def test_bad_settings_are_one_line_errors(changes, message):
    fields = dict(transport="ndi", osc_port=7450, status_port=7452, platform="linux") | changes
    with pytest.raises(ValueError, match=message):
        command.BridgeOptions(**fields)


def test_a_mac_gets_syphon_as_windows_gets_spout(td_table):
    assert {par.name: par.default for par in component.bridge_page(td_table, platform="darwin")}["Transport"] == "syphon"
    assert {par.name: par.default for par in component.bridge_page(td_table, platform="win32")}["Transport"] == "spout"
    assert {par.name: par.default for par in component.bridge_page(td_table, platform="linux")}["Transport"] == "ndi"
    argv = command.build_command(command.BridgeOptions(transport="syphon", osc_port=7450, status_port=7452, platform="darwin"))
    assert argv[2:6] == ["--source", "syphon:sdbridge-in", "--sink", "syphon:sdbridge-out"]


def test_command_text_quotes_names():
    argv = command.build_command(command.BridgeOptions(transport="spout", input_name="TD Out", osc_port=7450,
                                                      status_port=7452, platform="win32"))
    assert '"spout:TD Out"' in command.command_text(argv, platform="win32")
    assert "'spout:TD Out'" in command.command_text(argv, platform="linux")


# ------------------------------------------------------------------ status


def full_snapshot():
    return {"state": "paused", "processed_fps": 29.5, "output_fps": 30.0, "inference_ms_median": 12.5,
            "latency_ms_median": 40.0, "frames_skipped": 3, "frames_dropped": 1, "osc_refused": 2, "sink_errors": 0,
            "sink_missed": 4, "recording": 1, "last_error": "x: bad",
            "backend": "compiled+step graph", "size": "704x384"}


def test_status_fields_are_what_the_bridge_sends():
    from pythonosc.osc_message import OscMessage

    board = status.StatusBoard()
    names = set()
    for packet in status_messages(full_snapshot()):
        message = OscMessage(packet)
        names.add(board.update(message.address, message.params, now=1.0))
    assert names == {name for name, _ in status.FIELDS}
    assert board.values["state"] == STATES["paused"] and board.state_name == "paused"
    assert board.values["fps"] == pytest.approx(29.5) and board.values["error"] == "x: bad"
    assert board.values["backend"] == "compiled+step graph" and board.values["size"] == "704x384"
    assert {v: k for k, v in STATES.items()} == {k: v for k, v in status.STATE_NAMES.items() if k >= 0}
    assert board.alive(3.9) and not board.alive(4.1)


def test_status_channel_names_without_slash_and_strangers():
    board = status.StatusBoard()
    assert board.update("sd/status/fps", [12.0], now=0) == "fps"  # an OSC In CHOP's channel name
    assert board.update("/sd/guidance", [1.0], now=0) is None
    assert board.update("/sd/status/new_figure", [5], now=0) == "new_figure"
    assert status.parse_status("/sd/status/fps", ["fast"]) is None


def test_status_ints_fit_a_touchdesigner_int_and_infinity_is_not_one():
    assert status.parse_status("/sd/status/frames_dropped", [float("inf")]) is None  # OverflowError, not a crash
    assert status.parse_status("/sd/status/frames_dropped", [float("nan")]) is None
    assert status.parse_status("/sd/status/frames_skipped", [2**40]) == ("frames_skipped", 2**31 - 1)
    assert status.parse_status("/sd/status/osc_refused", [-2**40]) == ("osc_refused", -2**31)
    assert status.parse_status("/sd/status/frames_skipped", [12.0]) == ("frames_skipped", 12)
    board = status.StatusBoard()
    assert board.update("/sd/status/state", [float("-inf")], now=0) is None and board.last_heard is None


# ------------------------------------------------------------------ supervisor, real processes


def wait_for_state(sup, wanted, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sup.poll() in wanted:
            return sup.state
        time.sleep(0.02)
    return sup.poll()


def script(code):
    return [sys.executable, "-c", code]


def test_crash_restarts_with_backoff(tmp_path):
    sup = supervisor.Supervisor(command=script("import sys; print('boom error'); sys.exit(3)"), log_path=str(tmp_path / "log"),
                                backoff=supervisor.Backoff(initial=0.05, factor=2.0, maximum=0.2))
    sup.start()
    delays, deadline = {}, time.monotonic() + 20
    while len(delays) < 3 and time.monotonic() < deadline:
        if sup.poll() == "waiting":
            delays[sup.attempts] = sup.backoff.delay(sup.attempts)
        time.sleep(0.01)
    assert delays == {1: 0.05, 2: 0.1, 3: 0.2} and sup.starts >= 3
    assert "status 3" in sup.message and "boom error" in sup.message
    sup.stop()
    assert sup.poll() == "stopped"


def test_bad_settings_exit_is_final_with_the_error(tmp_path):
    code = "import sys; sys.stderr.write('sdbridge run: error: model: no such folder\\n'); sys.exit(2)"
    sup = supervisor.Supervisor(command=script(code), log_path=str(tmp_path / "log"))
    sup.start()
    assert wait_for_state(sup, ("failed",)) == "failed"
    assert "refused its settings" in sup.message and "model: no such folder" in sup.message


def test_stop_terminates_and_kills_after_grace(tmp_path):
    sup = supervisor.Supervisor(command=script("import time; time.sleep(60)"), log_path=str(tmp_path / "log"), stop_grace=2.0)
    sup.start()
    assert sup.poll() == "running" and sup.pid
    sup.stop()
    assert wait_for_state(sup, ("stopped",)) == "stopped"
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    sup = supervisor.Supervisor(command=script(stubborn), log_path=str(tmp_path / "log2"), stop_grace=0.3)
    sup.start()
    deadline = time.monotonic() + 10
    while "ready" not in "".join(supervisor.tail_lines(str(tmp_path / "log2"))) and time.monotonic() < deadline:
        time.sleep(0.02)
    sup.stop()
    assert wait_for_state(sup, ("stopped",)) == "stopped"


STUBBORN = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(60)")  # ignores SIGTERM and never reads its stdin: only a kill ends it


def stubborn_bridge(tmp_path, stop_grace):
    """A Supervisor running STUBBORN, once it printed "ready"; (supervisor, its process)."""
    log = tmp_path / "log"
    sup = supervisor.Supervisor(command=script(STUBBORN), log_path=str(log), stop_grace=stop_grace)
    sup.start()
    wait_for_line(log, "ready")
    return sup, sup._process


def wait_for_line(path, text, seconds=10.0):
    deadline = time.monotonic() + seconds
    while text not in "".join(supervisor.tail_lines(str(path))) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert text in "".join(supervisor.tail_lines(str(path))), supervisor.tail_lines(str(path))


@pytest.fixture
def no_console(monkeypatch):
    """TouchDesigner on Windows: no console, so CTRL_BREAK_EVENT raises OSError; here the stop
    signal (terminate, on this OS) does (kill still works, as TerminateProcess does there)."""
    def refuse(self):
        raise OSError("GenerateConsoleCtrlEvent failed: the handle is invalid")
    monkeypatch.setattr(subprocess.Popen, "terminate", refuse)


def test_the_bridge_runs_with_the_stop_flag_after_run():
    argv = command.build_command(command.BridgeOptions(transport="ndi", osc_port=7450, status_port=7452, platform="linux"))
    sup = supervisor.Supervisor(command=argv, log_path="unused")
    assert sup.command[:3] == ["sdbridge", "run", supervisor.STOP_FLAG] and sup.command[3:] == argv[2:]
    assert supervisor.with_stop_flag(sup.command) == sup.command  # never twice
    assert run_parser().parse_args(sup.command[1:]).stop_on_stdin_eof is True


def test_stop_closes_stdin_so_the_bridge_stops_cleanly_without_a_signal(tmp_path, no_console):
    """The signal fails (OSError, as from a GUI host on Windows) and is ignored anyway: the closed
    stdin alone stops the bridge, with status 0, long before the grace time would kill it."""
    code = ("import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "assert '--stop-on-stdin-eof' in sys.argv, sys.argv; print('ready', flush=True); "
            "sys.stdin.buffer.read(); print('stdin ended', flush=True)")
    log = tmp_path / "log"
    sup = supervisor.Supervisor(command=script(code), log_path=str(log), stop_grace=30.0)
    sup.start()
    wait_for_line(log, "ready")
    time.sleep(0.3)
    assert sup.poll() == "running", sup.message  # its stdin stays open while it runs
    started = time.monotonic()
    sup.stop()
    assert wait_for_state(sup, ("stopped",)) == "stopped"
    assert sup.exit_code == 0 and time.monotonic() - started < 5.0
    assert "stdin ended" in "".join(supervisor.tail_lines(str(log)))


def test_a_bridge_deaf_to_every_stop_request_is_killed_after_the_grace_time(tmp_path, no_console):
    sup, process = stubborn_bridge(tmp_path, stop_grace=0.3)
    sup.stop()
    assert wait_for_state(sup, ("stopped",)) == "stopped"
    assert process.poll() is not None and sup.exit_code != 0


def test_restart_while_running_returns_at_once_and_poll_starts_the_new_bridge(tmp_path):
    """Start pulsed while a bridge runs (TouchDesigner's main thread): nothing waits; poll(), each
    frame, kills the old one after the grace time and then starts the new one."""
    sup, old = stubborn_bridge(tmp_path, stop_grace=0.5)
    log = tmp_path / "log"
    started = time.monotonic()
    sup.restart(command=script("import time; print('second', flush=True); time.sleep(60)"))
    assert time.monotonic() - started < 0.2
    assert sup.state == "stopping" and sup.start_when_stopped and sup.starts == 1
    assert wait_for_state(sup, ("running",)) == "running"
    assert sup.starts == 2 and old.poll() is not None and sup.pid != old.pid
    wait_for_line(log, "second")
    sup.stop()
    assert wait_for_state(sup, ("stopped",)) == "stopped" and not sup.start_when_stopped


def test_stop_while_stopping_cancels_the_pending_start(tmp_path):
    """Start then Stop pulsed before the old bridge has gone: once it has, nothing starts."""
    sup, old = stubborn_bridge(tmp_path, stop_grace=0.3)
    new = tmp_path / "new-started"
    sup.restart(command=script(f"open({str(new)!r}, 'w').close(); import time; time.sleep(60)"))
    assert sup.state == "stopping" and sup.start_when_stopped
    sup.stop()  # before any poll() could start the new command
    assert wait_for_state(sup, ("stopped",)) == "stopped" and old.poll() is not None
    for _ in range(5):  # later frames start nothing either
        assert sup.poll() == "stopped"
    assert sup.starts == 1 and not sup.start_when_stopped and sup.pid is None and not new.exists()


def test_close_kills_at_once_without_waiting(tmp_path):
    """onDestroyTD (extension re-init, quitting): no poll() follows, and the main thread must not
    stall for the grace time."""
    sup, process = stubborn_bridge(tmp_path, stop_grace=5.0)
    started = time.monotonic()
    sup.close()
    assert time.monotonic() - started < 1.0
    assert process.wait(5) is not None and process.stdin.closed and sup.state == "stopped"


def test_close_closes_the_stdin_of_a_bridge_that_exited_on_its_own(tmp_path):
    sup = supervisor.Supervisor(command=script("pass"), log_path=str(tmp_path / "log"))
    sup.start()
    process = sup._process
    process.wait(10)  # gone, and no poll() has noticed yet
    sup.close()
    assert process.stdin.closed and sup.state == "stopped" and sup.pid is None


def test_missing_program_is_a_message(tmp_path):
    sup = supervisor.Supervisor(command=[str(tmp_path / "no-such-sdbridge"), "run"], log_path=str(tmp_path / "log"))
    sup.start()
    assert sup.state == "failed" and "cannot start" in sup.message


# ------------------------------------------------------------------ setup script, recorded


class Recorder:
    """Records the documented TouchDesigner calls setup_comp makes (COMP.create, appendCustomPage,
    Page.append*, Par members, connectors); unknown attributes are refused."""

    PAR_MEMBERS = {"default", "val", "min", "max", "normMin", "normMax", "clampMin", "clampMax", "help", "readOnly",
                   "menuNames", "menuLabels"}

    class Par:
        def __init__(self, name, values):
            object.__setattr__(self, "name", name)
            object.__setattr__(self, "set", {})
            object.__setattr__(self, "values", values)  # the owner's par collection

        def __setattr__(self, key, value):
            if key not in Recorder.PAR_MEMBERS:
                raise AttributeError(f"Par has no member {key!r}")
            self.set[key] = value
            if key == "val":
                self.values[self.name] = value

        def eval(self):
            return self.set.get("val")

    class Pars:
        # names this TouchDesigner build does not have (AttributeError, as td's ParCollection
        # raises): by default a 2023 build's, which names the extension slots ext0object / ext0promote
        ABSENT = frozenset({"extension1", "promoteextension1"})

        def __init__(self):
            object.__setattr__(self, "values", {})

        def __setattr__(self, key, value):
            if key in self.ABSENT:
                raise AttributeError(f"ParCollection has no parameter {key!r}")
            self.values[key] = value

        def __getattr__(self, key):
            if key in self.ABSENT:
                raise AttributeError(f"ParCollection has no parameter {key!r}")
            holder = type("P", (), {"eval": lambda s: self.values.get(key)})
            return holder()

    class Page:
        def __init__(self, comp, name):
            self.comp, self.name = comp, name

        def _append(self, style, name, label=None):
            if name in self.comp.custom:
                raise AssertionError(f"{name}: appended twice")
            self.comp.par.values[name] = None
            par = Recorder.Par(name, self.comp.par.values)
            self.comp.custom[name] = (self.name, style, par)
            return [par]

        def __getattr__(self, attribute):
            style = attribute[len("append"):]
            if attribute.startswith("append") and style in table.STYLES + ("Folder",):
                return lambda name, label=None: self._append(style, name, label)
            raise AttributeError(attribute)

    class Connector:
        def __init__(self, owner):
            self.owner = owner

        def connect(self, target):
            self.owner.connections.append(target)

    class Op:
        def __init__(self, op_type, name, parent=None):
            self.op_type, self.name, self.children, self.custom = op_type, name, {}, {}
            self.path = (parent.path if parent else "") + "/" + name
            self.par, self.text, self.connections = Recorder.Pars(), "", []
            self.inputConnectors = self.outputConnectors = [Recorder.Connector(self)]
            self.extensions_initialised = False

        def create(self, op_type, name):
            self.children[name] = Recorder.Op(op_type, name, self)
            return self.children[name]

        def op(self, name):
            return self.children.get(name)

        def destroy(self):
            pass

        def appendCustomPage(self, name):
            return Recorder.Page(self, name)

        def initializeExtensions(self):
            self.extensions_initialised = True

        def __setattr__(self, key, value):
            if key in ("nodeX", "nodeY") or key in self.__dict__ or key in (
                    "op_type", "name", "children", "custom", "path", "par", "text", "connections", "inputConnectors",
                    "outputConnectors", "extensions_initialised"):
                object.__setattr__(self, key, value)
            else:
                raise AttributeError(f"OP has no member {key!r}")


def build_recorded(platform="win32"):
    import json
    import setup_comp

    project = Recorder.Op("containerCOMP", "project1")
    types = {op_type: op_type for _, op_type, _, _ in setup_comp.OPERATORS} | {"baseCOMP": "baseCOMP"}
    return setup_comp.build(project, sdbridge="C:/sd/sdbridge.exe", params_json=json.dumps(as_json()), types=types,
                            platform=platform)


def test_setup_builds_the_component_from_the_table():
    comp = build_recorded()
    assert comp.op_type == "baseCOMP" and comp.extensions_initialised
    assert comp.par.values["ext0object"] == "op('./SdbridgeExt').module.SdbridgeExt(me)"
    assert comp.par.values["ext0promote"] is True
    pages = component.component_pages(table.load_table(as_json()), platform="win32")
    for page_name, pars in pages.items():
        for par in pars:
            assert comp.custom[par.name][:2] == (page_name, par.style)
    guidance = comp.custom["Guidancescale"][2].set
    assert (guidance["normMin"], guidance["normMax"], guidance["val"]) == (0.0, 30.0, 1.2)
    assert comp.custom["Promptblendmethod"][2].set["menuNames"] == ["linear", "slerp"]
    assert comp.par.values["Executable"] == "C:/sd/sdbridge.exe"
    assert comp.op("SdbridgeExt").text == (TD_FOLDER / "extension.py").read_text()
    assert comp.op("osc_out").par.values["port"] == DEFAULT_OSC_PORT
    assert comp.op("out1").connections == [comp.op("video_select")]
    assert comp.op("spout_out").par.values["sendername"] == "sdbridge-in"
    assert "onReceiveOSC" in comp.op("status_callbacks").text


def test_setup_on_a_mac_sends_video_through_the_syphon_spout_tops():
    comp = build_recorded(platform="darwin")
    assert comp.par.values["Transport"] == "syphon"
    active = {name: comp.op(name).par.values["active"] for name in ("spout_out", "spout_in", "ndi_out", "ndi_in")}
    assert active == {"spout_out": True, "spout_in": True, "ndi_out": False, "ndi_in": False}
    assert comp.op("video_select").par.values["index"] == 0


def test_setup_uses_the_old_extension_names_on_a_build_without_the_new_ones(monkeypatch):
    monkeypatch.setattr(Recorder.Pars, "ABSENT", frozenset({"ext0object", "ext0promote"}))
    comp = build_recorded()
    assert comp.par.values["extension1"] == "op('./SdbridgeExt').module.SdbridgeExt(me)"
    assert comp.par.values["promoteextension1"] is True and comp.extensions_initialised


def test_an_older_python_is_refused_at_import_with_the_touchdesigner_build_it_needs():
    import sdbridge_td

    with pytest.raises(ImportError, match=r"Python 3\.10 or newer, that is TouchDesigner 2023\.11 or later.*Python 3\.9"):
        sdbridge_td.check_python((3, 9, 13, "final", 0))
    sdbridge_td.check_python((3, 11, 4))
    assert "2023.11" in (TD_FOLDER / "README.md").read_text()


def test_extension_and_setup_are_valid_python():
    import ast

    for name in ("extension.py", "setup_comp.py"):
        ast.parse((TD_FOLDER / name).read_text())


# ------------------------------------------------------------------ the guide


def guide_commands(path):
    """`sdbridge ...` command lines in fenced blocks (continuations joined)."""
    text = path.read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("sdbridge "):
                commands.append(line)
    return commands


def check_guide(path):
    import shlex

    text = path.read_text()
    known = set(addresses())
    for address in set(re.findall(r"(?<![\w/])(/sd/[a-z0-9_/]*[a-z0-9_])", text)):
        if address == "/sd/status":
            continue
        if address.startswith("/sd/status/"):
            assert address[len("/sd/status/"):] in dict(status.FIELDS), address
        elif address.startswith("/sd/"):
            assert address in known, f"{path.name}: {address} is not an address of the parameter table"
    commands = guide_commands(path)
    assert commands, f"{path.name}: no sdbridge commands found"
    parser = build_parser()
    for line in commands:
        argv = shlex.split(line)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{path.name}: `{line}` is not accepted by the CLI")
    for port in re.findall(r"port (\d{4,5})", text):
        assert int(port) in (DEFAULT_OSC_PORT, DEFAULT_OSC_PORT + 1, DEFAULT_OSC_PORT + 2), f"{path.name}: port {port}"


def test_touchdesigner_guide_matches_the_code():
    check_guide(TD_FOLDER / "README.md")


def test_the_guide_shows_the_commands_build_command_produces():
    """Each `sdbridge run` line of the guide, read back into the Bridge page's settings, is exactly
    what build_command makes of them (it always adds --width/--height, --osc-bind, --status-target)."""
    import shlex

    lines = [line for line in guide_commands(TD_FOLDER / "README.md") if line.startswith("sdbridge run ")]
    assert len(lines) >= 3
    for line in lines:
        argv = shlex.split(line)
        args = run_parser().parse_args(argv[1:])
        transport, input_name = args.source.split(":", 1)
        status_host, status_port = args.status_target.rsplit(":", 1)
        options = command.BridgeOptions(
            transport=transport, input_name=input_name, output_name=args.sink[0].split(":", 1)[1],
            model=args.model or "", width=args.width or 0, height=args.height or 0, osc_port=args.osc_port,
            osc_bind=args.osc_bind or "", status_host=status_host, status_port=int(status_port),
            platform={"spout": "win32", "syphon": "darwin"}.get(transport, "linux"))
        assert command.build_command(options) == argv, line
