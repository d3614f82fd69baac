"""Live LoRAs: style LoRAs whose strength changes while frames flow (an operator's fader).

A fused LoRA (`--lora`) is merged into the weights once: W = W0 + s * dW, fixed. A live one
keeps its low-rank factors (dW = scaling * B @ A, per layer) and a copy of the weights W0 of
each layer it touches; a new set of strengths writes W = W0 + sum_i s_i * dW_i into those
layers in place. The weights stay where they are, so a compiled UNet and a captured step graph,
which read them at their addresses, use the new strength on the next frame: nothing compiles or
captures again. W is rebuilt from W0 each time, so hours of fader moves never accumulate
rounding.

Cost: the copy of the touched weights (190 MiB in fp16 for a rank-16 LoRA on the 128
attention projections of SD 1.5, counted with `random_factors`) and the factors (a few MB per
LoRA); each change rewrites the touched layers (80 ms for that LoRA in fp16 on 2 CPU cores;
`sdbridge bench --lora-changes` times it on a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_LIVE_LORAS = 4  # the OSC table's slots (/sd/lora/1 .. /sd/lora/4)
MAX_LIVE_SCALE = 10.0  # as for fused LoRAs (loading.MAX_LORA_SCALE)


@dataclass(frozen=True)
class Factors:
    """One layer's LoRA: dW = scaling * (B @ A), for a linear or a convolution's weight."""

    down: torch.Tensor  # A: (r, in) for a linear layer, (r, in, kh, kw) for a convolution
    up: torch.Tensor  # B: (out, r) or (out, r, 1, 1)
    scaling: float  # lora_alpha / r (peft's scaling)


def delta_weight(factors: Factors, shape: torch.Size) -> torch.Tensor:
    """dW in float32, of the layer weight's `shape` (peft's get_delta_weight, in float32)."""
    down, up = factors.down.float(), factors.up.float()
    if down.ndim == 2:  # linear
        delta = up @ down
    elif tuple(shape[2:]) == (1, 1):  # 1x1 convolution
        delta = (up.flatten(1) @ down.flatten(1))[:, :, None, None]
    else:  # kh x kw convolution: B (1x1) applied to A's kernels
        delta = F.conv2d(down.transpose(0, 1), up).transpose(0, 1)
    if tuple(delta.shape) != tuple(shape):
        raise ValueError(f"a LoRA layer of shape {tuple(delta.shape)} does not fit a weight of {tuple(shape)}")
    return delta * factors.scaling


def check_scale(index: int, scale) -> float:
    """`scale` as a float; ValueError naming the LoRA (1-based) when it is not a finite number in range."""
    number = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)
    if not number or abs(scale) > MAX_LIVE_SCALE:
        raise ValueError(f"lora {index + 1}: scale {scale!r} must be a number in "
                         f"-{MAX_LIVE_SCALE:g}..{MAX_LIVE_SCALE:g}")
    return float(scale)


@dataclass
class _Layer:
    weight: torch.nn.Parameter  # the layer's weight, written in place
    base: torch.Tensor  # W0: its value without the live LoRAs
    factors: dict[int, Factors]  # live LoRA index -> its factors for this layer


class LiveLoras:
    """The live LoRAs of one model: their names, strengths and the layers they touch.

    Built by the loader (pipeline.loading) from each LoRA's factors per module path of the
    UNet ("unet") and the text encoder ("text_encoder"); `set_scales` rewrites the weights."""

    def __init__(self, names: list[str], scales: list[float],
                 factors: list[dict[tuple[str, str], Factors]], models: dict[str, torch.nn.Module]) -> None:
        """`factors[i]`: LoRA i's factors by (model, module path); `models`: "unet" and
        "text_encoder" -> the module, after it moved to its device and dtype."""
        if not names or len(names) > MAX_LIVE_LORAS:
            raise ValueError(f"live loras: {len(names)} given; from 1 to {MAX_LIVE_LORAS} can be live")
        if not len(names) == len(scales) == len(factors):
            raise ValueError(f"live loras: {len(names)} names, {len(scales)} scales and {len(factors)} factor sets")
        self.names = list(names)
        self.scales = [check_scale(index, scale) for index, scale in enumerate(scales)]
        self._layers: dict[tuple[str, str], _Layer] = {}
        for index, per_layer in enumerate(factors):
            for (model, path), layer_factors in per_layer.items():
                layer = self._layers.get((model, path))
                if layer is None:
                    weight = models[model].get_submodule(path).weight
                    layer = self._layers[(model, path)] = _Layer(weight, weight.detach().clone(), {})
                delta_weight(layer_factors, layer.weight.shape)  # refuse a misfit now, not mid-show
                layer.factors[index] = Factors(
                    layer_factors.down.to(layer.weight.device, torch.float32),
                    layer_factors.up.to(layer.weight.device, torch.float32), layer_factors.scaling,
                )
        self.text_encoder = any(model == "text_encoder" for model, _ in self._layers)
        self._write(range(len(self.names)))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def layers(self) -> int:
        """How many layers the live LoRAs touch."""
        return len(self._layers)

    @property
    def kept_bytes(self) -> int:
        """Memory held for them: the touched weights' copies and the factors."""
        total = 0
        for layer in self._layers.values():
            total += layer.base.numel() * layer.base.element_size()
            for f in layer.factors.values():
                total += (f.down.numel() + f.up.numel()) * 4
        return total

    def place(self) -> None:
        """Keep the copies and factors where the weights are (after the model moved: Components.to)."""
        for layer in self._layers.values():
            weight = layer.weight
            if (layer.base.device, layer.base.dtype) != (weight.device, weight.dtype):
                layer.base = layer.base.to(weight.device, weight.dtype)
            for index, f in layer.factors.items():
                if f.down.device != weight.device:
                    layer.factors[index] = Factors(f.down.to(weight.device), f.up.to(weight.device), f.scaling)

    def set_scales(self, scales: dict[int, float]) -> bool:
        """New strengths by index (0-based), written into the weights; whether the text encoder's
        weights changed (its prompts must be encoded again). ValueError naming the LoRA when an
        index or a scale is wrong; then nothing changes."""
        checked = {}
        for index, scale in scales.items():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.names):
                raise ValueError(f"lora {index + 1 if isinstance(index, int) else index!r}: there is no such live "
                                 f"LoRA ({len(self.names)} loaded)")
            checked[index] = check_scale(index, scale)
        changed = [index for index, scale in checked.items() if scale != self.scales[index]]
        previous = list(self.scales)
        for index in changed:
            self.scales[index] = checked[index]
        try:
            return self._write(changed)
        except BaseException:  # (out of memory half-way): the layers written so far are put back too
            self.scales = previous
            self._write(changed)
            raise

    @torch.no_grad()
    def _write(self, changed) -> bool:
        """Rewrite every layer that one of the `changed` LoRAs touches; whether one is the text encoder's."""
        changed = set(changed)
        text_encoder, on_cuda = False, None
        for (model, _), layer in self._layers.items():
            if not changed & layer.factors.keys():
                continue
            value = layer.base.to(torch.float32, copy=True)
            for index, factors in layer.factors.items():
                if self.scales[index] != 0.0:
                    value = value.add_(delta_weight(factors, layer.weight.shape), alpha=self.scales[index])
            layer.weight.copy_(value)
            if model == "text_encoder":
                text_encoder = True
                on_cuda = layer.weight.device if layer.weight.is_cuda else on_cuda
        if on_cuda is not None:  # the text encoder's graph runs on a stream of its own: written before it reads
            torch.cuda.current_stream(on_cuda).synchronize()
        return text_encoder


