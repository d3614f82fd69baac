"""Each cfg type's combination, checked against a direct computation from the UNet's raw predictions."""

import pytest
import torch

from pipeline import StreamConfig, StreamDiffusion
from pipeline.schedule import add_noise, lcm_denoise

SIZE = 64


def _engine(components, cfg_type, guidance_scale=2.5, delta=0.6):
    config = StreamConfig(
        width=SIZE, height=SIZE, device="cpu", dtype="float32", cfg_type=cfg_type, guidance_scale=guidance_scale,
        delta=delta, t_index_list=(25,), seed=11,
    )
    engine = StreamDiffusion(components, config)
    engine.set_prompt("a lighthouse", negative_prompt="fog")
    return engine


@torch.no_grad()
def _expected_output(engine, frame, cfg_type, guidance_scale, delta):
    """The one-step frame computed by hand from the UNet called with each prompt separately."""
    components = engine.components
    unet, text_encoder, tokenizer = components.unet, components.text_encoder, components.tokenizer

    def embed(prompt):
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return text_encoder(ids)[0]

    rows = engine._rows  # (1,) coefficients of the single step
    noise = engine._noise[:1]
    image = frame.unsqueeze(0) * 2 - 1
    latents = components.vae.encode(image).latents * components.vae.config.scaling_factor
    x_t = add_noise(latents, noise, rows.alpha_sqrt, rows.beta_sqrt)
    eps_cond = unet(x_t, rows.timesteps, encoder_hidden_states=embed("a lighthouse")).sample
    eps_uncond = unet(x_t, rows.timesteps, encoder_hidden_states=embed("fog")).sample
    if cfg_type == "none" or guidance_scale <= 1.0:
        eps = eps_cond
    elif cfg_type == "full":
        eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    elif cfg_type == "self":  # virtual residual noise of the first step is the noise that was added
        eps = delta * noise + guidance_scale * (eps_cond - delta * noise)
    else:  # initialize: the true negative at the first step, scaled by delta
        eps = delta * eps_uncond + guidance_scale * (eps_cond - delta * eps_uncond)
    x0 = lcm_denoise(eps, x_t, rows.alpha_sqrt, rows.beta_sqrt, rows.c_skip, rows.c_out)
    decoded = components.vae.decode(x0 / components.vae.config.scaling_factor).sample
    return ((decoded[0] + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("guidance_scale", [0.8, 2.5])
def test_guidance_matches_direct_computation(tiny_components, cfg_type, guidance_scale):
    engine = _engine(tiny_components, cfg_type, guidance_scale=guidance_scale)
    frame = torch.rand((3, SIZE, SIZE), generator=torch.Generator().manual_seed(4))
    expected = _expected_output(engine, frame, cfg_type, guidance_scale, 0.6)
    actual = engine(frame)
    assert (actual - expected).abs().max().item() <= 1e-4


def test_cfg_types_differ_from_each_other(tiny_components):
    frame = torch.rand((3, SIZE, SIZE), generator=torch.Generator().manual_seed(4))
    outputs = {cfg: _engine(tiny_components, cfg)(frame) for cfg in ("none", "full", "self", "initialize")}
    for a in outputs:
        for b in outputs:
            if a < b:
                assert (outputs[a] - outputs[b]).abs().max() > 1e-3, f"{a} and {b} gave the same frame"


def test_unet_batch_sizes_per_cfg_type(tiny_components):
    """full doubles the batch, initialize adds one row per frame, self and none add nothing."""
    expected = {"none": 3, "self": 3, "initialize": 4, "full": 6}
    for cfg_type, rows in expected.items():
        config = StreamConfig(width=SIZE, height=SIZE, device="cpu", cfg_type=cfg_type, guidance_scale=2.0, t_index_list=(10, 25, 40))
        engine = StreamDiffusion(tiny_components, config)
        seen = []
        handle = engine.components.unet.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
        try:
            engine(torch.rand(3, SIZE, SIZE))
        finally:
            handle.remove()
        assert seen == [rows], cfg_type
