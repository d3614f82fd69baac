"""The tensorrt backend end to end on the CPU: `build_engines` exports the tiny model to ONNX and
builds its engines through a stand-in with TensorRT 10's and 11's Python API (backed by onnxruntime:
tests/tensorrt_standin.py), the backend loads them from the verified cache and runs a stream whose
frames match the eager backend's. A missing, mismatched or tampered engine is one clear line at
start that names the command which builds it. Where the real TensorRT imports (an NVIDIA
machine), the same round trip runs against it in test_engine_cache.py."""

import dataclasses
import json

import numpy as np
import pytest

import tensorrt_standin
from pipeline import StreamConfig, StreamDiffusion
from pipeline.backends import tensorrt_build
from pipeline.backends.engine_cache import EngineCache, model_weights_hash

SIZE = 64
CONFIG = StreamConfig(width=SIZE, height=SIZE, device="cpu", dtype="float32", cfg_type="initialize",
                      t_index_list=(20, 40), guidance_scale=1.5, seed=3)


def _identity(version: str):
    """tensorrt_identity for a machine with TensorRT `version` (the stand-in has no GPU)."""
    return lambda device=None: tensorrt_build.TensorRTIdentity(version, "0.0", "stand-in GPU")


def _use_standin(monkeypatch):
    """The stand-in as `tensorrt`, and a machine identity for the cache keys (it has no GPU)."""
    module = tensorrt_standin.install(monkeypatch)
    monkeypatch.setattr(tensorrt_build, "tensorrt_identity", _identity(module.__version__))
    return module


@pytest.fixture
def standin(monkeypatch):
    return _use_standin(monkeypatch)


@pytest.fixture(scope="module")
def built(tiny_components, tmp_path_factory):
    """Engines for CONFIG (UNet batches 2 and 3: guidance off and on; the VAE), built once."""
    folder = tmp_path_factory.mktemp("engines")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _use_standin(monkeypatch)
        paths = tensorrt_build.build_engines(tiny_components, CONFIG, EngineCache(folder), work_folder=folder / "onnx",
                                             precision="fp32")
    return folder, paths


def _frames(count):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(count)]


def test_built_engines_run_a_stream_that_matches_eager(tiny_components, built, standin):
    folder, paths = built
    assert len(paths) == 4  # UNet batch 2 and 3, encoder, decoder
    engine = StreamDiffusion(tiny_components, CONFIG, backend="tensorrt", backend_options={"engines": str(folder)})
    reference = StreamDiffusion(tiny_components, CONFIG)
    loaded = len(engine.backend._engines)
    assert loaded == 4  # every engine the stream can call, at start
    for stream in (engine, reference):
        stream.set_prompt("a lighthouse", "fog")
    worst = 0
    for k, frame in enumerate(_frames(6)):
        if k == 3:
            for stream in (engine, reference):
                stream.update(guidance_scale=0.8)  # guidance off: the batch-2 UNet engine
        worst = max(worst, int(np.abs(engine(frame).astype(int) - reference(frame).astype(int)).max()))
    assert worst <= 1, f"TensorRT (stand-in) frames differ from eager by {worst}/255"
    assert tensorrt_standin.EXECUTIONS["count"] == 6 * 3  # encoder, UNet, decoder per frame
    assert len(engine.backend._engines) == loaded  # nothing loaded mid-show


def _header(engine_file):
    data = engine_file.read_bytes()
    assert data.startswith(tensorrt_standin.HEADER)
    return data[len(tensorrt_standin.HEADER):].split(b"\n", 1)[0].decode()


def test_engines_are_built_strongly_typed_in_the_precision_the_graph_was_exported_in(built, standin):
    """Each layer keeps the type of the exported graph (the model's own dtype); no weak-typing
    precision flag, which TensorRT 11 removed."""
    _, paths = built
    assert {_header(path) for path in paths} == {"STRONG:float32"}


def test_tensorrt_11_without_precision_flags_builds_and_runs_the_engines(tiny_components, tmp_path, monkeypatch):
    module = tensorrt_standin.install(monkeypatch, major=11)
    monkeypatch.setattr(tensorrt_build, "tensorrt_identity", _identity(module.__version__))
    assert not hasattr(module.BuilderFlag, "FP16")
    config = CONFIG.replace(cfg_type="none")  # one UNet batch: a quicker build
    paths = tensorrt_build.build_engines(tiny_components, config, EngineCache(tmp_path), work_folder=tmp_path / "onnx",
                                         precision="fp32")
    assert len(paths) == 3 and {_header(path) for path in paths} == {"STRONG:float32"}
    engine = StreamDiffusion(tiny_components, config, backend="tensorrt", backend_options={"engines": str(tmp_path)})
    reference = StreamDiffusion(tiny_components, config)
    for stream in (engine, reference):
        stream.set_prompt("a lighthouse")
    frame = _frames(1)[0]
    assert int(np.abs(engine(frame).astype(int) - reference(frame).astype(int)).max()) <= 1


