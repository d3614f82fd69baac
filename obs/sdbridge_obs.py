"""sdbridge for OBS: sliders and text boxes for the live effect, sent over OSC on every change.

Load it in OBS: Tools > Scripts > + > this file (OBS's own Python; standard library only).
The properties are generated from the bridge's parameter table (`sdbridge params --json`, run
with the program set in "sdbridge program", on a thread: OBS's UI never waits for it); press
"Reload parameters" after changing it. Sliders, toggles and menus are sent as they move; text
boxes (prompts, t_index_list, resolution) once their text has stayed the same for a second, as
OBS reports every keystroke. It can start and stop `sdbridge run`, re-sends every value when the
bridge (re)starts (it listens for the bridge's /sd/status messages), and recalls a preset when
the scene changes ("Scene presets": one `Scene name = preset number` per line).

Threads: OBS calls script_update and button callbacks on its UI thread and timers on its
graphics thread, so the timer reads shared state into locals before using it.
"""

import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import obspython as obs

STATUS_POLL_MS = 250
PREFIX_KEY = "p_"  # settings key of a table parameter: p_<name>
# Text boxes: OBS calls script_update on every keystroke, so typing 1280x720 would send 1280x7 and
# 1280x72 (size changes the bridge restarts or compiles for) and re-encode a prompt per letter.
# Their values are sent once unchanged this long (the timer checks); sliders and the rest at once.
TYPED_KINDS = ("string", "prompt_blend", "seed_blend", "int_list", "size")
DEBOUNCE_SECONDS = 1.0
STOP_FLAG = "--stop-on-stdin-eof"  # `sdbridge run`: the end of its stdin stops it as SIGTERM does
STOP_GRACE_SECONDS = 5.0  # after asking the bridge to stop: then it is killed
PARAMS_TIMEOUT_SECONDS = 60
RELOAD_WAIT_SECONDS = 0.5  # the Reload button waits this long for `params --json` (usually 0.2 s)


def _now():
    return time.monotonic()


def _creation_flags(*names):
    """The Windows process-creation flags of these names (CREATE_NO_WINDOW: no console window
    flashes up); 0 elsewhere, where Popen refuses any."""
    flags = 0
    if sys.platform.startswith("win"):
        for name in names:
            flags |= getattr(subprocess, name, 0)
    return flags


# ------------------------------------------------------------------ OSC, hand-written (1.0)


def _pad(data):
    return data + b"\x00" * (4 - len(data) % 4)


def _osc_string(text):
    return _pad(text.encode("utf-8"))  # at least one NUL, to a multiple of 4


def encode_message(address, args):
    """One OSC message; bool -> T/F, int -> i, float -> f, str -> s, bytes -> b."""
    tags, payload = ",", b""
    for arg in args:
        if isinstance(arg, bool):
            tags += "T" if arg else "F"
        elif isinstance(arg, int):
            tags += "i"
            payload += struct.pack(">i", arg)
        elif isinstance(arg, float):
            tags += "f"
            payload += struct.pack(">f", arg)
        elif isinstance(arg, str):
            tags += "s"
            payload += _osc_string(arg)
        elif isinstance(arg, (bytes, bytearray)):
            tags += "b"
            payload += struct.pack(">i", len(arg)) + bytes(arg) + b"\x00" * (-len(arg) % 4)
        else:
            raise ValueError("%s: cannot send a %s over OSC" % (address, type(arg).__name__))
    return _osc_string(address) + _osc_string(tags) + payload


def _read_string(data, offset):
    end = data.index(b"\x00", offset)
    return data[offset:end].decode("utf-8", "replace"), (end + 4) & ~3