def peft_factors(model: torch.nn.Module, adapter: str, *, lora_name: str) -> dict[str, Factors]:
    """The factors of `adapter` in each of `model`'s peft LoRA layers (loaded, not merged), by the
    module path its base layer keeps once the adapter is unloaded. ValueError for a kind of LoRA
    a live strength cannot reproduce (DoRA, a LoRA with a bias, grouped convolutions)."""
    found = {}
    for path, module in model.named_modules():
        down = getattr(module, "lora_A", None)
        if not isinstance(down, torch.nn.ModuleDict) or adapter not in down:
            continue
        base = module.get_base_layer()
        unsupported = (
            "DoRA" if getattr(module, "use_dora", {}).get(adapter) else
            "a bias" if getattr(module.lora_B[adapter], "bias", None) is not None else
            "grouped convolutions" if getattr(base, "groups", 1) != 1 else
            "fan_in_fan_out" if getattr(module, "fan_in_fan_out", False) else None
        )
        if unsupported:
            raise ValueError(f"live lora {lora_name!r}: its layer {path} uses {unsupported}, which a live "
                             "strength cannot reproduce; fuse it with --lora instead")
        found[path] = Factors(down[adapter].weight.detach().clone(), module.lora_B[adapter].weight.detach().clone(),
                              float(module.scaling[adapter]))
    return found


ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")  # what most style LoRAs of SD 1.x/2.x train


def random_factors(unet: torch.nn.Module, *, rank: int = 16, seed: int = 0,
                   targets: tuple[str, ...] = ATTENTION_PROJECTIONS) -> dict[tuple[str, str], Factors]:
    """A random LoRA of `rank` on each of `unet`'s linear layers named `targets` (the attention
    projections by default), as LiveLoras takes it: for benchmarks of random-weight models, whose
    changes cost what a trained LoRA's of that rank and those layers cost."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for path, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear) or not any(path.endswith("." + name) for name in targets):
            continue
        down = torch.randn(rank, module.in_features, generator=generator) / module.in_features ** 0.5
        up = torch.randn(module.out_features, rank, generator=generator) * 0.02
        factors[("unet", path)] = Factors(down, up, 1.0)
    return factors
