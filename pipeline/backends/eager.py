"""The eager backend: the diffusers modules called as they are, in inference mode.

On CUDA the stream captures its whole per-frame step, these same eager kernels, in one CUDA graph
by default (`cuda_graphs="step"`, pipeline/step_graph.py): no compilation, a capture of a fraction
of a second at start, and one launch per frame instead of a thousand or so (the plain eager step
is bound by the CPU launching them: 30.7 fps for sd-turbo at 512x512 on an H200, 75.2 with the
graph, the same frames bit for bit; bench/results/h200_*). What a graph reads must stay where it
is, so the prompt then goes through static conditioning buffers that `prepare` refreshes in place
(the compiled backend always uses them: its compiled graphs read them too). `cuda_graphs="off"`
runs the modules one by one, as on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import CrossAttentionCache, LayerKV, fuse_self_attention
from ..errors import BackendUnavailable
from ..fp8 import fp8_unet, fp8_unavailable_reason
from ..models import Components
from ..step_math import PLAIN


@dataclass(frozen=True)
class Conditioning:
    """The prompt side of one UNet batch layout: embeddings and, with the cache, their K/V."""

    embeds: torch.Tensor  # (B, tokens, D)
    kv: list[LayerKV] | None  # per cross-attention layer, or None without the cache


EAGER_CUDA_GRAPH_MODES = ("off", "step")


def eager_cuda_graphs(requested: str | None, *, on_cuda: bool) -> str:
    """What runs: the whole step in one CUDA graph ("step", CUDA's default) or none ("off": a
    CPU, or asked for). `requested`: the user's choice, None for the default."""
    if requested is not None and requested not in EAGER_CUDA_GRAPH_MODES:
        raise ValueError(f"backend_options: cuda_graphs {requested!r} must be one of "
                         f"{', '.join(EAGER_CUDA_GRAPH_MODES)} for the eager backend ('modules' needs 'compiled')")
    if not on_cuda:
        return "off"  # CUDA graphs need CUDA
    return "step" if requested is None else requested


class StaticPrompt:
    """Static prompt buffers, one set per UNet batch size, for a backend whose UNet a CUDA graph
    runs: a graph reads the prompt where it was at capture, so a new prompt is copied into these
    buffers (`prepare`, before a replay) instead of arriving as new tensors. A backend sets
    `step_graphs` and fills `_static` and `_copied_from` with empty dicts."""

    step_graphs: str | None = None  # "cuda" when the stream should capture its whole step in one CUDA graph

    def prepare(self, cond: Conditioning) -> None:
        """Called with the Conditioning of every UNet batch layout before a step graph's replay:
        copies a new prompt into the static buffers the graph reads (outside the graph)."""
        if self._static_prompt:
            with torch.inference_mode():
                self._static_conditioning(cond)

    @property
    def _static_prompt(self) -> bool:
        """Whether the UNet reads the prompt through the static buffers (a graph reads them)."""
        return self.step_graphs is not None

    def _static_conditioning(self, cond: Conditioning) -> Conditioning:
        """This batch size's static buffers holding `cond`'s values (copied only when `cond` is new)."""
        rows = cond.embeds.shape[0]
        if self._copied_from.get(rows) is cond:  # every frame but the first after a prompt change
            return self._static[rows]
        static = self._static.get(rows)
        if static is not None and _shapes(static) == _shapes(cond):
            for buffer, source in zip(conditioning_tensors(static), conditioning_tensors(cond)):
                buffer.copy_(source)
        else:  # the first Conditioning of this batch size: its copies become the buffers
            static = self._static[rows] = self._new_buffers(cond)
        self._copied_from[rows] = cond  # held, so its identity cannot be reused by another object
        return static

    def _new_buffers(self, cond: Conditioning) -> Conditioning:
        kv = None if cond.kv is None else [LayerKV(layer.key.clone(), layer.value.clone()) for layer in cond.kv]
        return Conditioning(cond.embeds.clone(), kv)


