"""Model components: the bundle the engine runs, and random-weight models of exact architectures.

`random_components("sd15")` builds the SD 1.5 UNet, CLIP ViT-L/14 text encoder and TAESD with
random weights; `"sd-turbo"` the SD 2.1 UNet (linear projections, head dims 5/10/20/20),
OpenCLIP ViT-H text encoder and TAESD; `"tiny"` a few channels of the same kinds of blocks,
fast on a CPU. The arithmetic is that of the real checkpoints; the pictures are noise. The
CLIP tokenizer is generated locally (a byte-level vocabulary without merges), so nothing is
ever downloaded.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .schedule import NoiseSchedule

log = logging.getLogger(__name__)

ARCHS = ("tiny", "sd15", "sd-turbo")


@dataclass
class Components:
    """Everything the engine needs from a model. Built by `random_components` or the loaders."""

    unet: torch.nn.Module  # diffusers UNet2DConditionModel
    vae: torch.nn.Module  # diffusers AutoencoderTiny (TAESD) or AutoencoderKL
    text_encoder: torch.nn.Module  # transformers CLIPTextModel
    tokenizer: object  # transformers CLIPTokenizer
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)  # the model's training noise schedule
    arch: str = "custom"  # "tiny", "sd15", "sd-turbo", or "custom" for loaded models
    source: str = ""  # where the weights came from, for status and logs
    live_loras: object = None  # pipeline.live_lora.LiveLoras: LoRAs whose strength changes at run time

    def to(self, device: torch.device, dtype: torch.dtype) -> "Components":
        """Move the three networks in place, eval mode, no gradients; returns self."""
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device)
            if next(module.parameters()).dtype != dtype:
                _cast(module, dtype)
            module.eval()
            module.requires_grad_(False)
        if self.live_loras is not None:
            self.live_loras.place()
        return self

    def check_fits(self, config) -> None:
        """ValueError naming what is wrong when these models cannot run `config` (a StreamConfig):
        a size that is not a multiple of what the VAE and UNet halve it by, or latent channels
        that differ between the UNet and the VAE."""
        multiple = self.vae_scale_factor * self.unet_downsampling
        for name in ("width", "height"):
            value = getattr(config, name)
            if value % multiple:
                raise ValueError(
                    f"{name}: {value} must be a multiple of {multiple} for this model "
                    f"(VAE x{self.vae_scale_factor}, UNet x{self.unet_downsampling})"
                )
        unet_channels = self.unet.config.in_channels
        vae_channels = self.vae.config.latent_channels
        if unet_channels != vae_channels:
            raise ValueError(f"model: the UNet takes {unet_channels} latent channels, the VAE makes {vae_channels}")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD's VAEs and TAESD)."""
        config = self.vae.config
        if hasattr(config, "block_out_channels"):  # AutoencoderKL
            return 2 ** (len(config.block_out_channels) - 1)
        return 2 ** (len(config.encoder_block_out_channels) - 1)  # AutoencoderTiny

    @property
    def unet_downsampling(self) -> int:
        """The latent size must be a multiple of this (2 per down block after the first)."""
        return 2 ** (len(self.unet.config.block_out_channels) - 1)


# ---------------------------------------------------------------------------------------------
# Architectures (diffusers / transformers config dictionaries of the real checkpoints)

_SD_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
)

UNET_CONFIGS = {
    "sd15": dict(_SD_UNET, cross_attention_dim=768, attention_head_dim=8),
    "sd-turbo": dict(_SD_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
    "tiny": dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=16,
        cross_attention_dim=32,
        attention_head_dim=8,
    ),
}

_CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77)
TEXT_ENCODER_CONFIGS = {
    # CLIP ViT-L/14 text tower (SD 1.x)
    "sd15": dict(
        _CLIP_COMMON, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        hidden_act="quick_gelu", projection_dim=768,
    ),
    # OpenCLIP ViT-H/14 text tower as diffusers ships it for SD 2.x (23 of 24 layers: penultimate output)
    "sd-turbo": dict(
        _CLIP_COMMON, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        hidden_act="gelu", projection_dim=512,
    ),
    "tiny": dict(
        _CLIP_COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        hidden_act="quick_gelu", projection_dim=32,
    ),
}

