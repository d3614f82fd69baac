"""Stream batch equals the sequential reference, for every cfg type, step count and batch size."""

import itertools

import pytest
import torch

from pipeline import StreamConfig, StreamDiffusion

SIZE = 64
T_INDEX_LISTS = {1: (20,), 2: (20, 40), 3: (10, 25, 40), 4: (5, 18, 31, 45)}


def _frames(count, batch, seed=1):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, 3, SIZE, SIZE) if batch > 1 else (3, SIZE, SIZE)
    return [torch.rand(shape, generator=generator) for _ in range(count)]


def _engine(components, cfg_type, steps, batch, *, batched, overlap_decode=False):
    config = StreamConfig(
        width=SIZE, height=SIZE, device="cpu", dtype="float32", cfg_type=cfg_type, guidance_scale=1.8, delta=0.7,
        t_index_list=T_INDEX_LISTS[steps], frame_buffer_size=batch, use_denoising_batch=batched, seed=5,
        overlap_decode=overlap_decode,
    )
    engine = StreamDiffusion(components, config)
    engine.set_prompt("a red fox in snow", negative_prompt="blurry")
    return engine


@pytest.mark.parametrize(
    "cfg_type,steps,batch",
    list(itertools.product(["none", "full", "self", "initialize"], [1, 2, 3, 4], [1, 2])),
)
def test_batched_output_equals_sequential_reference(tiny_components, cfg_type, steps, batch):
    batched = _engine(tiny_components, cfg_type, steps, batch, batched=True)
    sequential = _engine(tiny_components, cfg_type, steps, batch, batched=False)
    frames = _frames(steps + 2, batch)
    reference = [sequential(frame) for frame in frames]
    outputs = [batched(frame) for frame in frames]
    lag = steps - 1
    for k in range(lag, len(frames)):
        # the frame leaving the stream at call k entered it at call k - lag
        difference = (outputs[k] - reference[k - lag]).abs().max().item()
        assert difference <= 1e-4, f"call {k}: max abs difference {difference}"


def test_output_lags_by_steps_minus_one(tiny_components):
    """The batched stream really is a pipeline: its output is an earlier frame's, not the current one's."""
    batched = _engine(tiny_components, "self", 3, 1, batched=True)
    sequential = _engine(tiny_components, "self", 3, 1, batched=False)
    frames = _frames(5, 1, seed=3)
    reference = [sequential(frame) for frame in frames]
    outputs = [batched(frame) for frame in frames]
    assert (outputs[4] - reference[2]).abs().max() <= 1e-4
    assert (outputs[4] - reference[4]).abs().max() > 1e-2


@pytest.mark.parametrize("cfg_type,steps,batch,batched", [
    ("self", 4, 1, True), ("full", 2, 2, True), ("none", 1, 1, True), ("initialize", 3, 1, False),
])
def test_overlap_decode_gives_the_same_frames_one_call_later(tiny_components, cfg_type, steps, batch, batched):
    """With overlap_decode each call decodes the previous call's x_0: the outputs are the plain
    stream's, one call later; the first call, with nothing decoded before it, repeats once."""
    plain = _engine(tiny_components, cfg_type, steps, batch, batched=batched)
    overlapped = _engine(tiny_components, cfg_type, steps, batch, batched=batched, overlap_decode=True)
    frames = _frames(steps + 3, batch, seed=4)
    reference = [plain(frame) for frame in frames]
    outputs = [overlapped(frame) for frame in frames]
    assert torch.equal(outputs[0], reference[0])
    for k in range(1, len(frames)):
        assert torch.equal(outputs[k], reference[k - 1]), f"call {k}"
    assert not torch.equal(outputs[-1], reference[-1])
    overlapped.reset()  # nothing pending after a reset: its first call decodes its own x_0 again
    plain.reset()
    assert torch.equal(overlapped(frames[0]), plain(frames[0]))
    with pytest.raises(ValueError, match="overlap_decode: for img2img only"):
        overlapped.config.replace(mode="txt2img")


def test_one_unet_call_per_frame_in_batch_mode(tiny_components):
    calls = []
    engine = _engine(tiny_components, "self", 4, 2, batched=True)
    handle = engine.components.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        for frame in _frames(3, 2):
            engine(frame)
    finally:
        handle.remove()
    assert calls == [8, 8, 8]  # n * b latents in one call per frame


def test_sequential_mode_calls_unet_once_per_step(tiny_components):
    calls = []
    engine = _engine(tiny_components, "full", 3, 1, batched=False)
    handle = engine.components.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        engine(_frames(1, 1)[0])
    finally:
        handle.remove()
    assert calls == [2, 2, 2]  # full CFG doubles each step's batch
