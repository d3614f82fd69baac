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


def _engine(components, cfg_type, steps, batch, *, batched, **overlap):
    config = StreamConfig(
        width=SIZE, height=SIZE, device="cpu", dtype="float32", cfg_type=cfg_type, guidance_scale=1.8, delta=0.7,
        t_index_list=T_INDEX_LISTS[steps], frame_buffer_size=batch, use_denoising_batch=batched, seed=5, **overlap,
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


OVERLAPS = {None: {}, "decode": dict(overlap_decode=True), "encode": dict(overlap_encode=True),
            "both": dict(overlap_decode=True, overlap_encode=True)}  # the VAE's overlaps, by name (test_step_graph too)


@pytest.mark.parametrize("cfg_type,steps,batch,batched,overlap", [
    ("self", 4, 1, True, "decode"), ("full", 2, 2, True, "decode"), ("none", 1, 1, True, "encode"),
    ("initialize", 3, 1, False, "encode"), ("self", 3, 1, True, "both"), ("full", 2, 2, True, "both"),
])
def test_overlapped_vae_gives_the_plain_streams_frames_a_call_later(tiny_components, cfg_type, steps, batch,
                                                                     batched, overlap):
    """overlap_decode decodes each call's x_0 in the next call: the plain stream's outputs one call
    later (the first repeated). overlap_encode denoises the previous call's latents: the plain
    stream's outputs for the frames one call later (the first frame twice)."""
    settings = OVERLAPS[overlap]
    plain = _engine(tiny_components, cfg_type, steps, batch, batched=batched)
    overlapped = _engine(tiny_components, cfg_type, steps, batch, batched=batched, **settings)
    frames = _frames(steps + 3, batch, seed=4)
    seen = [frames[0], *frames[:-1]] if settings.get("overlap_encode") else frames  # what the UNet takes, in order
    reference = [plain(frame) for frame in seen]
    if settings.get("overlap_decode"):
        reference = [reference[0], *reference[:-1]]
    outputs = [overlapped(frame) for frame in frames]
    for k, (out, ref) in enumerate(zip(outputs, reference)):
        assert torch.equal(out, ref), f"call {k}"
    plain_now = _engine(tiny_components, cfg_type, steps, batch, batched=batched)
    assert not torch.equal(outputs[-1], [plain_now(frame) for frame in frames][-1])  # it really is later
    overlapped.reset()  # nothing kept after a reset: its first call does that work itself again
    plain.reset()
    assert torch.equal(overlapped(frames[0]), plain(frames[0]))


@pytest.mark.parametrize("overlap", ["decode", "encode", "both"])
def test_an_overlapped_vae_stays_a_call_behind_across_seed_and_step_count_changes(tiny_components, overlap):
    """What an overlapped VAE keeps (an x_0, a frame's latents) depends on neither the seed nor the
    step count: across those changes its frames go on one call behind the plain stream's, with no
    frame dropped or repeated. A size change starts afresh: nothing kept, as at the start."""
    settings = OVERLAPS[overlap]
    plain = _engine(tiny_components, "self", 2, 1, batched=True)
    overlapped = _engine(tiny_components, "self", 2, 1, batched=True, **settings)
    frames = _frames(9, 1, seed=6)
    changes = {3: dict(seed=12), 6: dict(t_index_list=T_INDEX_LISTS[3])}
    seen = [frames[0], *frames[:-1]] if settings.get("overlap_encode") else frames  # what the UNet takes
    reference, outputs = [], []
    for k, (frame, fed) in enumerate(zip(frames, seen)):
        for engine in (plain, overlapped):
            engine.update(**changes.get(k, {}))
        reference.append(plain(fed))
        outputs.append(overlapped(frame))
    if settings.get("overlap_decode"):
        reference = [reference[0], *reference[:-1]]
    for k, (out, ref) in enumerate(zip(outputs, reference)):
        assert torch.equal(out, ref), f"call {k}"
    for engine in (plain, overlapped):
        engine.update(resolution=(SIZE + 32, SIZE))
    assert overlapped.state.undecoded is None and overlapped.state.encoded is None
    assert torch.equal(overlapped(frames[0]), plain(frames[0]))


@pytest.mark.parametrize("name", ["overlap_decode", "overlap_encode"])
def test_an_overlapped_vae_is_for_img2img_only(name):
    with pytest.raises(ValueError, match=f"{name}: for img2img only"):
        StreamConfig(device="cpu", mode="txt2img", **{name: True})


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
