"""Fused self-attention projections (`fuse_qkv`, pipeline/attention.py): one (3 x inner, dim)
projection for each plain self-attention layer's query, key and value, giving the UNet's output
of the three, with the three layers' weights as views of the fused one (no memory kept twice).
Each test builds its own tiny model: fusing changes the UNet in place, and `tiny_components` is
shared by the whole session."""

import functools
import json

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from pipeline import StreamConfig, StreamDiffusion, random_components
from pipeline.attention import CrossAttentionCache, _FusedSelfAttnProcessor, fuse_self_attention
from test_cli import sdbridge
from test_compiled_backend import CountingBackend, _config, _frames, _show
from test_kv_cache import unet_on_cached_kv

SIZE = 64


def _tiny():
    return random_components("tiny", dtype=torch.float32, device="cpu", seed=0)


def _storage_bytes(module: torch.nn.Module) -> int:
    storages = {param.untyped_storage().data_ptr(): param.untyped_storage().nbytes() for param in module.parameters()}
    return sum(storages.values())


def _inputs():
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(3, 77, 32, generator=generator)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    return latents, torch.tensor([999, 500, 20]), embeds


@torch.no_grad()
def _unet_and_its_output():
    """A tiny UNet of its own, its inputs (latents, timesteps, embeddings) and its output on them."""
    unet = _tiny().unet
    latents, timesteps, embeds = _inputs()
    return unet, (latents, timesteps, embeds), unet(latents, timesteps, encoder_hidden_states=embeds).sample


@torch.no_grad()
def test_the_fused_projection_gives_the_three_projections_output_and_keeps_no_second_copy():
    unet, (latents, timesteps, embeds), plain = _unet_and_its_output()
    bytes_before = _storage_bytes(unet)
    self_attention = [module for name, module in unet.named_modules() if name.endswith("attn1")]

    assert fuse_self_attention(unet) == len(self_attention) == 4  # down, mid and two in the up block
    assert all(isinstance(attn.processor, _FusedSelfAttnProcessor) for attn in self_attention)
    assert not any(isinstance(module.processor, _FusedSelfAttnProcessor)  # cross-attention is left as it was
                   for name, module in unet.named_modules() if name.endswith("attn2"))
    fused = unet(latents, timesteps, encoder_hidden_states=embeds).sample
    assert (fused - plain).abs().max().item() <= 1e-5

    attn = self_attention[0]
    rows = attn.to_q.out_features
    weight = attn.processor.weight
    assert weight.shape == (3 * rows, attn.to_q.in_features)
    for index, layer in enumerate((attn.to_q, attn.to_k, attn.to_v)):  # views of the fused weight, its rows in order
        assert layer.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
        assert torch.equal(layer.weight, weight[index * rows:(index + 1) * rows])
    assert _storage_bytes(unet) == bytes_before  # the three layers' own copies were released

    processors = [attn.processor for attn in self_attention]
    assert fuse_self_attention(unet) == 4  # fusing again changes nothing
    assert [attn.processor for attn in self_attention] == processors


@torch.no_grad()
def test_fused_self_attention_with_the_prompt_kv_cache_and_the_unfused_fallback():
    unet = _tiny().unet
    latents, timesteps, embeds = _inputs()
    plain = unet(latents, timesteps, encoder_hidden_states=embeds).sample
    fuse_self_attention(unet)
    both = unet_on_cached_kv(unet, CrossAttentionCache.install(unet), latents, timesteps, embeds)
    assert (both - plain).abs().max().item() <= 1e-5

    # a call the fused processor does not take (a mask) runs the processor it replaced, on the same weights
    attn = next(module for name, module in unet.named_modules() if name.endswith("attn1"))
    hidden = torch.randn(2, 64, attn.to_q.in_features, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 1, 64)
    assert isinstance(attn.processor.fallback, AttnProcessor2_0)
    masked = attn(hidden, attention_mask=mask)
    reference = AttnProcessor2_0()(attn, hidden, attention_mask=mask)
    assert torch.equal(masked, reference)
    assert (masked - attn(hidden)).abs().max().item() <= 1e-5  # a zero additive mask changes nothing