def decode_message(data):
    """(address, [args]) of a plain message with i f s T F arguments; ValueError otherwise."""
    try:
        address, offset = _read_string(data, 0)
        tags, offset = _read_string(data, offset)
        if not address.startswith("/") or not tags.startswith(","):
            raise ValueError("not an OSC message")
        args = []
        for tag in tags[1:]:
            if tag == "i":
                args.append(struct.unpack_from(">i", data, offset)[0])
                offset += 4
            elif tag == "f":
                args.append(struct.unpack_from(">f", data, offset)[0])
                offset += 4
            elif tag == "s":
                text, offset = _read_string(data, offset)
                args.append(text)
            elif tag in "TF":
                args.append(tag == "T")
            else:
                raise ValueError("type %r not read here" % tag)
        return address, args
    except (struct.error, IndexError) as exc:
        raise ValueError("truncated OSC message: %s" % exc) from None


# ------------------------------------------------------------------ the table and messages


def load_table(executable):
    """The parsed JSON of `<executable> params --json`; ValueError with the reason. Blocks: called
    on TableLoad's thread."""
    try:
        done = subprocess.run([executable, "params", "--json"], capture_output=True, text=True,
                              timeout=PARAMS_TIMEOUT_SECONDS, creationflags=_creation_flags("CREATE_NO_WINDOW"))
    except OSError as exc:
        raise ValueError("cannot run %r: %s" % (executable, exc.strerror or exc)) from None
    except subprocess.TimeoutExpired:
        raise ValueError("%s params --json took over %d s" % (executable, PARAMS_TIMEOUT_SECONDS)) from None
    if done.returncode != 0:
        raise ValueError("%s params --json failed: %s" % (executable, (done.stderr or done.stdout).strip()[:200]))
    try:
        table = json.loads(done.stdout)
        table["osc"]["port"], table["osc"]["prefix"], table["parameters"][0]["name"]  # all the timer reads
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError("%s params --json printed no parameter table" % executable) from None
    return table


def value_arguments(row, value):
    """OSC arguments for a table row holding `value` (a setting's value); None: send nothing."""
    kind = row["kind"]
    if kind in ("string", "choice"):
        return [str(value)]
    if kind == "float":
        return [float(value)]
    if kind in ("int", "cue"):
        return [int(value)]
    if kind == "bool":
        return [bool(value)]
    if kind == "trigger":
        return []
    if kind == "int_list":
        items = str(value).replace(",", " ").split()
        if not items:
            return None
        try:
            return [int(item) for item in items]
        except ValueError:
            raise ValueError("%s: %r must be whole numbers, e.g. 32,45" % (row["name"], value)) from None
    if kind == "size":
        items = str(value).lower().replace("x", " ").replace(",", " ").split()
        if not items:
            return None
        try:
            numbers = [int(item) for item in items]
        except ValueError:
            numbers = []
        if len(numbers) != 2:
            raise ValueError("%s: %r must be a width and a height, e.g. 768x432" % (row["name"], value))
        return numbers
    if kind == "prompt_blend":
        arguments = []
        for part in [p.strip() for p in str(value).split("|") if p.strip()]:
            prompt, _, weight = part.rpartition(":")
            try:
                arguments += [prompt.strip(), float(weight)]
            except ValueError:
                raise ValueError("%s: %r must be 'prompt:weight'" % (row["name"], part)) from None
        return arguments or None
    if kind == "seed_blend":
        arguments = []
        for part in [p.strip() for p in str(value).split("|") if p.strip()]:
            seed, separator, weight = part.partition(":")
            try:
                if not separator:
                    raise ValueError
                arguments += [int(seed), float(weight)]
            except ValueError:
                raise ValueError("%s: %r must be 'seed:weight', e.g. 2:0.7" % (row["name"], part)) from None
        return arguments or None
    raise ValueError("%s: kind %r is not known to this script; update it" % (row["name"], kind))