VAE_CONFIGS = {
    "taesd": dict(  # AutoencoderTiny's defaults are TAESD's architecture
        encoder_block_out_channels=(64, 64, 64, 64),
        decoder_block_out_channels=(64, 64, 64, 64),
        num_encoder_blocks=(1, 3, 3, 3),
        num_decoder_blocks=(3, 3, 3, 1),
        latent_channels=4,
    ),
    "tiny": dict(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    ),
}


# ---------------------------------------------------------------------------------------------
# A CLIP tokenizer generated on the spot


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_clip_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json of a byte-level CLIP tokenizer.

    Every byte, alone and word-final ("</w>"), plus the start/end tokens: 514 ids, all below
    the 49,408 of CLIP's embedding table. No merges, so words tokenize byte by byte.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: tokenizer_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}),
        encoding="utf-8",
    )
    return folder


def local_clip_tokenizer():
    """A CLIPTokenizer built from files generated here (no hub access)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="sdbridge-tokenizer-") as folder:
        write_clip_tokenizer(folder)
        return CLIPTokenizer.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _rescale_convs(module: torch.nn.Module, run, target_std: float = 1.0) -> None:
    """LSUV-style: scale each convolution, in order, so its output on `run()` has `target_std`."""
    for conv in [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]:
        seen = []
        handle = conv.register_forward_hook(lambda _m, _a, out: seen.append(out.float().std().item()))
        try:
            run()
        finally:
            handle.remove()
        if seen and seen[0] > 1e-8:
            conv.weight.mul_(target_std / seen[0])
            if conv.bias is not None:
                conv.bias.mul_(target_std / seen[0])


@torch.no_grad()
def _calibrate_vae(vae: torch.nn.Module) -> None:
    """Random TAESD weights rescaled so a picture passes through: unit-variance latents and an
    output that depends on the input instead of saturating. The architecture is unchanged."""
    generator = torch.Generator().manual_seed(0)
    picture = torch.rand((1, 3, 64, 64), generator=generator) * 2 - 1  # (1, 3, 64, 64) in [-1, 1]
    _rescale_convs(vae.encoder, lambda: vae.encoder(picture))
    latents = vae.encoder(picture)
    _rescale_convs(vae.decoder, lambda: vae.decoder(latents), target_std=0.25)
    last = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    channel_mean = vae.decoder(latents).mean(dim=(0, 2, 3))  # (3,) of 2 * conv_out - 1
    last.bias.sub_(channel_mean / 2)  # centre the output on mid-grey


def _random_networks(arch: str, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The UNet and the text encoder of `arch` with random weights, made on `device` (every
    parameter and buffer created there, so nothing is initialised on a CPU and copied)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        return UNet2DConditionModel(**UNET_CONFIGS[arch]), CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIGS[arch]))


def random_components(
    arch: str = "tiny",
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> Components:
    """Random-weight models of an exact architecture: "tiny", "sd15" or "sd-turbo"."""
    from diffusers import AutoencoderTiny

    from .config import resolve_device, resolve_dtype

    if arch not in ARCHS:
        raise ValueError(f"arch: {arch!r} must be one of {', '.join(ARCHS)}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    log.info("building random-weight %s models (seed %d)", arch, seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the CPU's generator and every CUDA device's
        # on CUDA the UNet and the text encoder are made and initialised there, not on the CPU (17 s
        # of each GPU benchmark's start for sd-turbo's 1.2 billion parameters); other random values
        unet, text_encoder = _random_networks(arch, device if device.type == "cuda" else torch.device("cpu"))
        vae = AutoencoderTiny(**VAE_CONFIGS["tiny" if arch == "tiny" else "taesd"])  # small: on the CPU
        _calibrate_vae(vae)
    components = Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=local_clip_tokenizer(),
        schedule=NoiseSchedule(),
        arch=arch,
        source=f"random:{arch}",
    )
    return components.to(device, dtype)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """`module.to(dtype)`, through torch's own `to` where the model keeps no module in fp32:
    diffusers' `to` (0.42) warns "There are modules in ... that should be kept in float32: []"
    on any cast, even with none to keep, which reads like a fault on a show's terminal."""
    if getattr(module, "_keep_in_fp32_modules", None):
        module.to(dtype=dtype)  # diffusers' warning is real there
    else:
        torch.nn.Module.to(module, dtype=dtype)
