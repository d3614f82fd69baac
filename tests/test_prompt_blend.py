"""Prompt blending: weighted linear mean and slerp of the embeddings."""

import pytest
import torch

from pipeline import StreamConfig, StreamDiffusion
from pipeline.prompts import blend_embeddings, slerp


def test_slerp_endpoints_and_norm():
    a, b = torch.randn(1, 77, 32), torch.randn(1, 77, 32)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    unit_a, unit_b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    middle = slerp(unit_a, unit_b, 0.5)
    assert torch.allclose(middle.norm(dim=-1), torch.ones(1, 77), atol=1e-4)  # stays on the sphere
    assert torch.allclose(slerp(a, a, 0.3), a, atol=1e-5)  # parallel vectors


def test_linear_blend_is_the_weighted_mean():
    a, b = torch.randn(1, 77, 8), torch.randn(1, 77, 8)
    assert torch.allclose(blend_embeddings([a, b], [3.0, 1.0]), 0.75 * a + 0.25 * b)


@pytest.mark.parametrize("weights", [[0.0, 0.0], [-1.0, 2.0], [float("nan"), 1.0], [1.0]])
def test_bad_weights(weights):
    with pytest.raises(ValueError, match="weights|one weight"):
        blend_embeddings([torch.zeros(1, 77, 8)] * 2, weights)


def test_engine_blend_matches_single_prompt_at_the_ends(tiny_components):
    config = StreamConfig(width=64, height=64, device="cpu", t_index_list=(25,), cfg_type="none")
    engine = StreamDiffusion(tiny_components, config)
    frame = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    engine.set_prompt("a castle")
    castle = engine(frame)
    engine.set_prompt("a forest")
    forest = engine(frame)
    for method in ("linear", "slerp"):
        engine.set_prompt_blend([("a castle", 1.0), ("a forest", 0.0)], method=method)
        assert torch.allclose(engine(frame), castle, atol=1e-5)
        engine.set_prompt_blend([("a castle", 1.0), ("a forest", 1.0)], method=method)
        middle = engine(frame)
        assert not torch.allclose(middle, castle, atol=1e-3) and not torch.allclose(middle, forest, atol=1e-3)
    with pytest.raises(ValueError, match="method"):
        engine.set_prompt_blend([("a", 1.0)], method="cubic")


@pytest.mark.parametrize("pairs,negative,message", [
    ([("a", "0.5")], None, r"each weight must be a finite number, got \['0.5'\]"),
    ([("a", None)], None, "each weight must be a finite number"),
    ([("a", True)], None, "each weight must be a finite number"),
    ([("a", 1.0)], 5, "negative_prompt: expected a string, got int 5"),
])
def test_engine_blend_names_a_bad_weight_or_negative_prompt(tiny_components, pairs, negative, message):
    engine = StreamDiffusion(tiny_components, StreamConfig(width=64, height=64, device="cpu", t_index_list=(25,)))
    before = engine.prompt
    with pytest.raises(ValueError, match=message):
        engine.set_prompt_blend(pairs, negative_prompt=negative)
    assert engine.prompt == before