def parse_scene_presets(text):
    """'Intro = 1' lines -> {'Intro': 1}; ValueError naming the bad line."""
    presets = {}
    for number, line in enumerate(str(text).splitlines(), 1):
        if not line.strip() or line.strip().startswith("#"):
            continue
        scene, separator, preset = line.rpartition("=")
        try:
            presets[scene.strip()] = int(preset)
        except ValueError:
            raise ValueError("scene presets line %d: %r must be 'Scene name = number'" % (number, line)) from None
        if not separator or not scene.strip():
            raise ValueError("scene presets line %d: %r must be 'Scene name = number'" % (number, line))
    return presets


# ------------------------------------------------------------------ state


class TableLoad:
    """`<executable> params --json` on a daemon thread: a slow launch (a cold disk, a virus
    scanner) must not freeze OBS's UI. `result`: (table, error) once done() is True."""

    def __init__(self, executable):
        self.executable = executable
        self.result = (None, "%s params --json stopped without an answer" % executable)
        self.applied = False  # set (under State.lock) by the one _apply_loaded_table that applies it
        self._thread = threading.Thread(target=self._run, name="sdbridge params --json", daemon=True)
        self._thread.start()

    def _run(self):
        try:
            self.result = (load_table(self.executable), "")
        except ValueError as exc:
            self.result = (None, str(exc))

    def done(self, wait=0.0):
        """Whether it has finished, after waiting at most `wait` seconds."""
        self._thread.join(wait)
        return not self._thread.is_alive()


class State:
    def __init__(self):
        self.settings = None
        self.table = None
        self.table_error = ""
        self.loading = None  # the TableLoad running, until its table is applied
        self.sent = {}  # parameter name -> last value sent (or seen at load)
        self.pending = {}  # typed parameter name -> (value, when typed): sent once unchanged DEBOUNCE_SECONDS
        # pending (written on the UI thread, taken by the timer) and applying a table (obs_data_t
        # defaults and the status socket), which the Reload button and the timer may both try
        self.lock = threading.Lock()
        self.socket = None
        self.status_socket = None
        self.status_port = None
        self.process = None
        self.log_path = os.path.join(tempfile.gettempdir(), "sdbridge-obs.log")
        self.alive = False


state = State()


def _log(level, text):
    obs.script_log(level, "[sdbridge] " + text)


def _rows():
    return state.table["parameters"] if state.table else []


def _stored_rows():
    return [row for row in _rows() if row["kind"] not in ("trigger", "cue")]


def _setting(row, settings=None):
    settings = settings if settings is not None else state.settings
    key, kind = PREFIX_KEY + row["name"], row["kind"]
    if kind in ("float",):
        return obs.obs_data_get_double(settings, key)
    if kind in ("int", "cue"):
        return obs.obs_data_get_int(settings, key)
    if kind == "bool":
        return obs.obs_data_get_bool(settings, key)
    return obs.obs_data_get_string(settings, key)


def _target():
    host = obs.obs_data_get_string(state.settings, "host") or "127.0.0.1"
    return host, obs.obs_data_get_int(state.settings, "osc_port")


def send(address, args):
    if state.socket is None:
        state.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        state.socket.sendto(encode_message(address, args), _target())
    except (OSError, ValueError) as exc:
        _log(obs.LOG_WARNING, "OSC to %s:%s failed: %s" % (_target() + (exc,)))


def send_row(row, value):
    try:
        arguments = value_arguments(row, value)
    except ValueError as exc:
        _log(obs.LOG_WARNING, str(exc))
        return
    if arguments is not None:
        send(row["address"], arguments)


def send_all():
    """Every stored parameter that has a value worth restoring (not actions, not empty texts)."""
    for row in _stored_rows():
        value = _setting(row)
        if row["kind"] in TYPED_KINDS and not str(value).strip():
            continue
        if row["kind"] not in ("string", "prompt_blend", "seed_blend") and row.get("default") is None:
            continue  # e.g. strength: sent when moved, never forced over the configured steps
        send_row(row, value)


