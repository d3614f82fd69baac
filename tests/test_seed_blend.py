"""Seed blending: the noise of several seeds mixed with its statistics kept, from the engine's
update to OSC, presets, the parameter store and OSCQuery."""

import pytest
import torch

from bridge.control.oscquery import build_tree
from bridge.control.osc import encode_message
from bridge.control.router import Router
from bridge.control.table import BY_NAME, check_presets, convert
from bridge.params import ParameterStore, apply_pending
from pipeline import StreamConfig, StreamDiffusion
from pipeline.noise import blend_weights, blended_noise, seeded_noise

CPU = torch.device("cpu")
SENDER = ("127.0.0.1", 50000)


def test_a_blend_keeps_the_noise_standard_normal_at_every_mix():
    shape = (4, 4, 64, 64)
    a, b = (seeded_noise(shape, seed, device=CPU, dtype=torch.float32) for seed in (3, 4))
    for t in (0.0, 0.1, 0.3, 0.5, 0.8, 1.0):
        noise = blended_noise(shape, [(3, 1 - t), (4, t)], device=CPU, dtype=torch.float32)
        assert abs(noise.std().item() - 1.0) < 0.02 and abs(noise.mean().item()) < 0.02, t
    assert (0.5 * a + 0.5 * b).std().item() < 0.75  # what a plain mean would give: a washed-out picture
    assert torch.equal(blended_noise(shape, [(3, 1.0), (4, 0.0)], device=CPU, dtype=torch.float32), a)
    assert torch.equal(blended_noise(shape, [(4, 0.25)], device=CPU, dtype=torch.bfloat16),
                       seeded_noise(shape, 4, device=CPU, dtype=torch.bfloat16))
    assert blend_weights([3.0, 4.0]) == pytest.approx([0.6, 0.8])  # only the ratios matter


@pytest.mark.parametrize("weights", [[], [0.0, 0.0], [-1.0, 1.0], [float("nan")], [float("inf"), 1.0]])
def test_blend_weights_refuse_what_is_no_mix(weights):
    with pytest.raises(ValueError, match="seed_blend: weights"):
        blend_weights(weights)


def last_output(components, frames, **settings):
    engine = StreamDiffusion(components, StreamConfig(width=64, height=64, device="cpu", t_index_list=(20, 35),
                                                      cfg_type="self", **settings))
    engine.set_prompt("a lighthouse")
    for frame in frames:
        out = engine(frame)
    return out


def test_moving_the_weight_from_one_seed_to_another_morphs_the_picture(tiny_components):
    """Eleven fader positions between seed 3 and seed 40: the ends are those seeds' pictures, and
    no step between neighbours comes near the jump a change of seed makes."""
    frames = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    first = last_output(tiny_components, frames, seed=3)
    second = last_output(tiny_components, frames, seed=40)
    jump = (first - second).abs().mean().item()
    path = [last_output(tiny_components, frames, seed_blend=((3, 1 - t / 10), (40, t / 10))) for t in range(11)]
    assert torch.equal(path[0], first) and torch.equal(path[-1], second)
    steps = [(a - b).abs().mean().item() for a, b in zip(path, path[1:])]
    assert jump > 0.01 and max(steps) < 0.5 * jump, (jump, steps)


def test_an_update_fills_the_noise_in_place_and_a_seed_replaces_the_blend(tiny_components):
    engine = StreamDiffusion(tiny_components, StreamConfig(width=64, height=64, device="cpu", t_index_list=(20, 35)))
    noise, seed_two = engine._noise, engine._noise.clone()
    assert engine.update_work(seed_blend=[(2, 0.5), (9, 0.5)]) is None  # nothing compiles, nothing is captured
    engine.update(seed_blend=[(2, 0.5), (9, 0.5)])
    assert engine._noise is noise and not torch.equal(noise, seed_two)  # the same tensor: a step graph reads it
    assert engine.config.seed_blend == ((2, 0.5), (9, 0.5)) and engine.config.seed == 2
    engine.update(seed=2)
    assert engine.config.seed_blend == () and torch.equal(engine._noise, seed_two)
    with pytest.raises(ValueError, match="seed_blend: seed -1 must be a non-negative integer"):
        engine.update(seed_blend=[(-1, 1.0)])
    with pytest.raises(ValueError, match="at least one weight must be above 0"):
        engine.update(seed_blend=[(5, 0.0)])
    with pytest.raises(ValueError, match="up to 8"):
        engine.update(seed_blend=[(seed, 1.0) for seed in range(9)])
    assert engine.config.seed_blend == () and torch.equal(engine._noise, seed_two)  # refused: nothing changed


