"""Show-safety, promise 4 (config part): a bad config file is one line naming the field and its
value, exit status 2, no traceback, before anything goes live; a bad preset is refused at start,
and one the engine refuses during a show leaves the old values in place.

Most cases run in-process through `bridge.cli.main` (the same parser, settings and session as the
console script; stderr captured); a few run as real `python -m bridge.cli` subprocesses.
"""

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from bridge import cli
from bridge.control import ControlPlane
from bridge.control.osc import encode_message
from bridge.params import ParameterStore, apply_pending
from test_cli import REPO, child_env

# a config that runs (tiny model, CPU, no fixed port, half a second); each case changes it
GOOD = {
    "source": '"testpattern"', "sink": '"null"', "model": '"random:tiny"', "width": "64", "height": "64",
    "device": '"cpu"', "osc_port": "0", "status": "false", "duration": "0.3",
}


def taken_port(kind=socket.SOCK_DGRAM):
    held = socket.socket(socket.AF_INET, kind)
    held.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        held.listen(1)
    return held


# (id, {key: TOML value or None to remove}, extra TOML text, what the one line must contain)
CASES = [
    # the model
    ("model-missing-file", {"model": '"/nonexistent/show/model.safetensors"'}, "",
     ["model", "/nonexistent/show/model.safetensors"]),
    ("model-missing-folder", {"model": '"./no-such-model-folder/"'}, "", ["model", "no-such-model-folder"]),
    ("model-empty", {"model": '""'}, "", ["model", "''"]),
    ("model-number", {"model": "5"}, "", ["model", "5"]),
    ("model-unknown-random-arch", {"model": '"random:huge"'}, "", ["model", "random:huge"]),
    ("model-not-safetensors", {"model": '"{tmp}/weights.gguf"'}, "", ["model", "weights.gguf"]),
    ("vae-number", {"vae": "3"}, "", ["vae", "3"]),
    ("lcm-lora-list", {"lcm_lora": '["a", "b"]'}, "", ["lcm_lora", "['a', 'b']"]),
    ("allow-pickle-string", {"allow_pickle": '"yes"'}, "", ["allow_pickle", "'yes'"]),
    # a random model is built, not loaded: what would change a loaded one is refused, not ignored
    ("lcm-lora-with-random-model", {"lcm_lora": '"{tmp}/lora.safetensors"'}, "",
     ["lcm_lora", "'random:tiny' is a random-weight model"]),
    ("vae-and-config-with-random-model", {"vae": '"model"', "single_file_config": '"{tmp}"'}, "",
     ["vae, single_file_config", "random-weight model"]),
    ("backend-unknown", {"backend": '"turbo"'}, "", ["backend", "'turbo'", "eager"]),
    # sizes and rates
    ("width-string", {"width": '"big"'}, "", ["width", "'big'"]),
    ("width-not-multiple-of-8", {"width": "100"}, "", ["width", "100"]),
    ("width-negative", {"width": "-64"}, "", ["width", "-64"]),
    ("width-zero", {"width": "0"}, "", ["width", "0"]),
    ("width-huge", {"width": "1048576"}, "", ["width", "1048576"]),
    ("height-float", {"height": "64.5"}, "", ["height", "64.5"]),
    ("height-bool", {"height": "true"}, "", ["height", "True"]),
    ("fps-zero", {"fps": "0"}, "", ["fps", "0"]),
    ("fps-negative", {"fps": "-30"}, "", ["fps", "-30"]),
    ("fps-nan", {"fps": "nan"}, "", ["fps", "nan"]),
    ("fps-inf", {"fps": "inf"}, "", ["fps", "inf"]),
    ("fps-too-high", {"fps": "100000"}, "", ["fps", "100000"]),
    ("fps-string", {"fps": '"fast"'}, "", ["fps", "'fast'"]),
    ("duration-negative", {"duration": "-5"}, "", ["duration", "-5"]),
    ("frames-zero", {"frames": "0"}, "", ["frames", "0"]),
    ("frames-float", {"frames": "1.5"}, "", ["frames", "1.5"]),
    # the engine's settings
    ("steps-zero", {"steps": "0"}, "", ["steps", "0"]),
    ("strength-above-1", {"strength": "2.0"}, "", ["strength", "2.0"]),
    ("t-index-list-decreasing", {"t_index_list": "[45, 32]"}, "", ["t_index_list", "[45, 32]"]),
    ("t-index-list-out-of-schedule", {"t_index_list": "[32, 1000]"}, "", ["t_index_list", "[32, 1000]"]),
    ("t-index-list-words", {"t_index_list": '"early, late"'}, "", ["t_index_list", "'early, late'"]),
    ("t-index-list-and-steps", {"t_index_list": "[20, 40]", "steps": "2"}, "", ["t_index_list", "steps"]),
    ("cfg-unknown", {"cfg": '"most"'}, "", ["cfg", "'most'"]),
    ("guidance-negative", {"guidance": "-1.0"}, "", ["guidance", "-1.0"]),
    ("guidance-string", {"guidance": '"high"'}, "", ["guidance", "'high'"]),
    ("delta-nan", {"delta": "nan"}, "", ["delta", "nan"]),
    ("seed-negative", {"seed": "-1"}, "", ["seed", "-1"]),
    ("similarity-threshold-above-1", {"similarity_threshold": "1.5"}, "", ["similarity_threshold", "1.5"]),
    ("similarity-filter-string", {"similarity_filter": '"yes"'}, "", ["similarity_filter", "'yes'"]),
    ("prompt-number", {"prompt": "5"}, "", ["prompt", "5"]),
    ("device-unknown", {"device": '"tpu"'}, "", ["device", "'tpu'"]),
    ("dtype-unknown", {"dtype": '"float8"'}, "", ["dtype", "float8"]),
    # sources and sinks
    ("source-unknown", {"source": '"printer"'}, "", ["source", "'printer'"]),
    ("source-missing-video", {"source": '"video:/nonexistent/clip.mp4"'}, "", ["/nonexistent/clip.mp4"]),
    ("sink-unknown", {"sink": '"printer"'}, "", ["sink", "'printer'"]),
    ("sink-none", {"sink": "[]"}, "", ["sink", "none given"]),
    ("sink-number", {"sink": "5"}, "", ["sink", "5"]),
    ("sink-list-of-numbers", {"sink": "[1, 2]"}, "", ["sink", "1"]),
    ("fallback-unknown", {"fallback": '"grey"'}, "", ["fallback", "'grey'"]),
    ("sink-file-under-a-file", {"sink": '"file:{tmp}/weights.gguf/out.mp4"'}, "", ["cannot write", "out.mp4"]),
    # OSC
    ("osc-port-out-of-range", {"osc_port": "70000"}, "", ["osc_port", "70000"]),
    ("osc-port-string", {"osc_port": '"7450"'}, "", ["osc_port", "'7450'"]),
    ("osc-port-in-use", {"osc_port": "{udp_port}"}, "", ["osc-port", "{udp_port}"]),
    ("oscquery-port-in-use", {"oscquery_port": "{tcp_port}"}, "", ["oscquery-port", "{tcp_port}"]),
    ("osc-bind-not-an-address", {"osc_bind": '"my laptop"'}, "", ["osc_bind", "'my laptop'"]),
    ("osc-bind-not-this-machine", {"osc_bind": '"192.0.2.77"'}, "", ["osc_bind", "192.0.2.77"]),
    ("osc-allow-bad-address", {"osc_allow": '["10.0.0.300"]'}, "", ["osc_allow", "10.0.0.300"]),
    ("osc-allow-numbers", {"osc_allow": "[1, 2]"}, "", ["osc_allow", "1"]),
    ("osc-prefix-no-slash", {"osc_prefix": '"sd"'}, "", ["osc_prefix", "'sd'"]),
    ("status-target-no-port", {"status_target": '"mixer"'}, "", ["status_target", "mixer"]),
    ("status-target-unknown-host", {"status_target": '"nohost.invalid:9001"'}, "", ["status_target", "nohost.invalid"]),
    ("osc-string-for-bool", {"osc": '"off"'}, "", ["osc", "'off'"]),
    ("zeroconf-without-osc", {"osc": "false", "zeroconf": "true"}, "", ["zeroconf", "--no-osc"]),
    ("status-target-without-osc", {"osc": "false", "status_target": '"127.0.0.1:9001"'}, "",
     ["status_target", "127.0.0.1:9001", "--no-osc"]),
    # the file itself
    ("unknown-key", {"colour": '"red"'}, "", ["colour"]),
    ("unknown-table", {}, "[engine]\nwidth = 64\n", ["engine"]),
    ("bad-toml", {}, "width = = 64\n", ["not valid TOML"]),
    ("duplicate-key", {}, "width = 128\n", ["not valid TOML"]),
    # presets
    ("preset-out-of-range", {}, "[presets.1]\nguidance_scale = 99\n", ["presets.1.guidance_scale", "99"]),
    ("preset-cue-not-a-number", {}, '[presets.first]\nseed = 1\n', ["presets", "'first'"]),
    ("preset-unknown-parameter", {}, "[presets.2]\nwarp = 1\n", ["presets.2.warp"]),
    ("preset-runtime-action", {}, "[presets.2]\npause = true\n", ["presets.2.pause"]),
    ("preset-not-a-table", {"presets": "5"}, "", ["presets", "5"]),
    ("preset-empty", {}, "[presets.4]\n", ["presets.4"]),
    ("preset-prompt-number", {}, "[presets.1]\nprompt = 5\n", ["presets.1.prompt", "5"]),
    ("preset-t-index-list-clamped", {}, "[presets.1]\nt_index_list = [32, 5000]\n", ["presets.1.t_index_list", "5000"]),
    ("preset-t-index-list-out-of-schedule", {}, "[presets.1]\nt_index_list = [32, 60]\n",
     ["presets.1.t_index_list", "[32, 60]"]),
    ("preset-blend-weight", {}, '[presets.1]\nprompt_blend = [["a", 3.0]]\n', ["presets.1.prompt_blend", "3.0"]),
    ("preset-strength-and-t-index-list", {}, "[presets.1]\nstrength = 0.5\nt_index_list = [10, 40]\n",
     ["presets.1", "strength or t_index_list, not both"]),
    ("preset-prompt-and-blend", {}, '[presets.1]\nprompt = "a"\nprompt_blend = [["b", 1.0]]\n',
     ["presets.1", "prompt or prompt_blend, not both"]),
    ("preset-cue-twice", {}, "[presets.1]\nseed = 1\n[presets.01]\nseed = 2\n", ["presets", "'01'", "cue 1 again"]),
    ("preset-size-the-model-refuses", {}, '[presets.3]\nresolution = "72x72"\n',
     ["presets.3.resolution", "72", "multiple of 16"]),
    ("source-testpattern-huge", {"source": '"testpattern?width=100000&height=100000"'}, "", ["width", "100000"]),
    ("preset-method-unknown", {}, '[presets.1]\nprompt_blend_method = "cubic"\n', ["presets.1.prompt_blend_method", "cubic"]),
    # code is never named: values that look like code are only refused values
    ("model-python-expression", {"model": "\"__import__('os').system('touch {tmp}/pwned')\""}, "",
     ["model", "__import__"]),
    ("source-module-path", {"source": '"os.system:touch"'}, "", ["source", "os.system"]),
]
assert len(CASES) >= 50