def test_a_tensorrt_older_than_10_is_refused_in_one_line(monkeypatch):
    """TensorRT 8.6 has the named-tensor API but no strong typing, and its networks need the
    explicit-batch flag this builder does not set: refused, naming the version needed."""
    tensorrt_standin.install(monkeypatch, major=8)
    with pytest.raises(tensorrt_build.TensorRTUnavailable) as refused:
        tensorrt_build.tensorrt_identity()
    assert str(refused.value) == ("TensorRT 8.6.99+standin is too old: sdbridge needs TensorRT 10 or later "
                                  "(pip install 'sdbridge[tensorrt]')")


def test_a_precision_other_than_the_models_dtype_is_refused_before_building(tiny_components, standin, tmp_path):
    with pytest.raises(ValueError, match=r"precision 'fp16' needs the model loaded in torch.float16, not torch.float32"):
        tensorrt_build.build_engines(tiny_components, CONFIG, EngineCache(tmp_path), work_folder=tmp_path / "onnx",
                                     precision="fp16")
    assert not any(tmp_path.iterdir())  # nothing exported or built


def test_a_resolution_without_engines_is_one_line_naming_the_build_command(tiny_components, built, standin):
    folder, _ = built
    other = CONFIG.replace(width=96)
    with pytest.raises(ValueError) as refused:
        StreamDiffusion(tiny_components, other, backend="tensorrt", backend_options={"engines": str(folder),
                                                                                    "model": "random:tiny"})
    message = str(refused.value)
    assert "\n" not in message and "96x64" in message
    assert f"sdbridge build-engines --model random:tiny --cache {folder}" in message


def test_prebuilt_sizes_switch_at_run_time_and_one_without_engines_is_refused(tiny_components, built, standin,
                                                                              tmp_path):
    """Several sizes built ahead: the stream loads a size's engines at start (`warm_up(sizes=)`)
    or at the switch and matches eager there; a size without engines is refused in one line
    naming the build command, and the stream goes on at its size."""
    folder, _ = built
    wide = CONFIG.replace(width=96)
    tensorrt_build.build_engines(tiny_components, wide, EngineCache(folder), work_folder=tmp_path / "onnx",
                                 precision="fp32")
    engine = StreamDiffusion(tiny_components, CONFIG, backend="tensorrt",
                             backend_options={"engines": str(folder), "model": "random:tiny"})
    engine.warm_up(sizes=[(96, 64)])
    assert len(engine.backend._engines) == 2 * 4  # both sizes' UNet batches, encoder and decoder
    reference = StreamDiffusion(tiny_components, CONFIG)
    for stream in (engine, reference):
        stream.set_prompt("a lighthouse", "fog")
    rng = np.random.default_rng(1)
    worst = 0
    for size in ((96, 64), (64, 64), (96, 64)):
        for stream in (engine, reference):
            stream.update(resolution=size)
        for _ in range(3):
            frame = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
            out = engine(frame)
            assert out.shape == (64, size[0], 3)
            worst = max(worst, int(np.abs(out.astype(int) - reference(frame).astype(int)).max()))
    assert worst <= 1, f"TensorRT (stand-in) frames differ from eager by {worst}/255"
    assert len(engine.backend._engines) == 8  # nothing loaded at a switch
    with pytest.raises(ValueError) as refused:
        engine.update(resolution=(128, 64))
    message = str(refused.value)
    assert "\n" not in message and "128x64" in message
    assert f"sdbridge build-engines --model random:tiny --cache {folder}" in message
    assert (engine.config.width, engine.config.height) == (96, 64)
    assert engine(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).shape == (64, 96, 3)


def test_tampered_and_foreign_engines_are_refused(tiny_components, built, standin, tmp_path, monkeypatch):
    folder, _ = built
    copy = tmp_path / "engines"
    copy.mkdir()
    for path in folder.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    decoder = next(name for name in manifest if name.startswith("vae_decoder"))
    (copy / decoder).write_bytes((copy / decoder).read_bytes() + b"tampered")
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        StreamDiffusion(tiny_components, CONFIG, backend="tensorrt", backend_options={"engines": str(copy)})
    # the same engines under another TensorRT version are not looked at
    monkeypatch.setattr(tensorrt_build, "tensorrt_identity", _identity("11.0.0"))
    with pytest.raises(ValueError, match=r"no unet engine for 64x64 batch 2 fp32 in \S+ \(it holds one built for another "
                                          r"TensorRT version; this machine: TensorRT 11.0.0\)"):
        StreamDiffusion(tiny_components, CONFIG, backend="tensorrt", backend_options={"engines": str(folder)})