def test_osc_seed_blend_pairs_are_checked():
    param = BY_NAME["seed_blend"]
    assert param.osc_type == "if"
    assert convert(param, (2, 0.7, 9.0, 1.5, "11", "0.25")) == ((2, 0.7), (9, 1.0), (11, 0.25))  # weights clamped
    for args, message in [((2,), "expects 1 to 8"), ((2, 0.5, 3), "expects 1 to 8"), ((2 ** 31, 1.0), "outside"),
                          ((-1, 1.0), "outside"), ((2, 0.0, 3, 0.0), "at least one weight"),
                          (("x", 1.0), "not a number"), ((2, float("nan")), "seed_blend")]:
        with pytest.raises(ValueError, match=message):
            convert(param, args)


def test_a_seed_blend_sent_over_osc_reaches_the_engine_and_a_seed_replaces_it(tiny_components):
    engine = StreamDiffusion(tiny_components, StreamConfig(width=64, height=64, device="cpu", t_index_list=(20, 35)))
    store = ParameterStore()
    router = Router(store=store)
    router.handle(encode_message("/sd/seed_blend", 5, 0.6, 11, 0.4), SENDER)
    apply_pending(store, engine)
    assert engine.config.seed_blend == (pytest.approx((5, 0.6)), pytest.approx((11, 0.4)))
    assert "seed_blend" in store.applied
    node = build_tree(prefix="/sd", values=store.applied)["CONTENTS"]["sd"]["CONTENTS"]["seed_blend"]
    assert node["TYPE"] == "ifif" and node["VALUE"] == [5, pytest.approx(0.6), 11, pytest.approx(0.4)]
    router.handle(encode_message("/sd/seed", 6), SENDER)
    apply_pending(store, engine)
    assert engine.config.seed_blend == () and engine.config.seed == 6
    assert store.applied["seed"] == 6 and "seed_blend" not in store.applied  # no stale blend in OSCQuery
    router.handle(encode_message("/sd/seed_blend", 5, 0.0), SENDER)  # refused by the router, counted
    assert router.counters["rejected"] == 1 and not store.has_pending


def test_presets_take_a_seed_blend_and_refuse_it_beside_a_seed():
    checked = check_presets({"1": {"seed_blend": [[2, 0.7], [9, 0.3]]}})
    assert checked[1]["seed_blend"] == ((2, 0.7), (9, 0.3))
    with pytest.raises(ValueError, match="presets.2: give seed or seed_blend, not both"):
        check_presets({"2": {"seed": 4, "seed_blend": [[2, 1.0]]}})
    with pytest.raises(ValueError, match=r"presets.3.seed_blend: .* weight outside 0..1"):
        check_presets({"3": {"seed_blend": [[2, 1.5]]}})


def test_one_fader_moves_the_blend_between_its_two_seeds(tiny_components):
    """/sd/seed_blend/mix f: a desk's single fader (it cannot send `A 1-t B t`) morphs the blend set
    before it, in a preset or over OSC; without a blend it is refused, named, and nothing changes."""
    engine = StreamDiffusion(tiny_components, StreamConfig(width=64, height=64, device="cpu", t_index_list=(20, 35)))
    store = ParameterStore()
    heard = []
    store.add_listener(lambda name, value, error: heard.append((name, error)))
    router = Router(store=store)

    router.handle(encode_message("/sd/seed_blend/mix", 0.4), SENDER)  # no blend yet
    apply_pending(store, engine)
    assert heard[-1] == ("seed_mix", "seed_mix: needs a blend of two seeds to move between; set one first, "
                                     "e.g. /sd/seed_blend 2 1 9 0")
    assert engine.config.seed_blend == () and "seed_mix" not in store.applied

    store.update(check_presets({"1": {"seed_blend": [[2, 1.0], [9, 0.0]], "seed_mix": 0.25}})[1])  # a preset: both
    apply_pending(store, engine)
    assert engine.config.seed_blend == ((2, 0.75), (9, 0.25))
    for position in (0.5, 1.0):
        router.handle(encode_message("/sd/seed_blend/mix/norm", position), SENDER)
        apply_pending(store, engine)
    assert engine.config.seed_blend == ((2, 0.0), (9, 1.0))
    assert store.applied["seed_mix"] == 1.0 and store.applied["seed_blend"] == ((2, 0.0), (9, 1.0))  # OSCQuery
    assert torch.equal(engine._noise, seeded_noise(engine._noise.shape, 9, device="cpu", dtype=engine._noise.dtype))

    router.handle(encode_message("/sd/seed_blend", 3, 0.5, 4, 0.5), SENDER)  # a blend of its own
    apply_pending(store, engine)
    assert "seed_mix" not in store.applied  # the fader's last position no longer describes it
    router.handle(encode_message("/sd/seed", 6), SENDER)
    router.handle(encode_message("/sd/seed_blend/mix", 0.5), SENDER)  # the seed replaces the blend: refused
    del heard[:]
    apply_pending(store, engine)
    assert engine.config.seed == 6 and engine.config.seed_blend == ()
    assert [name for name, error in heard if error] == ["seed_mix"] and ("seed", None) in heard