def _reload_table():
    """Start loading the table (the timer or the Reload button applies it); a load of the same
    program keeps running. The TableLoad."""
    executable = obs.obs_data_get_string(state.settings, "executable") or "sdbridge"
    loading = state.loading
    if loading is None or loading.executable != executable:
        loading = state.loading = TableLoad(executable)
    return loading


def _apply_loaded_table():
    """Timer (graphics thread) and the Reload button (UI thread): a finished load's table, its
    defaults and a baseline of the current values (applying a table sends nothing). Under
    state.lock, and once per TableLoad: whichever comes second finds it applied. True when this
    call applied one."""
    with state.lock:
        loading = state.loading
        if loading is None or loading.applied or not loading.done():
            return False
        loading.applied = True
        if state.loading is loading:  # not a newer load the Reload button started meanwhile
            state.loading = None
        state.table, state.table_error = loading.result
        if state.table_error:
            _log(obs.LOG_WARNING, state.table_error)
        if state.settings is not None:
            _set_table_defaults(state.settings)
            state.sent = {row["name"]: _setting(row) for row in _stored_rows()}
            _open_status_socket()  # its default port comes with the table
        state.pending = {}
    return True


def _note_typed(name, value, now):
    """A text box's value: sent by the timer once unchanged for DEBOUNCE_SECONDS; typed back to
    what was last sent, nothing is."""
    with state.lock:
        if value == state.sent.get(name):
            state.pending.pop(name, None)
        elif name not in state.pending or state.pending[name][0] != value:
            state.pending[name] = (value, now)


def _send_settled(now):
    """Timer: send each typed value that has stayed unchanged for DEBOUNCE_SECONDS."""
    with state.lock:
        settled = [(name, value) for name, (value, typed) in state.pending.items() if now - typed >= DEBOUNCE_SECONDS]
        for name, _ in settled:
            del state.pending[name]
    rows = {row["name"]: row for row in _stored_rows()}
    for name, value in settled:
        if name in rows:
            send_row(rows[name], value)
            state.sent[name] = value


# ------------------------------------------------------------------ the bridge process


def bridge_command(settings):
    """argv of `sdbridge run` for the script's settings (stopped by closing its stdin: STOP_FLAG)."""
    argv = [obs.obs_data_get_string(settings, "executable") or "sdbridge", "run", STOP_FLAG,
            "--osc-port", str(obs.obs_data_get_int(settings, "osc_port")),
            "--status-target", "127.0.0.1:%d" % obs.obs_data_get_int(settings, "status_port")]
    for key, flag in (("source", "--source"), ("model", "--model"), ("config", "--config")):
        value = obs.obs_data_get_string(settings, key).strip()
        if value:
            argv += [flag, value]
    for sink in obs.obs_data_get_string(settings, "sinks").split(","):
        if sink.strip():
            argv += ["--sink", sink.strip()]
    return argv + shlex.split(obs.obs_data_get_string(settings, "extra"))


def start_bridge(*_):
    process = state.process
    if process is not None and process.poll() is None:
        _log(obs.LOG_INFO, "the bridge is already running (pid %d)" % process.pid)
        return False
    argv = bridge_command(state.settings)
    with state.lock:  # not at the same time as the timer applying a table
        _open_status_socket()
    try:
        with open(state.log_path, "ab") as log:
            # stdin: a pipe only stop_bridge closes, the stop request (STOP_FLAG); own process
            # group: a CTRL_BREAK_EVENT reaches the bridge only
            state.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                             creationflags=_creation_flags("CREATE_NEW_PROCESS_GROUP",
                                                                           "CREATE_NO_WINDOW"))
    except OSError as exc:
        _log(obs.LOG_WARNING, "cannot start %r: %s" % (argv[0], exc.strerror or exc))
        return False
    state.alive = False
    _log(obs.LOG_INFO, "started: %s (log: %s)" % (" ".join(argv), state.log_path))
    return False


