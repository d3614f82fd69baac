"""StreamConfig validation and the schedule math against diffusers' own LCMScheduler."""

import pytest
import torch
from diffusers import LCMScheduler

from pipeline import StreamConfig, t_index_list_from_strength
from pipeline.schedule import NoiseSchedule, alphas_cumprod, lcm_boundary_scalings, lcm_timesteps, step_coefficients


@pytest.mark.parametrize(
    "field,value",
    [
        ("width", 100), ("height", 0), ("mode", "video"), ("cfg_type", "half"), ("t_index_list", ()),
        ("t_index_list", (40, 10)), ("t_index_list", (10, 50)), ("t_index_list", (1.5,)), ("num_inference_steps", 0),
        ("frame_buffer_size", 0), ("guidance_scale", float("nan")), ("guidance_scale", -1.0), ("delta", "big"),
        ("seed", -1), ("similarity_threshold", 1.0), ("similarity_max_skip", -1), ("use_denoising_batch", "yes"),
        ("dtype", "int8"), ("device", "nowhere"),
    ],
)
def test_bad_values_name_the_field_and_the_value(field, value):
    with pytest.raises(ValueError) as error:
        StreamConfig(**{field: value})
    assert str(error.value).startswith(field) or field in str(error.value)
    shown = str(value).strip("()[]")[:5]
    assert shown in str(error.value), f"the message does not show the value {value!r}"


def test_config_is_frozen_and_resolves_auto():
    config = StreamConfig(device="cpu")
    assert config.dtype == torch.float32 and config.device == torch.device("cpu")
    with pytest.raises(Exception):
        config.width = 64
    assert config.replace(guidance_scale=2.0).guidance_scale == 2.0
    with pytest.raises(ValueError, match="unknown setting"):
        config.replace(colour=1)


def test_float16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="float16"):
        StreamConfig(device="cpu", dtype="float16")


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 50])
def test_lcm_timesteps_match_diffusers(steps):
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    scheduler.set_timesteps(steps)
    assert lcm_timesteps(steps) == scheduler.timesteps.tolist()


def test_alphas_and_boundary_scalings_match_diffusers():
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ours = alphas_cumprod(NoiseSchedule())
    assert torch.allclose(ours.float(), scheduler.alphas_cumprod, atol=1e-6)
    for t in (999, 359, 99, 19):
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        mine_skip, mine_out = lcm_boundary_scalings(torch.tensor([t]))
        assert mine_skip.item() == pytest.approx(float(c_skip), rel=1e-6)
        assert mine_out.item() == pytest.approx(float(c_out), rel=1e-6)


def test_step_coefficients_of_streamdiffusions_default_list():
    coefficients = step_coefficients(NoiseSchedule(), (32, 45), 50, 50, torch.device("cpu"))
    assert coefficients.timesteps.tolist() == [359, 99]
    assert torch.allclose(coefficients.alpha_sqrt**2 + coefficients.beta_sqrt**2, torch.ones(2))


def test_strength_mapping():
    assert t_index_list_from_strength(1.0, 1, 50) == (0,)
    assert t_index_list_from_strength(0.5, 2, 50) == (24, 37)
    assert t_index_list_from_strength(0.02, 4, 50) == (46, 47, 48, 49)
    with pytest.raises(ValueError, match="strength"):
        t_index_list_from_strength(0.0, 1, 50)
