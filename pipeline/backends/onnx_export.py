"""ONNX export of the UNet and the TAESD/VAE encoder and decoder, with static shapes.

TensorRT engines are built from these files (one per resolution and batch). The UNet takes the
prompt embeddings (the cross-attention K/V cache is a torch-side optimisation; TensorRT folds
the projections into its own kernels).
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import Components

# the TorchScript-based exporter (static shapes, what TensorRT's ONNX parser is used to): torch
# 2.5 added `dynamo` (later defaulting it to True); before, that exporter is the only one
_TORCHSCRIPT_EXPORTER = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}

log = logging.getLogger(__name__)

OPSET = 18


class UNetForExport(torch.nn.Module):
    """(sample, timestep, encoder_hidden_states) -> the UNet's prediction, as plain tensors."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class EncoderForExport(torch.nn.Module):
    """Pictures (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(getattr(vae.config, "scaling_factor", 1.0))
        self.tiny = hasattr(vae.config, "encoder_block_out_channels")

    def forward(self, images):
        encoded = self.vae.encode(images, return_dict=False)[0]
        latents = encoded if self.tiny else encoded.mode()
        return latents * self.scale


class DecoderForExport(torch.nn.Module):
    """Scaled latents (B, 4, h, w) -> pictures (B, 3, 8h, 8w) in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scale = float(getattr(vae.config, "scaling_factor", 1.0))

    def forward(self, latents):
        return self.vae.decode(latents / self.scale, return_dict=False)[0]


@dataclass(frozen=True)
class ExportShapes:
    """The static shapes one set of engines is built for."""

    width: int  # pixels
    height: int  # pixels
    frames: int  # pictures per VAE call (frame_buffer_size)
    unet_batch: int  # latents per UNet call (steps x frames, plus negative rows for CFG)

    def unet_inputs(self, components: Components, dtype: torch.dtype, device: torch.device):
        scale = components.vae_scale_factor
        embed_dim = components.unet.config.cross_attention_dim
        sample = torch.randn(self.unet_batch, 4, self.height // scale, self.width // scale, dtype=dtype, device=device)
        timestep = torch.full((self.unet_batch,), 500, dtype=torch.int64, device=device)
        embeds = torch.randn(self.unet_batch, 77, embed_dim, dtype=dtype, device=device)
        return sample, timestep, embeds

    def picture(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.rand(self.frames, 3, self.height, self.width, dtype=dtype, device=device) * 2 - 1

    def latents(self, components: Components, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        scale = components.vae_scale_factor
        return torch.randn(self.frames, 4, self.height // scale, self.width // scale, dtype=dtype, device=device)


def export_onnx(components: Components, folder: str | Path, shapes: ExportShapes) -> dict[str, Path]:
    """Write unet.onnx, vae_encoder.onnx and vae_decoder.onnx for `shapes` into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parameter = next(components.unet.parameters())
    dtype, device = parameter.dtype, parameter.device
    jobs = {
        "unet": (UNetForExport(components.unet), shapes.unet_inputs(components, dtype, device),
                 ["sample", "timestep", "encoder_hidden_states"], ["model_output"]),
        "vae_encoder": (EncoderForExport(components.vae), (shapes.picture(dtype, device),), ["images"], ["latents"]),
        "vae_decoder": (DecoderForExport(components.vae), (shapes.latents(components, dtype, device),), ["latents"], ["images"]),
    }
    paths = {}
    for name, (module, inputs, input_names, output_names) in jobs.items():
        path = folder / f"{name}.onnx"
        started = time.perf_counter()
        log.info("exporting %s to %s ...", name, path)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
            torch.onnx.export(
                module.eval(), inputs, str(path), input_names=input_names, output_names=output_names,
                opset_version=OPSET, do_constant_folding=True, **_TORCHSCRIPT_EXPORTER,
            )
        log.info("exported %s in %.1f s", name, time.perf_counter() - started)
        paths[name] = path
    return paths
