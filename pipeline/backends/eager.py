"""The eager backend: the diffusers modules called as they are, in inference mode."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import CrossAttentionCache, LayerKV
from ..models import Components


@dataclass(frozen=True)
class Conditioning:
    """The prompt side of one UNet batch layout: embeddings and, with the cache, their K/V."""

    embeds: torch.Tensor  # (B, tokens, D)
    kv: list[LayerKV] | None  # per cross-attention layer, or None without the cache


class EagerBackend:
    """`denoise(x_t, t, cond) -> model output`, `encode(images) -> latents`, `decode(latents) -> images`."""

    name = "eager"
    step_graphs: str | None = None  # "cuda" when the stream should capture its whole step in one CUDA graph

    def __init__(self, components: Components, *, kv_cache: bool = True) -> None:
        self.unet = components.unet
        self.vae = components.vae
        self.cache = CrossAttentionCache.install(self.unet) if kv_cache else None
        self.latent_scale = float(getattr(self.vae.config, "scaling_factor", 1.0))
        self._vae_is_tiny = hasattr(self.vae.config, "encoder_block_out_channels")

    def condition(self, embeds: torch.Tensor) -> Conditioning:
        """Precompute what the UNet needs of these embeddings (once per prompt and layout)."""
        kv = self.cache.compute(embeds) if self.cache is not None else None
        return Conditioning(embeds, kv)

    def prepare(self, cond: Conditioning) -> None:
        """Called with the Conditioning of every UNet batch layout before a step graph's replay
        (a compiled backend copies a new prompt into the buffers its graph reads); nothing here."""

    @torch.inference_mode()
    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's prediction for latents x_t (B, 4, h, w) at timesteps t (B,)."""
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