def stop_bridge(*_):
    """Ask the bridge to stop, wait up to STOP_GRACE_SECONDS, then kill it: whatever fails on the
    way, no bridge is left running with the GPU, the camera and the OSC port."""
    process, state.process = state.process, None
    if process is None:
        return False
    if process.poll() is None:
        _ask_to_stop(process)
        try:
            process.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            _log(obs.LOG_WARNING, "the bridge did not stop within %g s: killing it" % STOP_GRACE_SECONDS)
            process.kill()
            try:
                process.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:  # stuck in a driver call: it goes when that returns
                _log(obs.LOG_WARNING, "the bridge (pid %d) has not gone yet after the kill" % process.pid)
    _close_stdin(process)
    _log(obs.LOG_INFO, "stopped the bridge (status %s)" % process.returncode)
    return False


def _ask_to_stop(process):
    """Close its stdin (the bridge runs with STOP_FLAG: works from OBS on every OS), then send
    SIGTERM / CTRL_BREAK_EVENT as well where that works."""
    _close_stdin(process)
    try:
        if sys.platform.startswith("win"):
            process.send_signal(signal.CTRL_BREAK_EVENT)
        else:
            process.terminate()
    except OSError:
        pass  # OBS has no console on Windows, so CTRL_BREAK cannot be sent: the closed stdin asks


def _close_stdin(process):
    if process.stdin is not None:
        try:
            process.stdin.close()
        except OSError:
            pass  # the bridge already gone


def _open_status_socket():
    port = obs.obs_data_get_int(state.settings, "status_port")
    if state.status_socket is not None and state.status_port == port:
        return
    _close_status_socket()
    if port <= 0:  # no port yet (the table, which has its default, is still loading)
        return
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        listener.bind(("127.0.0.1", port))
    except OSError as exc:
        listener.close()
        _log(obs.LOG_WARNING, "cannot listen for status on port %d: %s" % (port, exc.strerror or exc))
        return
    listener.setblocking(False)
    state.status_socket, state.status_port = listener, port


def _close_status_socket():
    if state.status_socket is not None:
        state.status_socket.close()
    state.status_socket = state.status_port = None


def tick():
    """Timer, every STATUS_POLL_MS: a finished table load, typed values that have settled, the
    bridge's status."""
    _apply_loaded_table()
    _send_settled(_now())
    poll_status()


def poll_status():
    """Read /sd/status messages; the first 'alive' after a start re-sends every value."""
    table = state.table  # a local: Reload (on the UI thread) may replace it meanwhile
    prefix = table["osc"]["prefix"] if table else "/sd"
    for _ in range(256):  # bounded: at most this many datagrams per tick
        if state.status_socket is None:
            return
        try:
            data = state.status_socket.recv(65535)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break
        try:
            address, args = decode_message(data)
        except ValueError:
            continue
        if address == prefix + "/status/alive" and not state.alive:
            state.alive = True
            _log(obs.LOG_INFO, "the bridge is up: sending every parameter")
            send_all()
        elif address == prefix + "/status/error" and args:
            _log(obs.LOG_WARNING, "bridge: %s" % args[0])
    process = state.process  # a local: stop_bridge (on the UI thread) may set it to None meanwhile
    if process is not None and process.poll() is not None:
        _log(obs.LOG_WARNING, "the bridge exited with status %s; see %s" % (process.returncode, state.log_path))
        _close_stdin(process)
        if state.process is process:
            state.process, state.alive = None, False


# ------------------------------------------------------------------ scene changes


def on_event(event):
    if event != obs.OBS_FRONTEND_EVENT_SCENE_CHANGED or state.settings is None:
        return
    scene = obs.obs_frontend_get_current_scene()
    if scene is None:
        return
    name = obs.obs_source_get_name(scene)
    obs.obs_source_release(scene)
    try:
        presets = parse_scene_presets(obs.obs_data_get_string(state.settings, "scene_presets"))
    except ValueError as exc:
        _log(obs.LOG_WARNING, str(exc))
        return
    row = next((row for row in _rows() if row["kind"] == "cue"), None)
    if name in presets and row is not None:
        send(row["address"], [presets[name]])


