"""The prompt's cross-attention keys and values, computed once per prompt (StreamDiffusion sec. 3.4).

The prompt is the same for every frame, so each cross-attention layer's K = W_k c and
V = W_v c are constant between prompt changes. `CrossAttentionCache.install(unet)` gives
every cross-attention layer a processor that takes its K/V from the cache when one is
active and falls back to computing them otherwise. StreamDiffusion's code lists this cache
in the paper but does not have it.

`fuse_self_attention(unet)` (the backends' `fuse_qkv` option) gives every plain self-attention
layer one (3 x inner, dim) projection for its query, key and value instead of three: one larger
matrix multiplication reading the hidden states once, where the three small ones (4,096 x 320 by
320 x 320 at 512x512) leave much of a big GPU idle. The three layers' weights become views of
the fused one, so it costs no memory and the unfused path (a mask, a 4-d input) still works.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LayerKV:
    key: torch.Tensor  # (B, heads, tokens, head_dim)
    value: torch.Tensor  # (B, heads, tokens, head_dim)


def _supported(attn) -> bool:
    """The cached path reproduces plain SDPA cross-attention; anything unusual keeps the default."""
    return (
        getattr(attn, "is_cross_attention", False)
        and attn.spatial_norm is None
        and attn.group_norm is None
        and attn.norm_cross is None
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.residual_connection
        and float(attn.rescale_output_factor) == 1.0
    )


class _CachedCrossAttnProcessor:
    """Cross-attention with K/V from the cache (diffusers' attention processor protocol)."""

    def __init__(self, cache: "CrossAttentionCache", index: int, fallback) -> None:
        self.cache = cache
        self.index = index
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        layers = self.cache.active
        if layers is None or attention_mask is not None or hidden_states.ndim != 3:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        kv = layers[self.index]
        batch = hidden_states.shape[0]
        if kv.key.shape[0] != batch:
            raise ValueError(f"cross-attention cache holds {kv.key.shape[0]} rows, the UNet batch has {batch}")
        head_dim = kv.key.shape[-1]
        query = attn.to_q(hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, N, d)
        out = F.scaled_dot_product_attention(query, kv.key, kv.value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)  # (B, N, h*d)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class CrossAttentionCache:
    """Holds per-layer K/V for the current prompt batch; `active` is read by the processors.

    `active` is per thread: the frame thread's UNet call and a compilation on another thread
    (readying a new step count beside the frames) each see their own. dynamo guards a
    `threading.local` read per thread, so a compiled UNet checks the calling thread's value."""

    def __init__(self) -> None:
        self.layers: list = []  # the cross-attention modules, in processor index order
        self._local = threading.local()

    @property
    def active(self) -> list[LayerKV] | None:
        return getattr(self._local, "active", None)

    @active.setter
    def active(self, layers: list[LayerKV] | None) -> None:
        self._local.active = layers

    def __getstate__(self) -> dict:  # a copied UNet (fp8's) gets a cache of its own; `active` is never copied
        return {"layers": self.layers}

    def __setstate__(self, state: dict) -> None:
        self.layers = state["layers"]
        self._local = threading.local()

    @classmethod
    def install(cls, unet: torch.nn.Module) -> "CrossAttentionCache":
        """Give each supported cross-attention layer of `unet` a cache-reading processor; where
        another engine on the same UNet installed them already, its cache (which `active`, per
        thread and per call, makes any engine's), so that one engine never unhooks another's."""
        supported = [module for _, module in unet.named_modules()
                     if hasattr(module, "set_processor") and _supported(module)]
        processors = [module.processor for module in supported]
        if processors and all(isinstance(processor, _CachedCrossAttnProcessor) for processor in processors):
            installed = processors[0].cache
            if installed.layers == supported and all(processor.cache is installed for processor in processors):
                return installed
        cache = cls()
        for module in supported:
            fallback = module.processor
            if isinstance(fallback, _CachedCrossAttnProcessor):  # installed before, partly: replace, don't chain
                fallback = fallback.fallback
            module.set_processor(_CachedCrossAttnProcessor(cache, len(cache.layers), fallback))
            cache.layers.append(module)
        return cache

    @torch.inference_mode()
    def compute(self, embeds: torch.Tensor) -> list[LayerKV]:
        """K/V of every layer for prompt embeddings (B, tokens, D)."""
        batch = embeds.shape[0]
        result = []
        for attn in self.layers:
            key = attn.to_k(embeds)  # (B, tokens, h*d)
            value = attn.to_v(embeds)
            head_dim = key.shape[-1] // attn.heads
            shape = (batch, -1, attn.heads, head_dim)
            result.append(
                LayerKV(key.view(shape).transpose(1, 2).contiguous(), value.view(shape).transpose(1, 2).contiguous())
            )
        return result


def _plain_self_attention(attn) -> bool:
    """A self-attention layer the fused processor reproduces exactly: q, k and v of one width,
    no norms, extra projections or residual inside it."""
    return (
        hasattr(attn, "set_processor")
        and not getattr(attn, "is_cross_attention", True)
        and attn.spatial_norm is None
        and attn.group_norm is None
        and attn.norm_q is None
        and attn.norm_k is None
        and getattr(attn, "add_q_proj", None) is None
        and not attn.residual_connection
        and float(attn.rescale_output_factor) == 1.0
        and attn.to_q.out_features == attn.to_k.out_features == attn.to_v.out_features
        and attn.to_q.in_features == attn.to_k.in_features == attn.to_v.in_features
        and (attn.to_q.bias is None) == (attn.to_k.bias is None) == (attn.to_v.bias is None)
    )


class _FusedSelfAttnProcessor:
    """Self-attention with q, k and v from one projection (diffusers' attention processor protocol)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fallback) -> None:
        self.weight = weight  # (3 * inner, dim): to_q's rows, then to_k's, then to_v's
        self.bias = bias
        self.fallback = fallback

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or hidden_states.ndim != 3:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        batch, tokens, _ = hidden_states.shape
        head_dim = self.weight.shape[0] // (3 * attn.heads)
        qkv = F.linear(hidden_states, self.weight, self.bias)  # (B, N, 3 * h * d)
        query, key, value = qkv.view(batch, tokens, 3, attn.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(batch, tokens, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


@torch.no_grad()
def fuse_self_attention(unet: torch.nn.Module) -> int:
    """Fuse the q/k/v projections of `unet`'s plain self-attention layers, in place (see the
    module docstring); how many layers are fused. Layers fused before are left as they are."""
    fused = 0
    for _, attn in unet.named_modules():
        if not _plain_self_attention(attn):
            continue
        if isinstance(attn.processor, _FusedSelfAttnProcessor):
            fused += 1
            continue
        projections = (attn.to_q, attn.to_k, attn.to_v)
        weight = torch.cat([layer.weight for layer in projections])  # (3 * inner, dim)
        bias = None if attn.to_q.bias is None else torch.cat([layer.bias for layer in projections])
        rows = attn.to_q.out_features
        for index, layer in enumerate(projections):  # the three become views of the fused tensors: no copy kept
            layer.weight.data = weight[index * rows:(index + 1) * rows]
            if bias is not None:
                layer.bias.data = bias[index * rows:(index + 1) * rows]
        attn.set_processor(_FusedSelfAttnProcessor(weight, bias, attn.processor))
        fused += 1
    return fused


@torch.no_grad()
def unfuse_self_attention(unet: torch.nn.Module, *, own_weights: bool = True) -> int:
    """Undo `fuse_self_attention` in place: each fused layer gets back the processor it had and,
    with `own_weights`, q, k and v weights of their own (the fused tensor is then released;
    without, they stay views of it: for a copy about to replace them); how many layers."""
    unfused = 0
    for _, attn in unet.named_modules():
        processor = getattr(attn, "processor", None)
        if not isinstance(processor, _FusedSelfAttnProcessor):
            continue
        for layer in (attn.to_q, attn.to_k, attn.to_v) if own_weights else ():
            layer.weight.data = layer.weight.data.clone()
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.clone()
        attn.set_processor(processor.fallback)
        unfused += 1
    return unfused
