"""Prompt transitions: a new prompt fades in from the one shown, timed by the engine's clock,
eased, never jumping when changed again half-way; set over OSC beside a prompt."""

import pytest
import torch

from bridge.control.osc import encode_bundle, encode_message
from bridge.control.router import Router
from bridge.params import ParameterStore, apply_pending
from pipeline import StreamConfig, StreamDiffusion
from pipeline.prompts import transition_weight

SENDER = ("127.0.0.1", 50000)


def test_the_weight_eases_in_and_out_and_lands_on_one():
    assert transition_weight(0.0, 2.0) == 0.0 and transition_weight(2.0, 2.0) == 1.0
    assert transition_weight(5.0, 2.0) == 1.0 and transition_weight(0.3, 0.0) == 1.0
    assert transition_weight(1.0, 2.0) == pytest.approx(0.5)
    assert transition_weight(0.5, 2.0) + transition_weight(1.5, 2.0) == pytest.approx(1.0)  # symmetric
    weights = [transition_weight(t / 100, 1.0) for t in range(101)]
    assert weights == sorted(weights)
    assert weights[1] < 0.01 and weights[99] > 0.99  # gentle at both ends (smoothstep)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def engine_with_clock(components, **settings):
    engine = StreamDiffusion(components, StreamConfig(width=64, height=64, device="cpu", t_index_list=(20, 35),
                                                      **settings))
    engine.clock = Clock()
    return engine


def frames(count):
    return [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(count)]


def test_a_transition_passes_between_the_two_prompts_and_ends_where_a_cut_would(tiny_components):
    """Fading from a castle to a forest over 1 s, against cutting to the forest: frames in the
    middle are neither picture, and once the fade is over (and the frames in flight with it) the
    output is exactly the cut's."""
    inputs = frames(8)
    faded = engine_with_clock(tiny_components, prompt_transition=1.0)
    cut = engine_with_clock(tiny_components)
    castle = engine_with_clock(tiny_components)
    for engine in (faded, cut, castle):
        engine.set_prompt("a castle")
    outputs = {"faded": [], "cut": [], "castle": []}
    for index, frame in enumerate(inputs):
        if index == 2:
            faded.set_prompt("a forest")
            cut.set_prompt("a forest")
            assert faded.in_transition and not cut.in_transition
        faded.clock.now += 0.25  # four frames a second: the fade lasts frames 2..6
        for name, engine in (("faded", faded), ("cut", cut), ("castle", castle)):
            outputs[name].append(engine(frame))
    middle = 4
    assert not torch.allclose(outputs["faded"][middle], outputs["cut"][middle], atol=1e-3)
    assert not torch.allclose(outputs["faded"][middle], outputs["castle"][middle], atol=1e-3)
    assert not faded.in_transition
    assert torch.equal(outputs["faded"][-1], outputs["cut"][-1])  # landed: the same frames as the cut
    assert torch.equal(outputs["faded"][1], outputs["cut"][1])  # before the change: the same too


def test_a_change_during_a_transition_starts_from_what_is_shown(tiny_components):
    engine = engine_with_clock(tiny_components, prompt_transition=2.0)
    engine.set_prompt("a castle")
    engine(frames(1)[0])
    castle = engine._prompt_state.cond
    engine.set_prompt("a forest")
    engine.clock.now += 1.0
    engine(frames(1)[0])
    shown = engine._prompt_state.cond
    assert torch.allclose(shown, (castle + engine.prompts.encode("a forest")) / 2, atol=1e-6)  # half-way
    engine.set_prompt("a river", transition=0.5)
    engine(frames(1)[0])  # no time passed: still what was shown, no jump
    assert torch.equal(engine._prompt_state.cond, shown)
    engine.clock.now += 0.5
    engine(frames(1)[0])
    assert torch.equal(engine._prompt_state.cond, engine.prompts.encode("a river")) and not engine.in_transition
    engine.set_prompt("a desert", transition=0)  # a cut, whatever the setting
    assert not engine.in_transition
    with pytest.raises(ValueError, match="transition: -1 must be a number of seconds in 0..60"):
        engine.set_prompt("a sea", transition=-1)
    assert engine.prompt == "a desert"


def test_before_the_first_frame_a_prompt_applies_at_once(tiny_components):
    engine = engine_with_clock(tiny_components, prompt_transition=5.0)
    engine.set_prompt("a castle")
    assert not engine.in_transition
    assert torch.equal(engine._prompt_state.cond, engine.prompts.encode("a castle"))


def test_the_setting_changes_at_run_time_without_compiling(tiny_components):
    engine = engine_with_clock(tiny_components)
    assert engine.update_work(prompt_transition=3.0) is None
    engine.update(prompt_transition=3.0)
    assert engine.config.prompt_transition == 3.0
    with pytest.raises(ValueError, match="prompt_transition: 61 must be a number of seconds in 0..60"):
        engine.update(prompt_transition=61)


def test_a_transition_sent_beside_a_prompt_applies_to_that_prompt(tiny_components):
    engine = engine_with_clock(tiny_components)
    engine.set_prompt("a castle")
    engine(frames(1)[0])
    store = ParameterStore()
    router = Router(store=store)
    router.handle(encode_bundle([encode_message("/sd/prompt", "a forest"),
                                 encode_message("/sd/prompt_transition", 1.5)]), SENDER)
    apply_pending(store, engine)
    assert engine.in_transition and engine.config.prompt_transition == 1.5
    assert store.applied["prompt"] == "a forest" and store.applied["prompt_transition"] == 1.5
    engine.clock.now += 1.5
    engine(frames(1)[0])
    assert not engine.in_transition
    router.handle(encode_message("/sd/prompt_transition/norm", 0.0), SENDER)  # a fader to the bottom: cuts
    router.handle(encode_message("/sd/prompt", "a river"), SENDER)
    apply_pending(store, engine)
    assert engine.config.prompt_transition == 0.0 and not engine.in_transition
