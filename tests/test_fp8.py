"""fp8 linear layers (pipeline/fp8.py) on the CPU, where torch's reference _scaled_mm runs: the
arithmetic against fp32, which layers convert, that the shared UNet is left alone, the engine
end to end, and the clear refusal where a GPU has no fp8."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from pipeline import BackendUnavailable, StreamConfig, StreamDiffusion
from pipeline.fp8 import FP8, Fp8Linear, convertible, fp8_unavailable_reason, fp8_unet, quantize

from test_cli import sdbridge


def test_quantize_keeps_two_significant_digits_and_the_range():
    tensor = torch.randn(64, 48, generator=torch.Generator().manual_seed(1)) * 3.0
    quantized, scale = quantize(tensor)
    assert quantized.dtype == FP8 and scale.dtype == torch.float32 and scale.ndim == 0
    restored = quantized.float() * scale
    assert restored.abs().max().item() == pytest.approx(tensor.abs().max().item(), rel=1e-6)  # the largest maps to 448
    assert ((restored - tensor).abs() <= 0.0625 * tensor.abs() + 1e-3 * scale * 448).all()  # e4m3: 3 mantissa bits


def test_quantize_by_rows_gives_each_row_its_own_range():
    tensor = torch.randn(8, 48, generator=torch.Generator().manual_seed(2)) * torch.logspace(-3, 3, 8).reshape(8, 1)
    quantized, scale = quantize(tensor, rows=True)
    assert quantized.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (8, 1)
    restored = quantized.float() * scale
    assert torch.allclose(restored.abs().amax(dim=1), tensor.abs().amax(dim=1), rtol=1e-6)  # each row's largest -> 448
    assert ((restored - tensor).abs() <= 0.0625 * tensor.abs() + 1e-3 * scale * 448).all()
    # one scale for the whole tensor loses the small rows: their values fall below e4m3's smallest
    whole, whole_scale = quantize(tensor)
    small_row_error = ((whole[0].float() * whole_scale - tensor[0]).abs().max() / tensor[0].abs().max()).item()
    assert small_row_error > 0.5 and ((restored[0] - tensor[0]).abs().max() / tensor[0].abs().max()).item() < 0.07


@pytest.mark.parametrize("scaling", ["row", "tensor"])
@pytest.mark.parametrize("rows", [32, 77])  # aligned rows use _scaled_mm; 77 runs the dequantized weight
def test_fp8_linear_is_close_to_the_linear_it_replaces(rows, scaling, monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96)
    layer = Fp8Linear(linear, scaling=scaling)
    assert layer.weight_scale.shape == ((1, 96) if scaling == "row" else ())  # _scaled_mm's scale_b
    calls = []
    scaled_mm = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(a[0].shape) or scaled_mm(*a, **k))
    x = torch.randn(1, rows, 64)
    expected, got = linear(x), layer(x)
    assert got.shape == expected.shape == (1, rows, 96) and got.dtype == x.dtype
    error = (got - expected).abs().max() / expected.abs().max()
    assert error < 0.05, f"relative error {error:.4f}"
    assert calls == ([(rows, 64)] if rows % 16 == 0 else [])
    assert layer.weight.dtype == FP8 and torch.equal(layer.bias, linear.bias)


def test_an_fp8_linear_returning_bfloat16_casts_back():
    """Some GPUs' row-scaled kernels return bfloat16 only (kernel_settings then asks for it): the
    layer hands back the input's dtype all the same."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32).to(torch.float16)
    layer = Fp8Linear(linear, out_dtype=torch.bfloat16)
    x = torch.randn(16, 64).to(torch.float16)
    out = layer(x)
    x_q, x_scale = layer.quantized_rows(x)
    in_bfloat16 = torch._scaled_mm(x_q, layer.weight.t(), scale_a=x_scale, scale_b=layer.weight_scale,
                                   out_dtype=torch.bfloat16)
    assert out.dtype == torch.float16 and torch.equal(out, in_bfloat16.to(torch.float16) + layer.bias)
    assert ((out.float() - linear(x).float()).abs().max() / linear(x).float().abs().max()) < 0.05


def test_kernel_settings_on_a_cpu_and_a_refused_fp8_scaling(tiny_components):
    from pipeline.fp8 import kernel_settings

    assert kernel_settings(torch.device("cpu"), torch.float32, "row") == (None, False)  # the input's dtype, exact sums
    with pytest.raises(ValueError, match="fp8_scaling must be one of row, tensor, not 'block'"):
        fp8_unet(tiny_components.unet, "block")
    with pytest.raises(ValueError, match="fp8 scaling must be one of row, tensor, not 'channel'"):
        Fp8Linear(torch.nn.Linear(16, 16), scaling="channel")


def test_a_transposed_input_is_quantized_row_major():
    """On CUDA torch._scaled_mm refuses a first operand that is not row-major ("self must be
    row_major"), which the channels_last UNet's transformer blocks hand the layer (seen on an
    H200). The CPU's kernel takes any layout, so the operand the layer makes is checked."""
    torch.manual_seed(0)
    layer = Fp8Linear(torch.nn.Linear(64, 96))
    x = torch.randn(1, 64, 32).transpose(1, 2)  # (1, 32 rows, 64): each row strided, as from an NCHW map
    assert not x.reshape(32, 64).is_contiguous()
    x_q, scale = layer.quantized_rows(x)
    assert x_q.shape == (32, 64) and x_q.dtype == FP8 and x_q.is_contiguous()
    assert scale.shape == (32, 1)
    assert torch.equal(x_q.float() * scale, quantize(x.reshape(32, 64), rows=True)[0].float() * scale)
    assert torch.equal(layer(x), layer(x.contiguous()))


