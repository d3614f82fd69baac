"""Run-time updates take effect with no reload, and after a refill equal a freshly built stream."""

import pytest
import torch

from pipeline import StreamConfig, StreamDiffusion

SIZE = 64
BASE = dict(width=SIZE, height=SIZE, device="cpu", dtype="float32", t_index_list=(20, 40), guidance_scale=1.5, seed=7)

UPDATES = {
    "prompt": ({"prompt": "a green field"}, {}),
    "negative_prompt": ({"negative_prompt": "dark, noisy"}, {}),
    "guidance_below_one": ({}, {"guidance_scale": 0.7}),
    "guidance_up": ({}, {"guidance_scale": 3.0}),
    "delta": ({}, {"delta": 0.3}),
    "seed": ({}, {"seed": 1234}),
    "more_steps": ({}, {"t_index_list": (10, 25, 40)}),
    "one_step": ({}, {"t_index_list": (30,)}),
}


def _frames(count, seed=9):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand((3, SIZE, SIZE), generator=generator) for _ in range(count)]


def _build(components, cfg_type, prompts, settings):
    engine = StreamDiffusion(components, StreamConfig(cfg_type=cfg_type, **{**BASE, **settings}))
    engine.set_prompt(prompts.get("prompt", "a city"), prompts.get("negative_prompt"))
    return engine


@pytest.mark.parametrize("cfg_type", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("name", list(UPDATES))
def test_update_then_refill_equals_fresh_stream(tiny_components, cfg_type, name):
    prompts, settings = UPDATES[name]
    live = _build(tiny_components, cfg_type, {}, {})
    frames = _frames(8)
    for frame in frames[:3]:
        live(frame)
    if prompts:
        live.set_prompt(prompts.get("prompt", "a city"), prompts.get("negative_prompt"))
    if settings:
        live.update(**settings)
    fresh = _build(tiny_components, cfg_type, prompts, settings)
    steps = live.config.denoising_steps
    after = frames[3:]
    live_out = [live(frame) for frame in after]
    fresh_out = [fresh(frame) for frame in after]
    for k in range(steps - 1, len(after)):  # frames that entered after the update
        assert (live_out[k] - fresh_out[k]).abs().max().item() <= 1e-4, f"call {k} after the update"


def test_guidance_crossing_one_back_and_forth_never_raises(tiny_components):
    for cfg_type in ("none", "full", "self", "initialize"):
        engine = _build(tiny_components, cfg_type, {}, {"guidance_scale": 0.5})
        for scale in (0.5, 1.0, 1.01, 3.0, 0.9, 2.0):
            engine.update(guidance_scale=scale)
            out = engine(torch.rand(3, SIZE, SIZE))
            assert torch.isfinite(out).all()


def test_cfg_type_can_change_at_run_time(tiny_components):
    engine = _build(tiny_components, "none", {}, {})
    for cfg_type in ("self", "full", "initialize", "none", "self"):
        engine.update(cfg_type=cfg_type)
        engine(torch.rand(3, SIZE, SIZE))
    assert engine.stats.frames_processed == 5


def test_strength_maps_to_t_index_list(tiny_components):
    engine = _build(tiny_components, "self", {}, {})
    engine.update(strength=0.5)
    assert engine.config.t_index_list == (24, 37)
    engine.update(strength=1.0)
    assert engine.config.t_index_list[0] == 0
    with pytest.raises(ValueError, match="strength"):
        engine.update(strength=1.5)
    with pytest.raises(ValueError, match="not both"):
        engine.update(strength=0.5, t_index_list=(1, 2))


def test_bad_updates_name_the_setting_and_change_nothing(tiny_components):
    engine = _build(tiny_components, "self", {}, {})
    before = engine.config
    with pytest.raises(ValueError, match="guidance_scale"):
        engine.update(guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="t_index_list"):
        engine.update(t_index_list=(40, 20))
    with pytest.raises(ValueError, match="width"):
        engine.update(width=100)
    with pytest.raises(ValueError, match="frame_buffer_size.*cannot change"):
        engine.update(frame_buffer_size=2)
    with pytest.raises(ValueError, match="unknown|cannot change"):
        engine.update(colour="red")
    assert engine.config == before


def test_prompt_cache_makes_switching_back_free(tiny_components):
    engine = _build(tiny_components, "self", {}, {})
    calls = []
    handle = engine.components.text_encoder.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        engine.set_prompt("first")
        engine.set_prompt("second")
        engine.set_prompt("first")
        engine.set_prompt("second")
    finally:
        handle.remove()
    assert len(calls) == 2  # "" was encoded at construction; each new prompt once


def test_an_update_that_fails_changes_nothing(tiny_components):
    engine = _build(tiny_components, "self", {}, {})
    engine(torch.rand(3, SIZE, SIZE))
    config, noise = engine.config, engine._noise.clone()
    make_noise = engine._make_noise

    def failing(new_config):
        if new_config.seed == 99:
            raise torch.OutOfMemoryError("out of memory while making noise")
        return make_noise(new_config)

    engine._make_noise = failing
    with pytest.raises(torch.OutOfMemoryError):
        engine.update(seed=99, guidance_scale=2.0)
    assert engine.config == config and torch.equal(engine._noise, noise)
    engine(torch.rand(3, SIZE, SIZE))  # and the stream goes on


@pytest.mark.parametrize("change", [dict(seed=5, t_index_list=(10, 30)), dict(resolution=(SIZE + 16, SIZE)),
                                    dict(seed=5, t_index_list=(30,), similarity_threshold=0.5)])
def test_an_update_refused_in_its_warm_up_leaves_the_stream_as_it_was(tiny_components, change):
    """The rollback derived everything from the old settings again, which for a seed, step-count
    or size change restarted the frames in flight, the last output and the similarity filter: the
    next frames differed from a twin that never saw the update (tensorrt refuses an unbuilt size
    there, after the change has begun)."""
    settings = dict(t_index_list=(20, 30, 40), similarity_filter=True, similarity_threshold=0.9)
    live, twin = (_build(tiny_components, "self", {}, settings) for _ in range(2))
    frames = _frames(8)
    for frame in frames[:4]:
        live(frame), twin(frame)

    def refuse(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated: no engines for this")

    live.warm_up = refuse
    with pytest.raises(torch.OutOfMemoryError):
        live.update(**change)
    del live.warm_up
    assert live.config == twin.config
    for frame in frames[4:]:
        assert torch.equal(live(frame), twin(frame))


@pytest.mark.parametrize("steps", ["30", None, float("nan"), 0])
def test_strength_with_a_bad_schedule_length_names_it(tiny_components, steps):
    engine = _build(tiny_components, "self", {}, {})
    with pytest.raises(ValueError, match="num_inference_steps"):
        engine.update(strength=0.5, num_inference_steps=steps)