# ------------------------------------------------------------------ OBS script functions


def script_description():
    return ("<b>sdbridge</b>: controls the live StreamDiffusion effect over OSC, starts and stops the "
            "bridge, recalls presets on scene changes. See obs/README.md.")


def script_defaults(settings):
    obs.obs_data_set_default_string(settings, "executable", "sdbridge")
    obs.obs_data_set_default_string(settings, "host", "127.0.0.1")
    obs.obs_data_set_default_string(settings, "source", "camera:0")
    obs.obs_data_set_default_string(settings, "sinks", "virtualcam")
    state.settings = state.settings or settings
    if state.table is None and state.loading is None and not state.table_error:
        _reload_table()  # on a thread: the timer sets the table's defaults when it is there
    with state.lock:  # the timer may be applying a table to the same obs_data_t
        _set_table_defaults(settings)


def _set_table_defaults(settings):
    """The defaults that come from the table: the OSC port, the status port and each parameter's."""
    port = state.table["osc"]["port"] if state.table else 0
    obs.obs_data_set_default_int(settings, "osc_port", port)
    obs.obs_data_set_default_int(settings, "status_port", port + 2 if port else 0)
    for row in _stored_rows() + [row for row in _rows() if row["kind"] == "cue"]:
        key, default = PREFIX_KEY + row["name"], row.get("default")
        if row["kind"] == "float":
            obs.obs_data_set_default_double(settings, key, default if default is not None else row["max"])
        elif row["kind"] in ("int", "cue"):
            obs.obs_data_set_default_int(settings, key, default if default is not None else int(row["min"] or 0))
        elif row["kind"] == "bool":
            obs.obs_data_set_default_bool(settings, key, bool(default))
        elif isinstance(default, list):
            obs.obs_data_set_default_string(settings, key, ",".join(str(v) for v in default))
        else:
            obs.obs_data_set_default_string(settings, key, default or "")


def script_properties():
    props = obs.obs_properties_create()
    obs.obs_properties_add_text(props, "executable", "sdbridge program", obs.OBS_TEXT_DEFAULT)
    obs.obs_properties_add_button(props, "reload", "Reload parameters", _reload_clicked)
    loading = state.loading
    if loading is not None:
        obs.obs_properties_add_text(props, "table_loading", "Loading the parameters (%s params --json); press "
                                    "Reload parameters to show them" % loading.executable, obs.OBS_TEXT_INFO)
    if state.table_error:
        obs.obs_properties_add_text(props, "table_error", "Problem: " + state.table_error, obs.OBS_TEXT_INFO)
    obs.obs_properties_add_text(props, "host", "Bridge host", obs.OBS_TEXT_DEFAULT)
    obs.obs_properties_add_int(props, "osc_port", "OSC port", 1, 65535, 1)
    obs.obs_properties_add_int(props, "status_port", "Status port", 1, 65535, 1)
    obs.obs_properties_add_text(props, "source", "Bridge source (--source)", obs.OBS_TEXT_DEFAULT)
    obs.obs_properties_add_text(props, "sinks", "Bridge sinks (--sink, comma-separated)", obs.OBS_TEXT_DEFAULT)
    obs.obs_properties_add_text(props, "model", "Model (--model)", obs.OBS_TEXT_DEFAULT)
    obs.obs_properties_add_text(props, "config", "Config file (--config)", obs.OBS_TEXT_DEFAULT)
    obs.obs_properties_add_text(props, "extra", "Extra flags", obs.OBS_TEXT_DEFAULT)
    obs.obs_properties_add_button(props, "start", "Start bridge", start_bridge)
    obs.obs_properties_add_button(props, "stop", "Stop bridge", stop_bridge)
    obs.obs_properties_add_button(props, "send_all", "Send all parameters", _send_all_clicked)
    for row in _rows():
        _add_property(props, row)
    obs.obs_properties_add_text(props, "scene_presets", "Scene presets (Scene name = number)", obs.OBS_TEXT_MULTILINE)
    return props


