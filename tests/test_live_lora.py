"""Live LoRAs: strengths that change while frames flow, written into the weights in place."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline import StreamConfig, StreamDiffusion
from pipeline.errors import BackendUnavailable, ModelLoadError
from pipeline.live_lora import Factors, delta_weight, peft_factors
from pipeline.loading import load_components
from pipeline.models import UNET_CONFIGS
from test_compiled_backend import CountingBackend
from test_loading import TINY_KL_VAE, write_lora, write_pipeline_folder

CPU = torch.device("cpu")
SIZE = 64


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_components) -> Path:
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        kl_vae = AutoencoderKL(**TINY_KL_VAE).eval()
    original = SimpleNamespace(unet=tiny_components.unet, text_encoder=tiny_components.text_encoder, kl_vae=kl_vae)
    return write_pipeline_folder(tmp_path_factory.mktemp("pipeline"), original)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """Two UNet LoRAs of different ranks."""
    files = []
    for index, (rank, alpha) in enumerate([(4, 8), (2, 2)]):
        folder = tmp_path_factory.mktemp(f"lora{index}")
        files.append(write_lora(folder, unet_config=UNET_CONFIGS["tiny"], rank=rank, alpha=alpha, seed=40 + index)[0])
    return files


def _load(model_folder, **loras):
    return load_components(str(model_folder), vae="model", dtype=torch.float32, device=CPU, **loras)


def _unet_weights(components) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in components.unet.named_parameters()}


def _assert_same_weights(a: dict, b: dict, atol=2e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


# ---------------------------------------------------------------------------------------------- the math


@pytest.mark.parametrize("layer", [
    torch.nn.Linear(12, 10),
    torch.nn.Conv2d(6, 8, 1),
    torch.nn.Conv2d(6, 8, 3, padding=1),
])
def test_delta_weight_is_pefts(layer):
    """Our dW for linear, 1x1 and 3x3 convolution layers equals peft's get_delta_weight."""
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential()
    model.add_module("layer", copy.deepcopy(layer))
    model = inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, target_modules=["layer"]), model)
    torch.nn.init.normal_(model.layer.lora_B["default"].weight, std=0.3)
    factors = peft_factors(model, "default", lora_name="x")
    assert list(factors) == ["layer"]
    expected = model.layer.get_delta_weight("default")
    torch.testing.assert_close(delta_weight(factors["layer"], layer.weight.shape), expected, rtol=1e-5, atol=1e-6)


def test_delta_weight_refuses_a_misfit():
    factors = Factors(torch.zeros(2, 5), torch.zeros(4, 2), 1.0)
    with pytest.raises(ValueError, match=r"a LoRA layer of shape \(4, 5\) does not fit a weight of \(4, 6\)"):
        delta_weight(factors, torch.Size((4, 6)))


def test_dora_is_refused_by_name():
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential()
    model.add_module("layer", torch.nn.Linear(8, 8))
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["layer"], use_dora=True), model)
    with pytest.raises(ValueError, match="live lora 'dora.safetensors': its layer layer uses DoRA.*--lora"):
        peft_factors(model, "default", lora_name="dora.safetensors")


# ---------------------------------------------------------------------------------------------- loading


def test_live_loras_start_as_the_same_loras_fused(model_folder, lora_files):
    live = _load(model_folder, live_loras=[(str(lora_files[0]), 0.7), (str(lora_files[1]), -0.4)])
    fused = _load(model_folder, loras=[(str(lora_files[0]), 0.7), (str(lora_files[1]), -0.4)])
    assert live.live_loras.names == [str(f) for f in lora_files] and live.live_loras.scales == [0.7, -0.4]
    assert live.live_loras.layers > 0 and not live.live_loras.text_encoder
    assert not any(hasattr(m, "lora_A") for m in live.unet.modules())  # plain layers: the adapters unloaded
    _assert_same_weights(_unet_weights(live), _unet_weights(fused))


