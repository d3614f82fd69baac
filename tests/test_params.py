"""The parameter store: one table, exclusive pairs, prompt blends, prompts encoded off the frame loop."""

import time

import numpy as np
import pytest

from bridge.control.table import ENGINE_NAMES
from bridge.params import PARAMETERS, ParameterStore, apply_pending
from pipeline import StreamConfig, StreamDiffusion


@pytest.fixture()
def engine(tiny_components):
    return StreamDiffusion(tiny_components, StreamConfig(width=64, height=64, device="cpu", t_index_list=(20, 40)))


def _wait_pending(store, name, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with store._lock:
            if name in store._pending:
                return True
        time.sleep(0.01)
    return False


def test_the_store_knows_exactly_the_tables_engine_parameters():
    assert set(PARAMETERS) == set(ENGINE_NAMES)
    store = ParameterStore()
    with pytest.raises(ValueError, match="unknown parameter"):
        store.set("__class__", 1)
    with pytest.raises(ValueError, match="prompt_blend_method"):
        store.set("prompt_blend_method", "cubic")


def test_strength_and_t_index_list_replace_each_other():
    store = ParameterStore()
    store.set("strength", 0.5)
    store.set("t_index_list", [10, 20])
    assert store.take() == {"t_index_list": (10, 20)}
    store.update({"t_index_list": "5, 9", "seed": 3})
    store.set("strength", 0.7)
    assert store.take() == {"strength": 0.7, "seed": 3}


def test_blend_then_negative_prompt_keeps_the_blend(engine):
    store = ParameterStore()
    store.set("prompt_blend", [("a castle", 0.5), ("a forest", 0.5)])
    store.set("prompt_blend_method", "slerp")
    apply_pending(store, engine)
    assert engine.prompt == "a castle:0.5 | a forest:0.5"
    store.set("negative_prompt", "fog")
    apply_pending(store, engine)
    assert engine.prompt.startswith("a castle") and engine.negative_prompt == "fog"
    store.set("prompt", "a river")
    apply_pending(store, engine)
    assert engine.prompt == "a river" and "prompt_blend" not in store.applied
    store.set("negative_prompt", "rain")
    apply_pending(store, engine)
    assert engine.prompt == "a river" and engine.negative_prompt == "rain"
    assert not store.rejected


def test_prompts_are_encoded_before_the_frame_loop_sees_them(engine):
    store = ParameterStore()
    store.attach_prompt_encoder(engine.prepare_prompt)
    try:
        store.set("prompt", "a lighthouse at dawn")
        assert _wait_pending(store, "prompt")
        assert engine.prompts.cached("a lighthouse at dawn")
        calls = []
        handle = engine.components.text_encoder.register_forward_hook(lambda m, a, o: calls.append(1))
        try:
            apply_pending(store, engine)  # what the inference thread does between frames
            engine(np.zeros((64, 64, 3), np.uint8))
        finally:
            handle.remove()
        assert calls == [] and engine.prompt == "a lighthouse at dawn"
    finally:
        store.close()
        store.close()


def test_a_failing_encode_is_reported_and_the_prompt_kept(engine):
    store = ParameterStore()

    def broken(text):
        raise RuntimeError("CUDA out of memory")

    store.attach_prompt_encoder(broken)
    try:
        store.update({"prompt": "never", "guidance_scale": 1.7})
        assert _wait_pending(store, "guidance_scale")
        apply_pending(store, engine)
        assert engine.prompt == "" and engine.config.guidance_scale == 1.7
        assert "encoding failed" in store.rejected["prompt"][1]
    finally:
        store.close()


def _gated_encoder():
    """An encoder that records its texts and waits for `gate` (set) before each one."""
    import threading

    gate, texts = threading.Event(), []

    def encode(text):
        gate.wait(10)
        texts.append(text)

    return encode, gate, texts


def test_a_prompt_storm_while_one_encodes_costs_one_more_encode_not_one_each():
    """Each prompt packet sent while an encode ran used to be added to the waiting request: 20,000
    prompts left 9,305 texts waiting and applied the newest one 37 s late."""
    encode, gate, texts = _gated_encoder()
    store = ParameterStore()
    store.attach_prompt_encoder(encode)
    try:
        store.set("prompt", "first")
        time.sleep(0.1)  # the worker is now inside the first encode
        for index in range(500):
            store.set("prompt", f"prompt {index}")
        gate.set()
        assert _wait_pending(store, "prompt") and time.sleep(0.3) is None
        assert store.take() == {"prompt": "prompt 499"}
        assert texts == ["first", "", "prompt 499", ""]  # each request's text, then its negative prompt
    finally:
        gate.set()
        store.close()


def test_a_value_set_again_while_its_packets_prompt_encodes_keeps_the_newer_value():
    """A preset with a prompt and guidance 5, then a fader's guidance 10 while the prompt encodes:
    guidance 10, not the preset's 5 when its prompt is ready."""
    encode, gate, _ = _gated_encoder()
    store = ParameterStore()
    store.attach_prompt_encoder(encode)
    try:
        store.update({"prompt": "a cat", "guidance_scale": 5.0})
        store.set("guidance_scale", 10.0)
        gate.set()
        assert _wait_pending(store, "prompt") and time.sleep(0.1) is None
        assert store.take() == {"guidance_scale": 10.0, "prompt": "a cat"}
    finally:
        gate.set()
        store.close()


def test_of_a_prompt_and_a_blend_in_one_change_the_later_wins(engine):
    store = ParameterStore()
    store.attach_prompt_encoder(engine.prepare_prompt)
    try:
        store.update({"prompt": "a", "prompt_blend": [("b", 0.5), ("c", 0.5)]})
        assert _wait_pending(store, "prompt_blend")
        apply_pending(store, engine)
        assert engine.prompt == "b:0.5 | c:0.5" and "prompt" not in store.applied
        store.update({"prompt_blend": [("b", 1.0)], "prompt": "d"})
        assert _wait_pending(store, "prompt")
        apply_pending(store, engine)
        assert engine.prompt == "d" and "prompt_blend" not in store.applied
    finally:
        store.close()


def test_a_blend_of_eight_leaves_nothing_for_the_frame_loop_to_encode(engine):
    """Eight blended prompts filled the old 8-entry prompt cache and pushed the negative prompt
    out: the frame loop then ran the text encoder itself."""
    store = ParameterStore()
    store.attach_prompt_encoder(engine.prepare_prompt)
    try:
        store.set("negative_prompt", "blurry")
        assert _wait_pending(store, "negative_prompt")
        apply_pending(store, engine)
        store.set("prompt_blend", [(f"style {index}", 0.125) for index in range(8)])
        assert _wait_pending(store, "prompt_blend")
        calls = []
        handle = engine.components.text_encoder.register_forward_hook(lambda m, a, o: calls.append(1))
        try:
            apply_pending(store, engine)
        finally:
            handle.remove()
        assert calls == [] and engine.negative_prompt == "blurry" and engine.prompt.startswith("style 0")
    finally:
        store.close()


def test_a_storm_of_refusals_is_logged_once_per_parameter_and_still_reported(caplog):
    store, heard = ParameterStore(), []
    store.add_listener(lambda name, value, error: heard.append((name, error)))
    with caplog.at_level("WARNING", logger="bridge.params"):
        for index in range(200):
            store.report_rejected("prompt", f"text {index}", "encoding failed")
        store.report_rejected("seed", -1, "out of range")
    assert [r.getMessage().split("=")[0] for r in caplog.records] == ["parameter prompt", "parameter seed"]
    assert len(heard) == 201 and store.rejected["prompt"] == ("text 199", "encoding failed")


def test_two_control_threads_sending_prompts_at_once_never_lose_both():
    """Counting a prompt and submitting it were two steps: thread A counted, B counted and
    submitted, A submitted, and the merge kept A's value with A's (older) count: dropped."""
    import threading

    encode, gate, _ = _gated_encoder()
    store = ParameterStore()
    store.attach_prompt_encoder(encode)
    count = store._count

    def slow_first_count(values):
        counted = count(values)
        if values.get("prompt") == "from A":
            time.sleep(0.3)  # A between counting and submitting
        return counted

    store._count = slow_first_count
    try:
        store.set("prompt", "first")  # the worker waits inside this one's encode
        time.sleep(0.1)
        a = threading.Thread(target=store.set, args=("prompt", "from A"))
        a.start()
        time.sleep(0.1)
        store.set("prompt", "from B")  # B, sent after A
        a.join(5)
        gate.set()
        assert _wait_pending(store, "prompt") and time.sleep(0.3) is None
        assert store.take() == {"prompt": "from B"}
    finally:
        gate.set()
        store.close()


def test_the_input_fit_reaches_the_engine_between_frames(engine):
    store = ParameterStore()
    store.set("input_fit", "letterbox")
    apply_pending(store, engine)
    assert engine.config.input_fit == "letterbox" and store.applied["input_fit"] == "letterbox"
    engine(np.zeros((48, 96, 3), np.uint8))  # a wide frame goes through with bars
    with pytest.raises(ValueError, match="input_fit"):
        store.set("input_fit", "zoom")  # refused at the door, by name