def test_other_weights_find_no_engines(tiny_components, built, standin):
    import copy

    folder, _ = built
    changed = dataclasses.replace(tiny_components, unet=copy.deepcopy(tiny_components.unet))
    next(changed.unet.parameters()).data.add_(0.01)
    assert model_weights_hash(changed.unet, changed.vae) != model_weights_hash(tiny_components.unet, tiny_components.vae)
    with pytest.raises(ValueError, match="no unet engine"):
        StreamDiffusion(changed, CONFIG, backend="tensorrt", backend_options={"engines": str(folder)})


def test_without_tensorrt_the_backend_says_so_in_one_line(tiny_components, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, as where it is not installed
    with pytest.raises(ValueError) as refused:
        StreamDiffusion(tiny_components, CONFIG, backend="tensorrt")
    assert str(refused.value) == (
        "backend: 'tensorrt' cannot run here: TensorRT is not installed: pip install 'sdbridge[tensorrt]' "
        "(NVIDIA GPUs only); use 'compiled' or 'eager'"
    )


def test_backend_fallback_runs_on_the_named_backend_and_says_so(monkeypatch, capsys, caplog):
    """`--backend-fallback` is the user's opt-in: without it a backend that cannot start stops the
    run (test_safety_trust.py); with it the run goes on, on that backend, loudly, and the status
    says which backend runs; a problem no backend solves (a size the model cannot take) still stops."""
    import sys

    from bridge import cli

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    common = ["-q", "run", "--sink", "null", "--no-osc", "--model", "random:tiny", "--device", "cpu",
              "--frames", "3", "--backend", "tensorrt", "--backend-fallback", "eager"]
    assert cli.main([*common, "--width", "32", "--height", "32"]) == 0
    said = caplog.text + capsys.readouterr().err
    assert "BACKEND FALLBACK: backend: 'tensorrt' cannot run here: TensorRT is not installed" in said, said
    assert "running on 'eager' instead" in said
    caplog.clear()
    assert cli.main([*common, "--width", "33", "--height", "32"]) == 2
    said = caplog.text + capsys.readouterr().err
    assert "BACKEND FALLBACK" not in said and "width: 33" in said, said


def test_status_names_the_backend_that_runs(tiny_components):
    from bridge.engine import backend_label
    from bridge.runtime import Runtime
    from bridge.transports.null import NullSink
    from bridge.transports.testpattern import TestPatternSource
    from bridge.telemetry import status_line

    engine = StreamDiffusion(tiny_components, StreamConfig(width=32, height=32, device="cpu", dtype="float32"))
    assert backend_label(engine) == "eager"
    engine.fallback_from = ("tensorrt", "TensorRT is not installed")
    runtime = Runtime(engine=engine, open_source=lambda: TestPatternSource(width=32, height=32), sinks=[NullSink()])
    snapshot = runtime.snapshot()
    assert snapshot["backend"] == "eager (fallback from tensorrt)"
    assert status_line(snapshot).endswith("| eager (fallback from tensorrt)")


def test_the_step_graph_runs_the_engines_with_the_prompt_in_static_buffers(tiny_components, built, standin):
    """`cuda_graphs="step"`: the stream's whole step (the engines' enqueues included) in one graph,
    the prompt embeddings in static buffers refreshed before each replay. The CPU replay re-runs the
    captured body against the stand-in: the frames equal the same engines without a graph."""
    from pipeline.step_graph import StepGraphs
    from test_step_graph import equal_through_prompt_changes, watch_prompt_copies

    folder, _ = built
    options = {"engines": str(folder), "cuda_graphs": "step"}
    plain = StreamDiffusion(tiny_components, CONFIG, backend="tensorrt", backend_options={"engines": str(folder)})
    graphed = StreamDiffusion(tiny_components, CONFIG, backend="tensorrt", backend_options=options)
    assert (graphed.backend.cuda_graphs, graphed._graphs) == ("off", None)  # no CUDA here: no graph
    graphed.backend.step_graphs = "eager"  # what "step" sets on CUDA, with the CPU replay
    graphed._graphs = StepGraphs(graphed, replay="eager")
    graphed.warm_up()
    copies_in_replay = watch_prompt_copies(graphed)
    frames = iter(_frames(9))
    changes = [("a lighthouse", 1.5), ("a harbour", 1.5), ("a harbour", 0.8)]
    assert len(list(equal_through_prompt_changes(plain, graphed, changes, frames, negative="fog", frames_each=3))) == 3
    assert not copies_in_replay and graphed._graphs.replays == 9  # the first frame too (filled, then replayed)
    assert sorted(graphed.backend._static) == [2, 3]  # guidance off and on (initialize: one negative row)
    with pytest.raises(ValueError, match="cuda_graphs 'modules' must be one of off, step for the tensorrt backend"):
        StreamDiffusion(tiny_components, CONFIG, backend="tensorrt", backend_options={**options, "cuda_graphs": "modules"})


@pytest.fixture(scope="module")
def lora_model(tiny_components, tmp_path_factory):
    """A diffusers folder of the tiny model, a TAESD folder and an LCM-LoRA for its UNet."""
    from types import SimpleNamespace

    import torch
    from diffusers import AutoencoderKL
    from test_loading import TINY_KL_VAE, write_lora, write_pipeline_folder
    from pipeline.models import UNET_CONFIGS

    root = tmp_path_factory.mktemp("lora_model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        kl_vae = AutoencoderKL(**TINY_KL_VAE).eval()
    original = SimpleNamespace(unet=tiny_components.unet, text_encoder=tiny_components.text_encoder, kl_vae=kl_vae)
    model = write_pipeline_folder(root / "model", original)
    tiny_components.vae.save_pretrained(root / "taesd")
    (root / "lora").mkdir()
    lora, _ = write_lora(root / "lora", unet_config=UNET_CONFIGS["tiny"])
    return SimpleNamespace(model=str(model), taesd=str(root / "taesd"), lora=str(lora))


def test_engines_built_with_an_lcm_lora_are_the_ones_a_run_with_it_finds(lora_model, standin, tmp_path):
    """build-engines loads the model as `run` does (bridge.engine.load_model, --vae and
    --lcm-lora included), so the engines it builds carry the hash of the weights a run with the
    same flags computes; a run without the LoRA finds none, and the line names the command that
    builds its engines, flags and all."""
    from bridge.engine import build_engine, load_model, stream_config
    from bridge.errors import UserError
    from bridge.settings import RunSettings

    components = load_model(lora_model.model, dtype=CONFIG.dtype, device=CONFIG.device, vae=lora_model.taesd,
                            lcm_lora=lora_model.lora, progress=lambda _: None)  # as build-engines loads it
    config = CONFIG.replace(cfg_type="none")
    tensorrt_build.build_engines(components, config, EngineCache(tmp_path), work_folder=tmp_path / "onnx",
                                 precision="fp32")
    settings = dict(model=lora_model.model, vae=lora_model.taesd, sink=("null",), backend="tensorrt",
                    engines=str(tmp_path), device="cpu", dtype="float32", cfg="none", t_index_list=(20, 40),
                    width=SIZE, height=SIZE)
    with_lora = RunSettings(**settings, lcm_lora=lora_model.lora)
    engine = build_engine(with_lora, stream_config(with_lora), progress=lambda _: None)
    assert engine.backend.name == "tensorrt" and len(engine.backend._engines) == 3
    assert engine(_frames(1)[0]).shape == (SIZE, SIZE, 3)
    # the engines were built for the fused weights: the model alone has none
    without = RunSettings(**settings)
    with pytest.raises(UserError) as refused:
        build_engine(without, stream_config(without), progress=lambda _: None)
    message = str(refused.value)
    assert "no unet engine" in message and "\n" not in message
    assert f"sdbridge build-engines --model {lora_model.model} --vae {lora_model.taesd} --cache {tmp_path}" in message
    assert "--lcm-lora" not in message
    # a style LoRA on top changes the weights again: refused, naming every flag that builds its engines
    styled = RunSettings(**settings, lcm_lora=lora_model.lora, lora=(f"{lora_model.lora}:0.5",))
    with pytest.raises(UserError) as refused:
        build_engine(styled, stream_config(styled), progress=lambda _: None)
    assert (f"--model {lora_model.model} --vae {lora_model.taesd} --lcm-lora {lora_model.lora} "
            f"--lora {lora_model.lora}:0.5 --cache {tmp_path}") in str(refused.value)


def test_build_engines_cli_takes_the_run_flags_that_change_the_weights(lora_model, tmp_path):
    from test_cli import sdbridge

    result = sdbridge("-q", "build-engines", "--model", lora_model.model, "--vae", lora_model.taesd, "--lcm-lora",
                      lora_model.lora, "--cfg", "none", "--width", "64", "--height", "64", "--onnx-only",
                      "--cache", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.glob("onnx/*/*.onnx")) == ["unet.onnx", "vae_decoder.onnx",
                                                                              "vae_encoder.onnx"]
    result = sdbridge("-q", "build-engines", "--model", "random:tiny", "--lcm-lora", lora_model.lora, "--onnx-only",
                      "--cache", str(tmp_path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "lcm_lora: 'random:tiny' is a random-weight model" in result.stderr


def test_build_engines_config_builds_what_the_show_loads_at_start(lora_model, standin, tmp_path):
    """`build-engines --config show.toml` plans the engines of the show's model (its VAE and
    LCM-LoRA), sizes and step counts, into its engines folder; a `run --config show.toml` on
    tensorrt then loads every one of them at start (its --compile-steps too) and runs."""
    from bridge.cli import build_parser
    from bridge.commands.build_engines import plan
    from bridge.commands.run import settings_from_args
    from bridge.engine import build_engine, load_model, stream_config

    show = tmp_path / "show.toml"
    show.write_text("\n".join([
        f'model = "{lora_model.model}"', f'vae = "{lora_model.taesd}"', f'lcm_lora = "{lora_model.lora}"',
        f'lora = ["{lora_model.lora}:0.5"]', 'sink = "null"', 'backend = "tensorrt"',
        f'engines = "{tmp_path / "show-engines"}"', 'device = "cpu"',
        'dtype = "float32"', "width = 64", "height = 64", 'sizes = ["96x64"]', 'cfg = "none"',
        "t_index_list = [20, 40]", "compile_steps = [1]",
    ]) + "\n")
    parser = build_parser()
    build = plan(parser.parse_args(["build-engines", "--config", str(show), "--onnx-only"]))
    assert [(c.width, c.height, c.denoising_steps, c.cfg_type) for c in build.configs] == [
        (64, 64, 2, "none"), (64, 64, 1, "none"), (96, 64, 2, "none"), (96, 64, 1, "none")]
    assert build.cache == tmp_path / "show-engines" and build.precision == "fp32"  # the show's dtype
    assert build.model_options == {"vae": lora_model.taesd, "lcm_lora": lora_model.lora,
                                   "lora": (f"{lora_model.lora}:0.5",), "single_file_config": None}
    flags = plan(parser.parse_args(["build-engines", "--config", str(show), "--onnx-only", "--width", "128",
                                    "--height", "64", "--cfg", "full", "--cache", str(tmp_path / "other")]))
    assert [(c.width, c.denoising_steps, c.cfg_type) for c in flags.configs] == [(128, 2, "full"), (128, 1, "full")]
    assert flags.cache == tmp_path / "other"

    components = load_model(build.model, dtype=CONFIG.dtype, device=CONFIG.device, progress=lambda _: None,
                            **build.model_options)
    for config in build.configs:
        tensorrt_build.build_engines(components, config, EngineCache(build.cache), work_folder=tmp_path / "onnx",
                                     precision=build.precision)
    settings = settings_from_args(parser.parse_args(["run", "--config", str(show)]))
    engine = build_engine(settings, stream_config(settings), progress=lambda _: None)
    assert len(engine.backend._engines) == 2 * 4  # each size: the UNet for 2 and 1 steps, encoder, decoder
    for size, steps in (((96, 64), (20, 40)), ((96, 64), (30,)), ((64, 64), (30,))):
        engine.update(resolution=size, t_index_list=steps)
        assert engine(_frames(1)[0]).shape == (64, size[0], 3)
    assert len(engine.backend._engines) == 2 * 4  # nothing loaded mid-show


@pytest.mark.parametrize("dtype, precision", [("auto", "fp16"), ("FP32", "fp32"), ("half", "fp16"), ("bf16", "bf16")])
def test_build_engines_plans_a_gpu_show_anywhere_with_its_dtype_as_run_spells_it(tmp_path, dtype, precision):
    """A show for the GPU (device = "cuda") plans here too (--onnx-only needs no GPU), and its
    dtype, spelled any way `run` takes it, is the engines' precision."""
    from bridge.cli import build_parser
    from bridge.commands.build_engines import plan

    show = tmp_path / "show.toml"
    show.write_text(f'model = "random:tiny"\nsink = "null"\nbackend = "tensorrt"\ndevice = "cuda"\ndtype = "{dtype}"\n'
                    "width = 64\nheight = 64\n")
    build = plan(build_parser().parse_args(["build-engines", "--config", str(show), "--onnx-only"]))
    assert build.precision == precision
    assert [(str(c.device), c.dtype) for c in build.configs] == [("cpu", CONFIG.dtype)]  # exported in fp32 here