def write_config(path, overrides, extra, substitutions):
    values = dict(GOOD)
    values.update(overrides)
    lines = [f"{key} = {value}" for key, value in values.items() if value is not None]
    text = "\n".join(lines) + "\n" + extra
    for key, value in substitutions.items():
        text = text.replace("{" + key + "}", str(value))
    path.write_text(text)


@pytest.fixture
def ports():
    udp, tcp = taken_port(), taken_port(socket.SOCK_STREAM)
    yield {"udp_port": udp.getsockname()[1], "tcp_port": tcp.getsockname()[1]}
    udp.close()
    tcp.close()


@pytest.mark.parametrize("case, overrides, extra, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_naming_field_and_value(case, overrides, extra, expected, tmp_path, ports, capsys):
    substitutions = {"tmp": tmp_path, **ports}
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    config = tmp_path / "show.toml"
    write_config(config, overrides, extra, substitutions)
    started = time.monotonic()
    status = cli.main(["-q", "run", "--config", str(config)])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sdbridge run: error: ") and "Traceback" not in err
    for part in expected:
        part = part.format(**substitutions) if "{" in part else part
        assert part in lines[0], (part, lines[0])
    assert time.monotonic() - started < 30
    assert not (tmp_path / "pwned").exists()


def test_random_architectures_agree_with_the_engine():
    from pipeline import ARCHS

    from bridge.settings import RANDOM_ARCHS

    assert RANDOM_ARCHS == ARCHS


def test_backend_names_agree_with_the_engine():
    from pipeline.backends import BACKENDS, PLANNED

    from bridge.settings import ENGINE_BACKENDS, PLANNED_BACKENDS

    assert set(ENGINE_BACKENDS) == set(BACKENDS) and set(PLANNED_BACKENDS) == set(PLANNED)


def test_cuda_graph_modes_agree_with_the_engine_and_a_wrong_one_is_one_line(tmp_path, capsys):
    from pipeline.backends.compiled import CUDA_GRAPH_MODES as ENGINE_MODES

    from bridge.settings import CUDA_GRAPH_MODES

    assert CUDA_GRAPH_MODES == ENGINE_MODES
    config = tmp_path / "show.toml"
    config.write_text('sink = "null"\nbackend = "compiled"\ncuda_graphs = "sometimes"\n')
    assert cli.main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cuda_graphs: 'sometimes' must be one of step, modules, off" in err, err
    config.write_text('sink = "null"\ncuda_graphs = "modules"\n')  # the default backend: eager
    assert cli.main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cuda_graphs: 'modules' needs backend 'compiled'" in err, err


def test_the_cuda_graph_option_reaches_eager_and_compiled_and_a_fallback_gets_what_it_takes():
    from bridge.engine import _options
    from bridge.settings import RunSettings

    assert _options(RunSettings(sink=("null",)), "eager") is None  # each backend's own default
    assert _options(RunSettings(sink=("null",), cuda_graphs="step"), "eager") == {"cuda_graphs": "step"}
    assert _options(RunSettings(sink=("null",), backend="compiled", cuda_graphs="modules"), "compiled") == {"cuda_graphs": "modules"}
    assert _options(RunSettings(sink=("null",), backend="compiled", cuda_graphs="modules"), "eager") is None


def test_missing_config_file_and_a_folder_as_config(tmp_path, capsys):
    assert cli.main(["run", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "config: file not found" in capsys.readouterr().err
    assert cli.main(["run", "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "config:" in err and str(tmp_path) in err


def test_binary_config_file(tmp_path, capsys):
    config = tmp_path / "show.toml"
    config.write_bytes(b"\xff\xfe\x00width = 64\n")
    assert cli.main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not valid TOML" in err


@pytest.mark.parametrize("case", ["model-missing-file", "osc-port-in-use", "preset-out-of-range", "bad-toml"])
def test_bad_config_as_a_user_runs_it(case, tmp_path, ports):
    """The console script itself: exit status 2, one line on stderr, nothing on stdout, no model built."""
    _, overrides, extra, expected = next(c for c in CASES if c[0] == case)
    substitutions = {"tmp": tmp_path, **ports}
    config = tmp_path / "show.toml"
    write_config(config, overrides, extra, substitutions)
    result = subprocess.run([sys.executable, "-m", "bridge.cli", "run", "--config", str(config)], cwd=REPO,
                            env=child_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(part.format(**substitutions) in errors[0] for part in expected), errors[0]
    assert result.stdout == ""
    if case != "model-missing-file":
        assert "building random-weight" not in result.stderr


# ----------------------------------------------------------------------------- presets at show time


@pytest.fixture(scope="module")
def engine():
    from pipeline import StreamConfig, StreamDiffusion, random_components

    config = StreamConfig(width=64, height=64, device="cpu", t_index_list=(32, 45), guidance_scale=1.2)
    return StreamDiffusion(random_components("tiny", device="cpu", seed=0), config)


def test_preset_the_engine_refuses_is_refused_and_old_values_kept(engine):
    """A preset the start-up check could not see (the router is handed it directly) reaches the
    store over real UDP; the engine refuses its value between frames: the old one stays, the
    refusal is reported, and the next good preset still applies."""
    store = ParameterStore()
    presets = {1: {"resolution": (72, 72)}, 2: {"guidance_scale": 1.7}}  # in range, but the model takes 16s
    with ControlPlane(store=store, settings=_settings(), presets=presets) as plane, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        before = engine.config
        sender.sendto(encode_message("/sd/preset", 1), ("127.0.0.1", plane.osc_port))
        _wait_for(lambda: plane.counters["applied"] == 1)
        apply_pending(store, engine)
        assert (engine.config.width, engine.config.height) == (before.width, before.height) == (64, 64)
        assert "resolution" in store.rejected and "multiple of 16" in store.rejected["resolution"][1]
        assert "resolution" not in store.applied
        frame = engine(np.zeros((64, 64, 3), np.uint8))  # the engine still runs
        assert frame.shape == (64, 64, 3)
        sender.sendto(encode_message("/sd/preset", 2), ("127.0.0.1", plane.osc_port))
        _wait_for(lambda: plane.counters["applied"] == 2)
        apply_pending(store, engine)
        assert engine.config.guidance_scale == pytest.approx(1.7) and engine.config.t_index_list == (32, 45)
        assert plane.counters["applied"] == 2


def test_preset_with_an_unknown_cue_is_refused_and_counted(engine):
    store = ParameterStore()
    with ControlPlane(store=store, settings=_settings(), presets={1: {"seed": 4}}) as plane, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(encode_message("/sd/preset", 9), ("127.0.0.1", plane.osc_port))
        _wait_for(lambda: plane.counters["rejected"] == 1)
        assert plane.counters["rejected"] == 1 and store.take() == {}
        assert "no preset 9" in plane.router.last_error


def _settings():
    from bridge.control import ControlSettings

    return ControlSettings(osc_port=0, oscquery=False)


def _wait_for(check, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "the packet never reached the router"
        time.sleep(0.01)