def test_the_engine_with_fused_projections_gives_the_unfused_engine_frames():
    frames = [torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    outputs = []
    for fuse_qkv in (False, True):
        config = StreamConfig(width=SIZE, height=SIZE, device="cpu", cfg_type="full", guidance_scale=2.0,
                              t_index_list=(20, 40))
        engine = StreamDiffusion(_tiny(), config, backend_options={"fuse_qkv": fuse_qkv})
        assert engine.backend.fused_qkv_layers == (4 if fuse_qkv else 0)
        engine.set_prompt("a harbour", negative_prompt="rain")
        outputs.append([engine(frame) for frame in frames])
    for plain, fused in zip(*outputs):
        assert (plain - fused).abs().max().item() <= 1e-5


def test_the_compiled_backend_traces_the_fused_processor_whole_and_never_recompiles_in_a_show():
    """fullgraph=True: a graph break in the processor would fail the compilation."""
    counter = CountingBackend()
    config = _config(cfg_type="self")
    engine = StreamDiffusion(_tiny(), config, backend="compiled",
                             backend_options={"compile_backend": counter, "fuse_qkv": True})
    engine.set_prompt("a harbour", "rain")
    assert engine.backend.fused_qkv_layers == 4
    compiled_at_start = counter.count
    reference = StreamDiffusion(_tiny(), config)  # eager, unfused, its own model of the same weights
    reference.set_prompt("a harbour", "rain")
    frames = _frames(3)
    outputs, expected = _show(engine, frames), _show(reference, frames)
    assert counter.count == compiled_at_start, "a setting change recompiled"
    assert max((out - ref).abs().max().item() for out, ref in zip(outputs, expected)) <= 1e-4


def test_fp8_and_fused_projections_are_refused_together():
    with pytest.raises(ValueError, match="fp8 and fuse_qkv cannot be combined"):
        StreamDiffusion(_tiny(), StreamConfig(width=SIZE, height=SIZE, device="cpu"),
                        backend_options={"fp8": True, "fuse_qkv": True})


@pytest.mark.slow
def test_bench_fuse_qkv_reports_the_fused_layers(tmp_path):
    out = tmp_path / "bench.json"
    result = sdbridge("bench", "--arch", "tiny", "--steps", "1", "--width", "64", "--height", "64", "--frames", "4",
                      "--warmup", "1", "--device", "cpu", "--fuse-qkv", "--json", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    [run] = json.loads(out.read_text())
    assert run["fuse_qkv"] is True and run["fused_qkv_layers"] == 4
    assert "eager/qkv" in result.stdout


def test_sdbridge_run_fuse_qkv_runs_the_show_and_says_so(tmp_path):
    """The flag, and `fuse_qkv = true` in the TOML file, through a whole (short) run."""
    flags = ["run", "--source", "testpattern", "--sink", "null", "--model", "random:tiny", "--width", "64",
             "--height", "64", "--device", "cpu", "--no-status", "--no-osc", "--frames", "3"]
    config = tmp_path / "show.toml"
    config.write_text("fuse_qkv = true\n")
    for extra in (["--fuse-qkv"], ["--config", str(config)]):
        result = sdbridge(*flags, *extra, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "(64x64, eager+fused qkv)" in result.stderr
        assert "3 processed" in result.stdout


@pytest.mark.parametrize("settings, message", [
    ({"fuse_qkv": True, "backend": "tensorrt"}, "fuse_qkv: the tensorrt backend runs its built engines"),
    ({"fuse_qkv": True, "fp8": True}, "fuse_qkv and fp8 cannot be combined"),
])
def test_run_settings_refuse_fuse_qkv_where_it_cannot_apply(settings, message):
    from bridge.settings import RunSettings

    with pytest.raises(ValueError, match=message):
        RunSettings(sink=("null",), **settings)


def test_compiled_fuses_by_default_on_cuda_only_and_an_explicit_choice_stands():
    """fuse_qkv and fuse_math are on by default for a UNet on CUDA, where an H200 measured them
    (sd-turbo 169.7 -> 175.7 fps), and off on a CPU; fuse_qkv's default gives way to fp8."""
    from pipeline.backends.compiled import fusions

    defaults = functools.partial(fusions, fuse_qkv=None, fuse_math=None)
    assert defaults(on_cuda=True, fp8=False, cuda_graphs="step") == (True, True)
    assert defaults(on_cuda=True, fp8=False, cuda_graphs="off") == (True, True)
    assert defaults(on_cuda=True, fp8=False, cuda_graphs="modules") == (True, False)  # never run beside cudagraph trees
    assert defaults(on_cuda=True, fp8=True, cuda_graphs="step") == (False, True)
    assert defaults(on_cuda=False, fp8=False, cuda_graphs="step") == (False, False)
    assert fusions(on_cuda=True, fp8=False, cuda_graphs="step", fuse_qkv=False, fuse_math=False) == (False, False)
    assert fusions(on_cuda=False, fp8=False, cuda_graphs="modules", fuse_qkv=True, fuse_math=True) == (True, True)
    engine = StreamDiffusion(_tiny(), _config(), backend="compiled",
                             backend_options={"compile_backend": CountingBackend()})
    assert engine.backend.fused_qkv_layers == 0 and not engine._math.fused  # the tests' CPU


def test_run_passes_the_fusion_default_on_and_a_no_flag_through():
    """`sdbridge run` leaves the choice to the backend unless told: --no-fuse-qkv and --no-fuse-math
    reach the compiled backend as False (and eager, as a fallback, gets no fuse_math)."""
    from bridge.cli import build_parser
    from bridge.engine import _options
    from bridge.settings import RunSettings

    assert _options(RunSettings(sink=("null",), backend="compiled"), "compiled") is None
    args = build_parser().parse_args(["run", "--sink", "null", "--backend", "compiled", "--no-fuse-qkv",
                                      "--no-fuse-math"])
    assert (args.fuse_qkv, args.fuse_math) == (False, False)
    settings = RunSettings(sink=("null",), backend="compiled", backend_fallback="eager", fuse_qkv=False,
                           fuse_math=False)
    assert _options(settings, "compiled") == {"fuse_qkv": False, "fuse_math": False}
    assert _options(settings, "eager") == {"fuse_qkv": False}
    assert build_parser().parse_args(["run", "--sink", "null"]).fuse_qkv is None


@torch.no_grad()
def test_an_fp8_copy_of_a_fused_unet_gets_its_three_projections_back_in_fp8():
    """fp8 after fuse_qkv on a shared model (another engine fused it): the fp8 copy separates
    the projections again, so they convert like the rest; the shared UNet stays fused."""
    from pipeline.attention import unfuse_self_attention
    from pipeline.fp8 import Fp8Linear, fp8_unet

    plain_unet, (latents, timesteps, embeds), plain = _unet_and_its_output()
    unfused_copy, unfused_count = fp8_unet(plain_unet)
    fused_unet = _tiny().unet
    fuse_self_attention(fused_unet)
    converted, count = fp8_unet(fused_unet)
    assert count == unfused_count
    assert all(isinstance(attn.processor, _FusedSelfAttnProcessor)  # the shared model as it was
               for name, attn in fused_unet.named_modules() if name.endswith("attn1"))
    for name, attn in converted.named_modules():
        if name.endswith("attn1"):
            assert not isinstance(attn.processor, _FusedSelfAttnProcessor)
            assert all(isinstance(layer, Fp8Linear) for layer in (attn.to_q, attn.to_k, attn.to_v))
    out = converted(latents, timesteps, encoder_hidden_states=embeds).sample
    reference = unfused_copy(latents, timesteps, encoder_hidden_states=embeds).sample
    assert torch.equal(out, reference)  # the same fp8 model as one made from the unfused UNet
    assert (out - plain).abs().mean().item() < 0.05  # and close to the 32-bit one
    assert unfuse_self_attention(converted) == 0  # nothing left fused


@torch.no_grad()
def test_unfusing_gives_back_separate_weights_and_the_same_output():
    from pipeline.attention import unfuse_self_attention

    unet, (latents, timesteps, embeds), plain = _unet_and_its_output()
    bytes_before = _storage_bytes(unet)
    fuse_self_attention(unet)
    assert unfuse_self_attention(unet) == 4
    attn = next(module for name, module in unet.named_modules() if name.endswith("attn1"))
    assert attn.to_q.weight.untyped_storage().data_ptr() != attn.to_k.weight.untyped_storage().data_ptr()
    assert _storage_bytes(unet) == bytes_before
    assert (unet(latents, timesteps, encoder_hidden_states=embeds).sample - plain).abs().max().item() <= 1e-5