class EagerBackend(StaticPrompt):
    """`denoise(x_t, t, cond) -> model output`, `encode(images) -> latents`, `decode(latents) -> images`."""

    name = "eager"
    step_math = PLAIN  # the stream's arithmetic between the modules, as written (pipeline/step_math.py)

    def __init__(self, components: Components, *, kv_cache: bool = True, cuda_graphs: str | None = None,
                 fp8: bool = False, fp8_scaling: str = "row", channels_last: bool = False,
                 fuse_qkv: bool = False) -> None:
        """`cuda_graphs`: "step" (CUDA's default: the stream captures its whole step in one CUDA
        graph; see the module docstring) or "off" (the modules as they are; always on a CPU).
        `fp8`: the UNet's transformer layers multiply in fp8 (a copy of the UNet that shares its
        other weights; see pipeline/fp8.py), their inputs scaled per row ("row", the default) or
        per tensor ("tensor"): `fp8_scaling`.
        `channels_last`: the UNet's and the VAE's weights in channels_last (NHWC), the layout
        tensor-core convolutions want; the compiled backend does this on CUDA always. Opt-in here
        until measured on a GPU (`sdbridge bench --channels-last`). It changes the shared modules.
        `fuse_qkv`: each self-attention layer's query, key and value from one projection
        (pipeline/attention.py); off here until measured with eager on a GPU (the compiled backend's
        default on CUDA, where it paid: `sdbridge bench --fuse-qkv`). It
        changes the shared UNet (its results stay those of the three projections)."""
        on_cuda = next(components.unet.parameters()).device.type == "cuda"
        self.cuda_graphs = eager_cuda_graphs(cuda_graphs, on_cuda=on_cuda)  # what runs
        self.unet = components.unet
        self.fp8_layers = 0  # UNet linear layers in fp8
        if fp8 and fuse_qkv:
            raise ValueError("backend_options: fp8 and fuse_qkv cannot be combined (fp8 scales each projection "
                             "on its own); choose one")
        if fp8:
            reason = fp8_unavailable_reason(next(self.unet.parameters()).device)
            if reason is not None:
                raise BackendUnavailable(f"fp8: {reason}; run without --fp8")
            self.unet, self.fp8_layers = fp8_unet(self.unet, fp8_scaling)
        self.vae = components.vae
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        self.fused_qkv_layers = fuse_self_attention(self.unet) if fuse_qkv else 0  # self-attention layers fused
        self.cache = CrossAttentionCache.install(self.unet) if kv_cache else None
        self.latent_scale = float(getattr(self.vae.config, "scaling_factor", 1.0))
        self._vae_is_tiny = hasattr(self.vae.config, "encoder_block_out_channels")
        self.step_graphs = "cuda" if self.cuda_graphs == "step" else None
        self._static: dict[int, Conditioning] = {}  # UNet batch size -> the buffers a graph reads
        self._copied_from: dict[int, Conditioning] = {}  # UNet batch size -> the Conditioning copied in last

    def condition(self, embeds: torch.Tensor) -> Conditioning:
        """Precompute what the UNet needs of these embeddings (once per prompt and layout)."""
        kv = self.cache.compute(embeds) if self.cache is not None else None
        return Conditioning(embeds, kv)

    @torch.inference_mode()
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's prediction for latents x_t (B, 4, h, w) at timesteps t (B,)."""
        if self._static_prompt:
            cond = self._static_conditioning(cond)
        return self._unet_with(x_t, t, cond)

    def _unet_with(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet on `cond` as it is: its K/V active for this thread's call only."""
        if self.cache is not None:
            self.cache.active = cond.kv
        try:
            return self._unet_forward(x_t, t, cond.embeds)
        finally:
            if self.cache is not None:
                self.cache.active = None

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8)."""
        return self._vae_encode(images)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> (B, 3, 8h, 8w) in [-1, 1] (not clamped)."""
        return self._vae_decode(latents)

    def warmup(self, unet_batches, *, latents: torch.Tensor, embeds: torch.Tensor, images: torch.Tensor | None) -> None:
        """Prepare every UNet batch in `unet_batches` before frames flow: nothing to do when eager."""

    # The network calls themselves, without the inference-mode wrapper: what the compiled backend compiles.

    def _unet_forward(self, x_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=embeds, return_dict=False)[0]  # (B, 4, h, w)

    def _vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        if self._vae_is_tiny:
            latents = self.vae.encode(images, return_dict=False)[0]
        else:
            latents = self.vae.encode(images, return_dict=False)[0].mode()  # AutoencoderKL: the mean
        return latents * self.latent_scale  # (B, 4, H/8, W/8)

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.latent_scale, return_dict=False)[0]  # (B, 3, 8h, 8w)


def conditioning_tensors(cond: Conditioning) -> list[torch.Tensor]:
    """The embeddings, then each layer's key and value."""
    return [cond.embeds, *(tensor for layer in cond.kv or () for tensor in (layer.key, layer.value))]


def _shapes(cond: Conditioning) -> list[tuple]:
    return [(tensor.shape, tensor.dtype, tensor.device) for tensor in conditioning_tensors(cond)]