def test_a_new_strength_is_that_strength_fused_and_faders_do_not_drift(model_folder, lora_files):
    live = _load(model_folder, live_loras=[(str(lora_files[0]), 1.0), (str(lora_files[1]), 0.5)])
    start = _unet_weights(live)
    addresses = {name: p.data_ptr() for name, p in live.unet.named_parameters()}
    live.live_loras.set_scales({0: 0.0, 1: 0.3})
    _assert_same_weights(_unet_weights(live), _unet_weights(_load(model_folder, loras=[(str(lora_files[1]), 0.3)])))
    assert {name: p.data_ptr() for name, p in live.unet.named_parameters()} == addresses  # written in place
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):  # an operator's faders for a while
        index = int(torch.randint(2, (1,), generator=generator))
        live.live_loras.set_scales({index: float(torch.rand((), generator=generator)) * 4 - 2})
    live.live_loras.set_scales({0: 1.0, 1: 0.5})
    _assert_same_weights(_unet_weights(live), start, atol=1e-6)


@pytest.mark.parametrize("scales, message", [
    ({2: 0.5}, r"lora 3: there is no such live LoRA \(2 loaded\)"),
    ({0: float("nan")}, r"lora 1: scale nan must be a number in -10\.\.10"),
    ({1: 11.0}, r"lora 2: scale 11\.0 must be a number in -10\.\.10"),
    ({0: 0.2, 1: "x"}, r"lora 2: scale 'x' must be"),
])
def test_a_wrong_strength_is_named_and_changes_nothing(model_folder, lora_files, scales, message):
    live = _load(model_folder, live_loras=[(str(lora_files[0]), 1.0), (str(lora_files[1]), 0.5)])
    before = _unet_weights(live)
    with pytest.raises(ValueError, match=message):
        live.live_loras.set_scales(scales)
    assert live.live_loras.scales == [1.0, 0.5]
    _assert_same_weights(_unet_weights(live), before, atol=0)


def test_a_write_that_fails_half_way_puts_every_layer_back(model_folder, lora_files, monkeypatch):
    """Out of memory while the layers are rewritten: the strengths and the weights stay as they were."""
    import pipeline.live_lora as live_lora

    live = _load(model_folder, live_loras=[(str(lora_files[0]), 1.0)])
    before = _unet_weights(live)
    calls = {"n": 0}
    real = live_lora.delta_weight

    def failing(factors, shape):
        calls["n"] += 1
        if calls["n"] == 5:  # the fifth layer of the write: four are written already
            raise RuntimeError("CUDA out of memory (stand-in)")
        return real(factors, shape)

    monkeypatch.setattr(live_lora, "delta_weight", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        live.live_loras.set_scales({0: 0.3})
    assert live.live_loras.scales == [1.0]
    _assert_same_weights(_unet_weights(live), before, atol=1e-6)


@pytest.mark.parametrize("live_loras, message", [
    ([("a.safetensors", 1.0)] * 5, r"live_loras: 5 given; at most 4 can be live"),
    ([("a.safetensors", 20.0)], r"live_loras: a\.safetensors: scale 20\.0 must be a number in -10\.\.10"),
    ("a.safetensors", r"live_loras: 'a\.safetensors' must be a list of \(weights, scale\) pairs"),
])
def test_bad_live_lora_arguments_are_one_clear_error(model_folder, live_loras, message):
    with pytest.raises(ValueError, match=message):
        _load(model_folder, live_loras=live_loras)


def test_a_live_lora_that_does_not_fit_is_named(tmp_path, model_folder):
    wrong, _ = write_lora(tmp_path, unet_config=dict(UNET_CONFIGS["tiny"], cross_attention_dim=48))
    with pytest.raises(ModelLoadError, match="^live_lora .* does not fit the UNet of .*size mismatch"):
        _load(model_folder, live_loras=[(str(wrong), 0.8)])
    with pytest.raises(ModelLoadError, match="live_lora path not found: .*nope.safetensors"):
        _load(model_folder, live_loras=[(str(tmp_path / "nope.safetensors"), 1.0)])


# ---------------------------------------------------------------------------------------------- the stream


def _config(**changes):
    values = dict(width=SIZE, height=SIZE, device="cpu", dtype="float32", t_index_list=(20, 40), guidance_scale=1.5,
                  delta=0.8, seed=3, cfg_type="self")
    values.update(changes)
    return StreamConfig(**values)


def _frames(count, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, SIZE, SIZE, generator=generator) for _ in range(count)]


