"""`sdbridge run`, `demo` and `devices` as a user types them (subprocesses), with the real engine
and the tiny random-weight model; plus settings merging and one-line errors."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from bridge.errors import UserError
from bridge.settings import RunSettings, merge, read_config_file

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model", "random:tiny", "--width", "64", "--height", "64", "--device", "cpu", "--no-status"]


def child_env():
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="2")


def sdbridge(*args, timeout=120, cwd=None):
    env = child_env()
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env=env)


def error_lines(result):
    return [line for line in result.stderr.splitlines() if "error" in line.lower()]


@pytest.mark.parametrize("args, message", [
    (["run", "--width", "abc"], "invalid int value"),
    (["run", "--fallback", "grey"], "invalid choice"),
    (["run", "--sink", "null", "--model", "random:tiny", "--width", "100", "--device", "cpu"], "width: 100"),
    (["run", "--sink", "printer"], "sink: 'printer' is not a sink"),
    (["run", "--source", "testpattern"], "sink: none given"),
    (["run", "--sink", "spout:sdbridge", "--model", "random:tiny", "--device", "cpu"], "Spout is Windows-only"),
    (["bench", "--fuse-math"], "--fuse-math needs --backend compiled"),
    (["run", "--sink", "null", "--model", "random:tiny", "--device", "cpu", "--fuse-math"],
     "fuse_math: needs backend 'compiled'"),
    (["bench", "--backend", "compiled", "--channels-last"], "--channels-last is for --backend eager"),
    (["bench", "--backend", "tensorrt", "--fuse-qkv"], "--fuse-qkv is for --backend eager or compiled"),
    (["bench", "--fuse-qkv", "--fp8"], "--fuse-qkv and --fp8 cannot be combined"),
    (["bench", "--time-limit", "nan"], "--time-limit: nan must be a number of seconds >= 0"),
    (["bench", "--time-limit", "-1"], "--time-limit: -1.0 must be"),
    (["run", "--sink", "null", "--lora", "style.safetensors:20"], "lora: 'style.safetensors:20': the scale must be"),
    (["run", "--sink", "null", "--model", "random:tiny", "--lora", "style.safetensors"],
     "lora: 'random:tiny' is a random-weight model"),
    (["run", "--sink", "null", "--live-lora", "style.safetensors:-11"],
     "live_lora: 'style.safetensors:-11': the scale must be a number in -10..10"),
    (["run", "--sink", "null", *[arg for n in range(5) for arg in ("--live-lora", f"s{n}.safetensors")]],
     "live_lora: 5 given; at most 4 can be live (/sd/lora/1 .. /sd/lora/4); fuse the others with --lora"),
    (["run", "--sink", "null", "--model", "random:tiny", "--live-lora", "style.safetensors"],
     "live_lora: 'random:tiny' is a random-weight model"),
])
def test_bad_flags_are_one_line_and_exit_2(args, message):
    result = sdbridge(*args)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_bad_config_values_are_one_line_and_exit_2(tmp_path):
    config = tmp_path / "show.toml"
    config.write_text('sink = "null"\nwidth = "big"\n')
    result = sdbridge("run", "--config", str(config))
    assert result.returncode == 2 and "width: 'big' is not a valid int" in result.stderr
    config.write_text('sink = "null"\ncolour = "red"\n')
    result = sdbridge("run", "--config", str(config))
    assert result.returncode == 2 and "unknown setting 'colour'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "show.toml"
    config.write_text('source = "ndi:TD Out"\nsinks = ["virtualcam", "spout:sdbridge"]\nwidth = 512\n'
                      't-index-list = [20, 40]\nprompt = "ink"\n')
    settings = merge(read_config_file(str(config)), {"width": 256, "prompt": None, "sink": ("null",)})
    assert settings.source == "ndi:TD Out" and settings.sink == ("null",)
    assert settings.width == 256 and settings.prompt == "ink" and settings.t_index_list == (20, 40)
    with pytest.raises(ValueError, match="t_index_list"):
        RunSettings(sink=("null",), t_index_list=(20, 40), steps=2)
    # a flag also replaces the file's other view of its setting (before: an error naming both)
    assert merge(read_config_file(str(config)), {"strength": 0.5}).strength == 0.5
    config.write_text('sink = "null"\nsteps = 2\nstrength = 0.4\noscquery = false\n')
    settings = merge(read_config_file(str(config)), {"t_index_list": (10, 30)})
    assert settings.t_index_list == (10, 30) and settings.steps is None and settings.strength is None
    config.write_text('sink = "null"\noscquery_port = "off"\n')
    assert read_config_file(str(config)) == {"sink": "null", "oscquery": False, "oscquery_port": None}


def test_steps_and_strength_make_the_t_index_list():
    from bridge.engine import stream_config

    config = stream_config(RunSettings(sink=("null",), steps=3, strength=0.5, device="cpu", width=64, height=64))
    assert len(config.t_index_list) == 3 and config.t_index_list[0] >= 20
    with pytest.raises(ValueError, match="cfg_type"):
        stream_config(RunSettings(sink=("null",), cfg="most", device="cpu"))


def test_input_fit_reaches_the_engine_and_a_wrong_one_is_one_line(tmp_path, capsys):
    from bridge.cli import build_parser, main
    from bridge.commands.run import settings_from_args
    from bridge.engine import stream_config

    parser = build_parser()
    settings = settings_from_args(parser.parse_args(["run", "--sink", "null", "--device", "cpu", "--input-fit",
                                                     "letterbox"]))
    assert settings.input_fit == "letterbox" and stream_config(settings).input_fit == "letterbox"
    assert stream_config(RunSettings(sink=("null",), device="cpu")).input_fit == "crop"  # the engine's default
    config = tmp_path / "show.toml"
    config.write_text('sink = "null"\ninput_fit = "zoom"\n')
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "input_fit: 'zoom' must be one of crop, letterbox, stretch" in err


def test_devices_reports_every_backend_without_a_traceback():
    result = sdbridge("devices")
    assert result.returncode == 0, result.stderr
    names = [line.split(":")[0] for line in result.stdout.splitlines()]
    assert names == ["GPU", "torch.compile", "TensorRT", "Spout", "Syphon", "NDI", "virtual camera", "cameras", "window",
                     "mDNS"]


def make_clip(path, frames=30, fps=15, size=(96, 80)):
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            x = np.linspace(0, 255, width)[None, :, None] + index * 8
            pixels = np.broadcast_to(x, (height, width, 3)).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@pytest.mark.slow
def test_a_clip_through_run_into_a_file(tmp_path):
    clip, out = tmp_path / "clip.mp4", tmp_path / "out.mp4"
    make_clip(clip, frames=30, fps=15)  # 2 s
    result = sdbridge("run", "--source", f"video:{clip}", "--sink", f"file:{out}", *TINY, "--fps", "15",
                      "--prompt", "ink drawing", "--t-index-list", "30,45")
    assert result.returncode == 0, result.stderr
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    # 2 s at 15 fps, give or take the start and the end; the output repeats frames at 15 fps while
    # the last ones compute, which on a loaded 2-core machine took up to 5 s (79 frames) in all
    assert 20 <= len(frames) <= 100, len(frames)
    assert frames[0].shape == (64, 64, 3)
    assert any(not np.array_equal(frames[0], f) for f in frames[1:])
    assert "processed" in result.stdout and f"recorded: {out} ({len(frames)} frames)" in result.stdout


def test_txt2img_runs_from_the_prompt_alone_paced_to_the_output_rate(tmp_path):
    """--mode txt2img: no source opened (a camera that does not exist is never touched), pictures
    at most --fps a second (unpaced, the tiny model makes several times as many), each new."""
    frames = tmp_path / "frames"
    frames.mkdir()
    result = sdbridge("run", "--mode", "txt2img", "--source", "camera:97", "--sink", f"file:{frames}/%05d.png", *TINY,
                      "--fps", "8", "--duration", "3", "--prompt", "a red fox")
    assert result.returncode == 0, result.stderr
    assert "txt2img: pictures from the prompt alone" in result.stderr
    assert "running: txt2img -> random:tiny" in result.stderr
    taken, processed = (int(n) for n in re.search(r"(\d+) frames in, (\d+) processed", result.stdout).groups())
    assert processed <= taken <= processed + 1  # each picture asked for counts as a frame in (the status's fps)
    assert 2 <= processed <= 8 * 3 + 4, result.stdout  # paced: about 24 in 3 s (fewer on a loaded machine)
    pictures = []
    for path in sorted(frames.iterdir()):
        with av.open(str(path)) as container:
            pictures.append(next(container.decode(video=0)).to_ndarray(format="rgb24"))
    assert len(pictures) >= 12 and pictures[0].shape == (64, 64, 3)
    assert len({picture.tobytes() for picture in pictures}) > 1  # new pictures, not one repeated
    # the summary says what each sink took: here every picture written
    assert f"frames each sink took: 1 FileSink {len(pictures)}" in result.stdout, result.stdout
    assert f"recorded: {frames}/%05d.png ({len(pictures)} frames)" in result.stdout


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    started = time.monotonic()
    result = sdbridge("demo", "--duration", "3", "--no-status", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 60
    assert "inference: median" in result.stdout and "wrote sdbridge-demo.mp4" in result.stdout
    with av.open(str(tmp_path / "sdbridge-demo.mp4")) as container:
        frames = list(container.decode(video=0))
    assert len(frames) >= 20 and (frames[0].width, frames[0].height) == (256, 256)
    assert "building random-weight model" in result.stderr  # progress while loading


@pytest.mark.slow
def test_sigterm_stops_a_run_within_3_seconds_and_exits_0(tmp_path):
    env = child_env()
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "run", "--source", "testpattern", "--sink", f"file:{tmp_path}/o.mp4",
         *TINY], stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        for line in process.stderr:
            if "running:" in line or time.monotonic() > deadline:
                break
        time.sleep(1.0)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=10)
        assert time.monotonic() - sent < 3.0
        assert returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert (tmp_path / "o.mp4").stat().st_size > 0  # the file was finished, not cut off


def test_user_error_is_the_exit_2_type():
    assert issubclass(UserError, Exception)


@pytest.mark.slow
def test_sigterm_while_the_model_loads_exits_0_quickly(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "run", "--source", "testpattern", "--sink", "null", *TINY],
        stderr=subprocess.PIPE, text=True, env=child_env(), cwd=REPO)
    try:
        for line in process.stderr:
            if "building random-weight model" in line:
                break
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - sent < 3.0
    finally:
        if process.poll() is None:
            process.kill()


def test_run_ends_without_the_interpreters_teardown_also_as_python_m(tmp_path):
    """After `run`, the process ends with os._exit: native libraries' destructors (NDI, torch's
    threads) must not run while threads of theirs are still alive (seen: exit -11 after an NDI
    run, -6 after a long step). `python -m bridge.cli` must take that path too, not only the
    `sdbridge` script: an atexit hook (from a sitecustomize) shows whether the teardown ran."""
    (tmp_path / "sitecustomize.py").write_text(
        "import atexit\natexit.register(lambda: print('INTERPRETER TEARDOWN', flush=True))\n")
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    command = ["run", "--source", "testpattern", "--sink", "null", *TINY, "--frames", "2", "--no-osc"]
    probe = subprocess.run([sys.executable, "-c", "pass"], capture_output=True, text=True, env=env, timeout=30)
    assert "INTERPRETER TEARDOWN" in probe.stdout  # the hook works: a normal exit runs it
    for launcher in ([sys.executable, "-m", "bridge.cli"], [sys.executable, "-c", "from bridge.cli import entry; entry()"]):
        done = subprocess.run([*launcher, *command], capture_output=True, text=True, env=env, timeout=120, cwd=REPO)
        assert done.returncode == 0, done.stderr
        assert "ran " in done.stdout and "INTERPRETER TEARDOWN" not in done.stdout, (launcher, done.stdout)


def test_plain_eager_on_a_gpu_gets_a_hint_and_nothing_else_does(tiny_components):
    """The hint names the faster choices for the one case that is launch-bound: eager, no CUDA
    graphs, on a CUDA device (the real engine's backend and config, its device set to CUDA)."""
    from types import SimpleNamespace

    import torch

    from bridge.engine import speed_hint
    from pipeline import StreamConfig, StreamDiffusion

    engine = StreamDiffusion(tiny_components, StreamConfig(width=32, height=32, device="cpu", dtype="float32"))
    assert speed_hint(engine) is None  # on the CPU: compute-bound, no hint
    on_gpu = SimpleNamespace(backend=engine.backend, config=SimpleNamespace(device=torch.device("cuda")))
    assert "--cuda-graphs step" in speed_hint(on_gpu) and "--backend compiled" in speed_hint(on_gpu)
    engine.backend.cuda_graphs = "step"  # what --cuda-graphs step sets on CUDA
    assert speed_hint(on_gpu) is None


def test_devices_says_an_apple_gpu_is_not_used_unless_asked(monkeypatch):
    """No Mac here: torch's own MPS check is made to say yes, as on Apple silicon."""
    import torch

    from bridge.devices import check_gpu

    assert not torch.cuda.is_available()  # this machine: a CPU build, so the MPS branch is the one reached
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    name, available, detail = check_gpu()
    assert (name, available) == ("GPU", True)
    assert "the engine uses the CPU unless told --device mps" in detail