def test_only_the_transformer_layers_convert_and_the_shared_unet_is_untouched(tiny_components):
    unet = tiny_components.unet
    before = {name: type(module) for name, module in unet.named_modules()}
    weights = {name: p.clone() for name, p in unet.named_parameters()}
    converted, count = fp8_unet(unet)
    assert {name: type(module) for name, module in unet.named_modules()} == before
    assert all(torch.equal(weights[name], p) for name, p in unet.named_parameters())
    fp8_names = {name for name, module in converted.named_modules() if isinstance(module, Fp8Linear)}
    assert len(fp8_names) == count > 0
    assert all(".attentions." in f".{name}" for name in fp8_names)
    assert not any(name.endswith(("attn2.to_k", "attn2.to_v")) for name in fp8_names)  # the K/V cache's, once per prompt
    assert any(name.endswith("attn1.to_q") for name in fp8_names) and any(name.endswith("ff.net.2") for name in fp8_names)
    assert not convertible("time_embedding.linear_1", torch.nn.Linear(32, 32))
    assert not convertible("down_blocks.0.attentions.0.proj_in", torch.nn.Linear(40, 32))  # not a multiple of 16


def _storages(module: torch.nn.Module) -> dict[int, int]:
    """data pointer -> bytes of every tensor storage a module's parameters and buffers use."""
    tensors = [*module.parameters(), *module.buffers()]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


@pytest.mark.parametrize("fused", [False, True])
def test_the_fp8_copy_costs_only_its_fp8_weights(tiny_components, fused):
    """The copy shares every tensor of the model but the layers it converts: its new memory is
    exactly the Fp8Linear buffers (a fused model's shared q/k/v tensor included)."""
    from pipeline import random_components
    from pipeline.attention import fuse_self_attention

    unet = random_components("tiny", dtype=torch.float32, device="cpu", seed=0).unet if fused else tiny_components.unet
    if fused:
        fuse_self_attention(unet)
    original = _storages(unet)
    converted, count = fp8_unet(unet)
    new = {ptr: size for ptr, size in _storages(converted).items() if ptr not in original}
    fp8_buffers = {}
    for module in converted.modules():
        if isinstance(module, Fp8Linear):
            fp8_buffers.update(_storages(module))
    assert count > 0 and new == fp8_buffers
    assert sum(new.values()) < sum(original.values()) / 2
    assert all(p.untyped_storage().data_ptr() in original for p in converted.parameters())


def test_an_fp8_engine_runs_end_to_end_close_to_the_fp32_one(tiny_components):
    config = StreamConfig(width=64, height=64, device="cpu", t_index_list=(20, 40), cfg_type="self", guidance_scale=1.4)
    plain = StreamDiffusion(tiny_components, config)
    fp8 = StreamDiffusion(tiny_components, config, backend_options={"fp8": True})
    assert fp8.backend.fp8_layers > 0 and plain.backend.fp8_layers == 0
    rng = np.random.default_rng(0)
    diffs = []
    for prompt in ("a city at night", "a forest"):
        for engine in (plain, fp8):
            engine.set_prompt(prompt)
        for _ in range(3):
            frame = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            diffs.append(np.abs(plain(frame).astype(int) - fp8(frame).astype(int)))
    assert np.mean([d.mean() for d in diffs]) < 4.0  # measured about 1/255 on this random model
    assert max(d.max() for d in diffs) < 64


def test_status_says_fp8(tiny_components):
    from bridge.engine import backend_label

    engine = StreamDiffusion(tiny_components, StreamConfig(width=32, height=32, device="cpu"), backend_options={"fp8": True})
    assert backend_label(engine) == "eager+fp8"


def test_a_gpu_without_fp8_is_refused_with_the_reason(tiny_components, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    reason = fp8_unavailable_reason(torch.device("cuda"))
    assert reason == "NVIDIA GeForce RTX 3090 has compute capability 8.6; fp8 needs 8.9 or newer (Ada, Hopper)"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_unavailable_reason(torch.device("cuda")) is None
    assert fp8_unavailable_reason(torch.device("cpu")) is None
    assert "not on mps" in fp8_unavailable_reason(torch.device("mps"))
    # the engine's own check, on a device fp8 does not run on (a UNet on the meta device: no memory, no GPU)
    from pipeline.backends import EagerBackend

    on_meta = dataclasses.replace(tiny_components, unet=copy.deepcopy(tiny_components.unet).to("meta"))
    with pytest.raises(BackendUnavailable, match=r"fp8: fp8 runs on CUDA \(and on the CPU for tests\), not on meta; "
                                                 r"run without --fp8"):
        EagerBackend(on_meta, fp8=True)


def test_run_fp8_flag_reaches_the_engine_and_is_refused_for_tensorrt(tmp_path):
    from bridge.engine import _options
    from bridge.settings import RunSettings

    assert _options(RunSettings(sink=("null",), fp8=True), "eager") == {"fp8": True}
    assert _options(RunSettings(sink=("null",), fp8=True, backend="compiled", cuda_graphs="off"), "compiled") == {
        "fp8": True, "cuda_graphs": "off"}
    result = sdbridge("run", "--sink", "null", "--backend", "tensorrt", "--fp8", timeout=60)
    assert result.returncode == 2
    assert "fp8: the tensorrt backend runs its engines' own precision" in result.stderr