def _run(engine, frames):
    return [engine(frame).clone() for frame in frames]


@pytest.mark.parametrize("backend, options", [("eager", {}), ("eager", {"fuse_qkv": True}), ("compiled", {})])
def test_a_stream_at_a_new_strength_makes_the_fused_pictures_without_compiling(model_folder, lora_files, backend,
                                                                               options):
    """A strength change mid-stream: the frames after it are those of a stream built with the
    LoRA fused at that strength (fed the same frames), and the compiled backend compiles nothing.
    With fused q/k/v the layers are views of the fused projection: the writes reach it."""
    counter = CountingBackend()
    options = {"compile_backend": counter, **options} if backend == "compiled" else options
    live = _load(model_folder, live_loras=[(str(lora_files[0]), 1.0)])
    engine = StreamDiffusion(live, _config(), backend=backend, backend_options=options or None)
    assert (engine.backend.fused_qkv_layers > 0) == bool(options.get("fuse_qkv"))
    engine.set_prompt("a harbour", "rain")
    frames = _frames(6)
    _run(engine, frames[:3])
    compiled = counter.count
    engine.set_lora_scales([0.25])
    assert engine.lora_scales == (0.25,)
    after = _run(engine, frames[3:])
    assert counter.count == compiled  # nothing compiled for the new strength

    fused = StreamDiffusion(_load(model_folder, loras=[(str(lora_files[0]), 0.25)]), _config())
    fused.set_prompt("a harbour", "rain")
    _run(fused, frames[:3])  # the same frames in flight
    reference = _run(fused, frames[3:])
    # the frames in flight were denoised partly at the old strength: the last is wholly the new one's
    torch.testing.assert_close(after[-1], reference[-1], rtol=0, atol=2e-4)
    unchanged = StreamDiffusion(_load(model_folder, loras=[(str(lora_files[0]), 1.0)]), _config())
    unchanged.set_prompt("a harbour", "rain")
    assert (_run(unchanged, frames)[-1] - after[-1]).abs().max() > 1e-3  # the strength did change the picture


def test_a_strength_change_recomputes_the_prompts_cross_attention(model_folder, lora_files):
    """The K/V cache holds the prompt through to_k/to_v, which the LoRA touches: computed again."""
    live = _load(model_folder, live_loras=[(str(lora_files[0]), 1.0)])
    engine = StreamDiffusion(live, _config(kv_cache=True))
    engine.set_prompt("a harbour")
    engine(_frames(1)[0])
    before = engine._prompt_state
    cached = next(iter(before.conditions.values()))
    engine.set_lora_scales({0: 0.0})
    engine(_frames(1)[0])
    after = next(iter(engine._prompt_state.conditions.values()))
    assert after is not cached and after.kv is not None
    assert not torch.allclose(after.kv[0].key, cached.kv[0].key)