def _add_property(props, row):
    key, label, kind = PREFIX_KEY + row["name"], row["name"].replace("_", " ").capitalize(), row["kind"]
    if kind == "float":
        prop = obs.obs_properties_add_float_slider(props, key, label, row["min"], row["max"],
                                                   (row["max"] - row["min"]) / 1000.0)
    elif kind in ("int", "cue"):
        prop = obs.obs_properties_add_int(props, key, label, int(row["min"]), int(min(row["max"], 2**31 - 1)), 1)
        if kind == "cue":
            obs.obs_properties_add_button(props, key + "_recall", "Recall " + label.lower(), _recall_callback(row))
    elif kind == "bool":
        prop = obs.obs_properties_add_bool(props, key, label)
    elif kind == "choice":
        prop = obs.obs_properties_add_list(props, key, label, obs.OBS_COMBO_TYPE_LIST, obs.OBS_COMBO_FORMAT_STRING)
        for choice in row["choices"]:
            obs.obs_property_list_add_string(prop, choice, choice)
    elif kind == "trigger":
        prop = obs.obs_properties_add_button(props, key, label, _trigger_callback(row))
    else:  # string, int_list, size, prompt_blend, seed_blend
        text_type = obs.OBS_TEXT_MULTILINE if row["name"] in ("prompt", "negative_prompt") else obs.OBS_TEXT_DEFAULT
        prop = obs.obs_properties_add_text(props, key, label, text_type)
    obs.obs_property_set_long_description(prop, "%s (%s)" % (row.get("description", ""), row["address"]))


def _trigger_callback(row):
    def clicked(props, prop):
        send(row["address"], value_arguments(row, None))
        return False
    return clicked


def _recall_callback(row):
    def clicked(props, prop):
        send(row["address"], [obs.obs_data_get_int(state.settings, PREFIX_KEY + row["name"])])
        return False
    return clicked


def _reload_clicked(props, prop):
    loading = _reload_table()
    # A script cannot refresh its properties from the timer, so wait a moment here: a healthy
    # `params --json` answers well within it and the new parameters show at once; a slow one
    # is applied by the timer later (the properties say so; pressing again shows them). The
    # wait is outside state.lock, so the timer is never held up by it
    if loading.done(RELOAD_WAIT_SECONDS):
        _apply_loaded_table()  # does nothing when the timer has applied it meanwhile
    return True  # rebuild the properties view


def _send_all_clicked(props, prop):
    send_all()
    return False


def script_update(settings):
    """Called by OBS when a property changes (a text box: on every keystroke): send each parameter
    whose value changed; a typed one once it has settled (TYPED_KINDS, sent by the timer)."""
    first = state.settings is None or not state.sent
    state.settings = settings
    now = _now()
    for row in _stored_rows():
        name, value = row["name"], _setting(row, settings)
        if first:
            state.sent[name] = value  # the baseline: what OBS loaded is not sent
        elif row["kind"] in TYPED_KINDS:
            _note_typed(name, value, now)
        elif state.sent.get(name) != value:
            send_row(row, value)
            state.sent[name] = value


def script_load(settings):
    state.settings = settings
    if state.table is None and state.loading is None:
        _reload_table()
    state.sent = {}
    with state.lock:
        state.pending = {}
    obs.obs_frontend_add_event_callback(on_event)
    obs.timer_add(tick, STATUS_POLL_MS)
    with state.lock:  # the timer just added may be applying a table already
        _open_status_socket()


def script_unload():
    obs.timer_remove(tick)
    stop_bridge()
    _close_status_socket()
    if state.socket is not None:
        state.socket.close()
        state.socket = None
