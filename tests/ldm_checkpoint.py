"""Test utility: write diffusers weights in the original Stable Diffusion (LDM) single-file layout.

Checkpoints shared on model sites keep the key names of the CompVis `ldm` code base:

    model.diffusion_model.*          the UNet (openaimodel: input_blocks / middle_block / output_blocks)
    first_stage_model.*              the AutoencoderKL (encoder.down.* / decoder.up.* / mid.block_1 ...)
    cond_stage_model.transformer.*   the CLIP ViT-L text encoder (Hugging Face CLIPTextModel names)

The mappings below are derived from the structure of both layouts. Every diffusers key must map
to exactly one LDM key; a key no rule covers raises KeyError, so an architecture feature the
mapping does not know (a different mid block, class embeddings, ...) fails loudly.
"""

from __future__ import annotations

from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

# Inside a UNet ResBlock: diffusers name -> ldm name.
_UNET_RESNET_NAMES = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
# Inside a VAE ResnetBlock only the shortcut differs.
_VAE_RESNET_NAMES = {"conv_shortcut.": "nin_shortcut."}
# Inside the VAE's mid-block attention (ldm uses 1x1 convolutions where diffusers has linears).
_VAE_ATTENTION_NAMES = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}
# A rule: (diffusers prefix, ldm prefix, renames of the remainder).
Rule = tuple[str, str, dict[str, str]]


def _unet_rules(config: dict) -> list[Rule]:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block: {layers!r} must be an int for this mapping")
    rules: list[Rule] = [
        ("time_embedding.linear_1.", "time_embed.0.", {}),
        ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}),
        ("conv_norm_out.", "out.0.", {}),
        ("conv_out.", "out.2.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET_NAMES),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET_NAMES),
    ]
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    index = 1  # input_blocks.0 is conv_in
    for block, block_type in enumerate(down_types):
        for layer in range(layers):
            rules.append((f"down_blocks.{block}.resnets.{layer}.", f"input_blocks.{index}.0.", _UNET_RESNET_NAMES))
            if "CrossAttn" in block_type:
                rules.append((f"down_blocks.{block}.attentions.{layer}.", f"input_blocks.{index}.1.", {}))
            index += 1
        if block < len(down_types) - 1:  # a downsampler is an input block of its own
            rules.append((f"down_blocks.{block}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", {}))
            index += 1
    index = 0
    for block, block_type in enumerate(up_types):
        has_attention = "CrossAttn" in block_type
        for layer in range(layers + 1):
            rules.append((f"up_blocks.{block}.resnets.{layer}.", f"output_blocks.{index}.0.", _UNET_RESNET_NAMES))
            if has_attention:
                rules.append((f"up_blocks.{block}.attentions.{layer}.", f"output_blocks.{index}.1.", {}))
            index += 1
        if block < len(up_types) - 1:  # the upsampler joins the block's last layer, after its attention
            slot = 2 if has_attention else 1
            rules.append((f"up_blocks.{block}.upsamplers.0.conv.", f"output_blocks.{index - 1}.{slot}.conv.", {}))
    return rules


def _vae_rules(config: dict) -> list[Rule]:
    rules: list[Rule] = [
        ("quant_conv.", "quant_conv.", {}),
        ("post_quant_conv.", "post_quant_conv.", {}),
    ]
    for part in ("encoder", "decoder"):
        rules += [
            (f"{part}.conv_in.", f"{part}.conv_in.", {}),
            (f"{part}.conv_out.", f"{part}.conv_out.", {}),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET_NAMES),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET_NAMES),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION_NAMES),
        ]
    blocks, layers = len(config["block_out_channels"]), config["layers_per_block"]
    for block in range(blocks):
        down, up = f"encoder.down_blocks.{block}.", f"decoder.up_blocks.{block}."
        level = blocks - 1 - block  # ldm numbers decoder levels from the highest resolution up
        for layer in range(layers):  # the decoder has one resnet more per level
            rules.append((f"{down}resnets.{layer}.", f"encoder.down.{block}.block.{layer}.", _VAE_RESNET_NAMES))
        for layer in range(layers + 1):
            rules.append((f"{up}resnets.{layer}.", f"decoder.up.{level}.block.{layer}.", _VAE_RESNET_NAMES))
        rules.append((f"{down}downsamplers.0.conv.", f"encoder.down.{block}.downsample.conv.", {}))
        rules.append((f"{up}upsamplers.0.conv.", f"decoder.up.{level}.upsample.conv.", {}))
    return rules


def _rename(key: str, rules: list[Rule]) -> str:
    matches = [rule for rule in rules if key.startswith(rule[0])]
    if len(matches) != 1:
        raise KeyError(f"{key!r}: {len(matches)} mapping rules match, expected exactly one")
    diffusers_prefix, ldm_prefix, renames = matches[0]
    rest = key[len(diffusers_prefix):]
    for old, new in renames.items():
        if rest.startswith(old):
            rest = new + rest[len(old):]
            break
    return ldm_prefix + rest


def unet_to_ldm(state_dict: dict[str, torch.Tensor], *, config: dict) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel state dict in openaimodel names (without the `model.diffusion_model.` prefix)."""
    rules = _unet_rules(config)
    return {_rename(key, rules): value for key, value in state_dict.items()}


def vae_to_ldm(state_dict: dict[str, torch.Tensor], *, config: dict) -> dict[str, torch.Tensor]:
    """An AutoencoderKL state dict in ldm names; mid-block attention linears become 1x1 convolutions."""
    rules = _vae_rules(config)
    converted = {}
    for key, value in state_dict.items():
        ldm_key = _rename(key, rules)
        if ".mid.attn_1." in ldm_key and ldm_key.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]  # (out, in) -> (out, in, 1, 1)
        converted[ldm_key] = value
    return converted


def clip_text_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel state dict as SD 1.x stores it: `text_model.*` under the transformer prefix."""
    return {"text_model." + key.removeprefix("text_model."): value for key, value in state_dict.items()}


def ldm_state_dict(*, unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """The three networks as one original-layout checkpoint, tensors contiguous and detached."""
    checkpoint = {}
    parts = (
        (UNET_PREFIX, unet_to_ldm(unet.state_dict(), config=dict(unet.config))),
        (VAE_PREFIX, vae_to_ldm(vae.state_dict(), config=dict(vae.config))),
        (TEXT_ENCODER_PREFIX, clip_text_to_ldm(text_encoder.state_dict())),
    )
    for prefix, weights in parts:
        for key, value in weights.items():
            checkpoint[prefix + key] = value.detach().contiguous()
    return checkpoint


def write_ldm_safetensors(path: str | Path, *, unet, vae, text_encoder) -> Path:
    """Write the checkpoint as one `.safetensors` file, as model sites distribute it."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(ldm_state_dict(unet=unet, vae=vae, text_encoder=text_encoder), str(path))
    return path