def write_text_encoder_lora(folder: Path, text_encoder, *, seed: int = 7) -> Path:
    """A LoRA with UNet and text-encoder parts, as kohya-style style LoRAs have."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**UNET_CONFIGS["tiny"])
        unet_config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_k", "to_v"])
        unet.add_adapter(unet_config)
        encoder_config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
        encoder = inject_adapter_in_model(encoder_config, copy.deepcopy(text_encoder))
        for model in (unet, encoder):
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(parameter, std=0.2)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder)),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=encoder_config.to_dict(),
        safe_serialization=True,
    )
    return folder / "pytorch_lora_weights.safetensors"


def test_a_text_encoder_part_encodes_the_prompt_again(tmp_path, model_folder, tiny_components):
    lora = write_text_encoder_lora(tmp_path, tiny_components.text_encoder)
    live = _load(model_folder, live_loras=[(str(lora), 1.0)])
    assert live.live_loras.text_encoder
    engine = StreamDiffusion(live, _config(prompt_transition=5.0))
    engine.set_prompt_blend([("a cat", 0.6), ("a dog", 0.4)], negative_prompt="rain")
    engine(_frames(1)[0])
    engine.set_prompt("a bird")  # a transition under way
    assert engine.in_transition
    engine.set_lora_scales([0.3])
    assert not engine.in_transition  # landed at once: its start was encoded with the old weights

    fused = _load(model_folder, loras=[(str(lora), 0.3)])
    reference = StreamDiffusion(fused, _config())
    reference.set_prompt("a bird")
    torch.testing.assert_close(engine._prompt_state.cond, reference._prompt_state.cond, rtol=0, atol=1e-5)
    torch.testing.assert_close(engine._prompt_state.uncond, reference._prompt_state.uncond, rtol=0, atol=1e-5)
    assert not engine.prompts.cached("a cat")  # the cache of the old weights' embeddings is gone


def test_without_live_loras_a_strength_is_refused(tiny_components):
    engine = StreamDiffusion(tiny_components, _config())
    assert engine.lora_scales == ()
    with pytest.raises(ValueError, match=r"lora: no live LoRAs are loaded \(load them with live_loras= or --live-lora\)"):
        engine.set_lora_scales([0.5])


def test_a_list_of_the_wrong_length_is_refused(model_folder, lora_files):
    engine = StreamDiffusion(_load(model_folder, live_loras=[(str(lora_files[0]), 1.0)]), _config())
    with pytest.raises(ValueError, match=r"lora scales: \[0\.5, 0\.5\] gives 2 scales for 1 live LoRAs"):
        engine.set_lora_scales([0.5, 0.5])


def test_backends_that_hold_fixed_weights_refuse_live_loras():
    from pipeline.stream import _check_live_loras

    components = SimpleNamespace(live_loras=object())
    with pytest.raises(BackendUnavailable, match="tensorrt backend's engines hold fixed weights.*--lora"):
        _check_live_loras(components, SimpleNamespace(name="tensorrt"))
    with pytest.raises(BackendUnavailable, match="fp8 runs on a quantized copy.*without --fp8"):
        _check_live_loras(components, SimpleNamespace(name="eager", fp8_layers=12))
    _check_live_loras(components, SimpleNamespace(name="compiled", fp8_layers=0))


# ---------------------------------------------------------------------------------------------- sdbridge run


def test_oscsend_moves_a_live_lora_in_a_running_bridge(tmp_path, model_folder, lora_files):
    """`sdbridge run --live-lora`, driven by liblo's oscsend: /sd/lora/1 and its /norm form land
    (OSCQuery reports them; slot 2, empty, it lists as unavailable), a strength for a LoRA that
    is not loaded is refused and logged, the run goes on."""
    import shutil
    import signal
    import subprocess
    import sys

    from test_cli import REPO, child_env
    from test_run_osc import free_port, query, wait_until

    if shutil.which("oscsend") is None:
        pytest.skip("liblo's oscsend is not installed (Debian package liblo-tools)")
    osc_port, query_port = free_port(), free_port()
    command = [sys.executable, "-m", "bridge.cli", "run", "--model", str(model_folder), "--vae", "model",
               "--live-lora", f"{lora_files[0]}:0.5", "--width", "64", "--height", "64", "--device", "cpu",
               "--no-status", "--source", "testpattern", "--sink", "null", "--fps", "10",
               "--osc-port", str(osc_port), "--oscquery-port", str(query_port)]
    process = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert wait_until(lambda: query(query_port, "/?HOST_INFO"), 90), "OSCQuery never answered"
        assert wait_until(lambda: query(query_port, "/sd/lora/1?VALUE").get("VALUE") == [0.5], 30)  # as started
        assert query(query_port, "/sd/lora/2?ACCESS") == {"ACCESS": 0}  # no LoRA in slot 2

        def send(*args):
            subprocess.run(["oscsend", "127.0.0.1", str(osc_port), *args], check=True, timeout=5)

        send("/sd/lora/1", "f", "0.2")
        assert wait_until(lambda: query(query_port, "/sd/lora/1?VALUE")["VALUE"] == [pytest.approx(0.2)], 30)
        send("/sd/lora/2", "f", "1")  # there is one live LoRA
        send("/sd/lora/1/norm", "f", "0.75")  # 0..1 onto 0..2
        assert wait_until(lambda: query(query_port, "/sd/lora/1?VALUE")["VALUE"] == [pytest.approx(1.5)], 30)
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=15)
    assert process.returncode == 0, err
    assert "live LoRA 1 (OSC /sd/lora/1): pytorch_lora_weights.safetensors at 0.5" in err, err
    assert "lora_2" in err and "there is no such live LoRA (1 loaded)" in err, err


@pytest.mark.parametrize("changes, message", [
    ({"backend": "tensorrt"}, "live_lora: TensorRT engines hold fixed weights.*--lora"),
    ({"backend_fallback": "tensorrt"}, "live_lora: TensorRT engines hold fixed weights"),
    ({"fp8": True}, "live_lora: fp8 runs on a quantized copy.*without --fp8"),
])
def test_a_run_whose_backend_holds_fixed_weights_is_refused_before_loading(changes, message):
    from bridge.settings import RunSettings

    with pytest.raises(ValueError, match=message):
        RunSettings(model="some/model", sink=("null",), live_lora=("style.safetensors",), **changes)


@pytest.mark.parametrize("backend", ["tensorrt", "compiled"])
def test_build_engines_refuses_live_loras(tmp_path, lora_files, capsys, backend):
    from bridge.cli import main

    config = tmp_path / "show.toml"
    config.write_text(f'model = "some/model"\nbackend = "{backend}"\nlive_lora = ["{lora_files[0]}:0.5"]\n')
    assert main(["build-engines", "--config", str(config), "--onnx-only"]) == 2
    assert "live_lora: TensorRT engines hold fixed weights" in capsys.readouterr().err


def test_the_parameter_store_applies_strengths_and_refuses_only_the_bad_one(model_folder, lora_files):
    from bridge.control.table import check_presets
    from bridge.params import ParameterStore, apply_pending

    engine = StreamDiffusion(_load(model_folder, live_loras=[(str(lora_files[0]), 1.0)]), _config())
    store = ParameterStore()
    heard = []
    store.add_listener(lambda name, value, error: heard.append((name, value, error)))
    store.update({"lora_1": 0.4, "lora_2": 0.9, "guidance_scale": 1.1})
    apply_pending(store, engine)
    assert engine.lora_scales == (0.4,) and engine.config.guidance_scale == 1.1
    assert store.applied["lora_1"] == 0.4 and "lora_2" not in store.applied
    refused = [(name, error) for name, _, error in heard if error]
    assert refused == [("lora_2", "lora 2: there is no such live LoRA (1 loaded)")]
    assert check_presets({"1": {"lora_1": 0.8, "prompt": "ink"}}) == {1: {"lora_1": 0.8, "prompt": "ink"}}


def test_a_strength_whose_pictures_are_nan_is_rolled_back_in_a_running_bridge(tmp_path, model_folder):
    """A LoRA whose up factors are 1e18 (a broken file, or a strength far past what it was
    trained for): at 0 it changes nothing, at 1 every picture is NaN. The engine holds its last
    good output, then the runtime puts the strength back to the last one that made clean
    pictures and says why; clean pictures flow again."""

    from safetensors.torch import load_file, save_file

    from bridge.recovery import bad_output_limit
    from bridge.runtime import Runtime, RuntimeConfig
    from bridge.transports.testpattern import TestPatternSource
    from safety_sources import RecordingSink
    from test_safety_faults import wait_for

    path = write_lora(tmp_path, unet_config=UNET_CONFIGS["tiny"], rank=4, alpha=8, seed=41)[0]
    save_file({name: tensor * 1e18 if ".up." in name or "lora_B" in name else tensor
               for name, tensor in load_file(path).items()}, path)
    engine = StreamDiffusion(_load(model_folder, live_loras=[(str(path), 0.0)]), _config())
    start = _unet_weights(engine.components)
    runtime = Runtime(engine=engine, open_source=lambda: TestPatternSource(width=SIZE, height=SIZE, fps=60),
                      sinks=[RecordingSink()], config=RuntimeConfig(fps=30))
    with runtime:
        assert wait_for(lambda: runtime.snapshot()["frames_processed"] > 5)
        runtime.params.set("lora_1", 1.0)
        assert wait_for(lambda: runtime.snapshot()["rollbacks"] == 1)
        caught = engine.stats.nonfinite_caught
        after = runtime.snapshot()["frames_processed"]
        assert wait_for(lambda: runtime.snapshot()["frames_processed"] > after + 10)
        assert engine.stats.nonfinite_caught == caught  # clean pictures since
    assert caught == bad_output_limit(engine.config)
    assert engine.lora_scales == (0.0,) and runtime.params.applied["lora_1"] == 0.0
    value, reason = runtime.params.rejected["lora_1"]
    assert value == 1.0 and reason.startswith("outputs were NaN, inf or black with this value")
    _assert_same_weights(_unet_weights(engine.components), start, atol=0)
    print(f"\n{runtime.snapshot()['last_error']!r}")
    assert "lora_1=1.0 refused: outputs were NaN" in runtime.snapshot()["last_error"]


def test_live_loras_alone_load_at_the_runs_dtype(tmp_path, model_folder, lora_files, tiny_components, monkeypatch):
    """Only fused LoRAs need the model in fp32 while loading: with live LoRAs alone, an fp16 run
    loads fp16 (half the memory at start), and its weights, the text encoder's included, are what
    a fused fp32 load gives, cast to fp16, within fp16's rounding. The fused load's cast to fp16
    prints nothing (diffusers' "should be kept in float32: []" warning)."""
    import pipeline.loading as loading

    import logging

    class Heard(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.texts = []

        def emit(self, record):
            self.texts.append(record.getMessage())

    heard = Heard()
    logging.getLogger("diffusers").addHandler(heard)  # (diffusers' loggers do not propagate to the root)
    dtypes = []
    load_folder = loading._load_folder
    monkeypatch.setattr(loading, "_load_folder", lambda *a, **k: (dtypes.append(k["dtype"]), load_folder(*a, **k))[1])
    loras = [(str(lora_files[0]), 0.7), (str(write_text_encoder_lora(tmp_path, tiny_components.text_encoder)), 0.5)]
    half = dict(vae="model", dtype=torch.float16, device=CPU)
    try:
        live = load_components(str(model_folder), live_loras=loras, **half)
        fused = load_components(str(model_folder), loras=loras, **half)
    finally:
        logging.getLogger("diffusers").removeHandler(heard)
    assert dtypes == [torch.float16, torch.float32]
    assert not [text for text in heard.texts if "kept in float32" in text]
    assert all(p.dtype == torch.float16 for p in live.unet.parameters())
    assert live.live_loras.text_encoder
    _assert_same_weights(_unet_weights(live), _unet_weights(fused), atol=2e-3)
    for mine, theirs in zip(live.text_encoder.parameters(), fused.text_encoder.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=2e-3)
    live.live_loras.set_scales({0: 0.0, 1: 0.0})
    plain = load_components(str(model_folder), **half)
    _assert_same_weights(_unet_weights(live), _unet_weights(plain), atol=0)  # the base is the plain fp16 load


def test_a_rollback_whose_strength_write_fails_still_reports_the_settings_it_put_back(model_folder, lora_files):
    """The guidance and a live LoRA strength changed since the last clean frame; at the rollback
    the strength cannot be written (an out-of-memory error, stood in for by a raising
    set_lora_scales): the guidance is back, and reported as restored; the failure is named."""
    from bridge.params import ParameterStore
    from bridge.recovery import EngineGuard, bad_output_limit
    from bridge.telemetry import Telemetry

    engine = StreamDiffusion(_load(model_folder, live_loras=[(str(lora_files[0]), 0.0)]), _config())
    store, telemetry = ParameterStore(), Telemetry()
    guard = EngineGuard(engine=engine, telemetry=telemetry, params=store)
    guard.good_frame()
    engine.update(guidance_scale=3.0)
    engine.set_lora_scales([0.7])
    store.report_applied({"guidance_scale": 3.0, "lora_1": 0.7})

    def out_of_memory(scales):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    engine.set_lora_scales = out_of_memory
    for _ in range(bad_output_limit(engine.config)):
        guard.bad_output()
    assert engine.config.guidance_scale == 1.5 and engine.lora_scales == (0.7,)
    assert store.applied["guidance_scale"] == 1.5 and store.rejected["guidance_scale"][0] == 3.0
    assert store.applied["lora_1"] == 0.7  # not restored: still what runs
    snapshot = telemetry.snapshot()
    assert snapshot["rollbacks"] == 1 and "guidance_scale=1.5" in snapshot["last_error"]
