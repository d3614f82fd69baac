"""Frames of every accepted kind go in and come out the same kind; bad ones get a clear error."""

import numpy as np
import pytest
import torch

from pipeline import StreamConfig, StreamDiffusion

SIZE = 64


@pytest.fixture(scope="module")
def engine(tiny_components):
    return StreamDiffusion(tiny_components, StreamConfig(width=SIZE, height=SIZE, device="cpu", t_index_list=(20, 40)))


@pytest.fixture(scope="module")
def batch_engine(tiny_components):
    config = StreamConfig(width=SIZE, height=SIZE, device="cpu", t_index_list=(20, 40), frame_buffer_size=2)
    return StreamDiffusion(tiny_components, config)


def test_numpy_uint8_hwc_any_size(engine):
    out = engine(np.zeros((90, 120, 3), np.uint8))
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (SIZE, SIZE, 3)


def test_torch_uint8_hwc(engine):
    out = engine(torch.zeros((SIZE, SIZE, 3), dtype=torch.uint8))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_torch_float_chw_keeps_dtype(engine, dtype):
    out = engine(torch.rand((3, 32, 48)).to(dtype))
    assert out.dtype == dtype and out.shape == (3, SIZE, SIZE)
    assert 0.0 <= out.min().item() and out.max().item() <= 1.0


def test_a_numpy_view_with_negative_strides_is_taken(tiny_components):
    """OpenCV's BGR-to-RGB `bgr[..., ::-1]` (and a flip, `[::-1]`) failed in torch.from_numpy."""
    config = StreamConfig(width=SIZE, height=SIZE, device="cpu", t_index_list=(20,), cfg_type="none")
    bgr = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), np.uint8)
    for view in (bgr[..., ::-1], bgr[::-1]):
        expected = StreamDiffusion(tiny_components, config)(np.ascontiguousarray(view))
        assert np.array_equal(StreamDiffusion(tiny_components, config)(view), expected)


def test_a_float_frame_with_nan_or_inf_never_brings_them_into_the_stream(tiny_components):
    """A NaN input went out as the first output (the fallback is the input), and primed the frames
    in flight with NaN latents: the next good frames came out NaN too."""
    engine = StreamDiffusion(tiny_components, StreamConfig(width=SIZE, height=SIZE, device="cpu",
                                                           t_index_list=(20, 40)))
    bad = torch.rand(3, SIZE, SIZE)
    bad[:, :8] = float("nan")
    bad[:, 8:16] = float("inf")
    outputs = [engine(bad), *(engine(torch.rand(3, SIZE, SIZE)) for _ in range(3))]
    assert all(torch.isfinite(out).all() for out in outputs)
    assert engine.stats.nonfinite_caught == 0


def test_rgba_drops_alpha_and_grey_is_repeated(engine):
    assert engine(np.zeros((SIZE, SIZE, 4), np.uint8)).shape == (SIZE, SIZE, 3)
    assert engine(np.zeros((SIZE, SIZE, 1), np.uint8)).shape == (SIZE, SIZE, 3)


def test_batch_of_frames(batch_engine):
    out = batch_engine(np.zeros((2, SIZE, SIZE, 3), np.uint8))
    assert out.shape == (2, SIZE, SIZE, 3)
    with pytest.raises(ValueError, match="batch of 2 frames"):
        batch_engine(np.zeros((SIZE, SIZE, 3), np.uint8))


def test_single_frame_may_carry_a_batch_dimension_of_one(engine):
    assert engine(np.zeros((1, SIZE, SIZE, 3), np.uint8)).shape == (1, SIZE, SIZE, 3)


@pytest.mark.parametrize(
    "frame,message",
    [
        (np.zeros((SIZE, SIZE, 3), np.float32), "numpy frames must be uint8"),
        (np.zeros((SIZE, SIZE, 5), np.uint8), "1, 3 or 4 channels"),
        (np.zeros((SIZE, SIZE), np.uint8), "expected one frame"),
        (torch.zeros((SIZE, SIZE, 3), dtype=torch.int32), "uint8 .* or float"),
        (torch.zeros((2, SIZE, SIZE)), "1, 3 or 4 channels"),
        (np.zeros((0, SIZE, 3), np.uint8), "empty frame"),
        ([[0, 0, 0]], "numpy array, a torch tensor or a DLPack tensor"),
    ],
)
def test_bad_frames_get_a_clear_error(engine, frame, message):
    with pytest.raises(ValueError, match=message):
        engine(frame)


def test_txt2img_mode_refuses_frames_and_generates(tiny_components):
    config = StreamConfig(width=SIZE, height=SIZE, device="cpu", mode="txt2img", t_index_list=(0, 30))
    engine = StreamDiffusion(tiny_components, config)
    with pytest.raises(ValueError, match="txt2img"):
        engine(np.zeros((SIZE, SIZE, 3), np.uint8))
    frames = [engine.txt2img() for _ in range(3)]
    assert all(f.shape == (SIZE, SIZE, 3) and f.dtype == np.uint8 for f in frames)
    assert not np.array_equal(frames[1], frames[2])  # fresh noise every frame


def test_txt2img_from_the_seeds_noise_is_a_still_picture_that_morphs_with_a_seed_blend(tiny_components):
    config = StreamConfig(width=SIZE, height=SIZE, device="cpu", mode="txt2img", t_index_list=(0, 30),
                          txt2img_noise="seed")
    engine = StreamDiffusion(tiny_components, config)
    frames = [engine.txt2img() for _ in range(4)]
    assert np.array_equal(frames[2], frames[3])  # once the frames in flight are its own: the same picture
    engine.update(seed_blend=[(2, 0.5), (9, 0.5)])
    halfway = [engine.txt2img() for _ in range(3)][-1]
    engine.update(seed=9)
    nine = [engine.txt2img() for _ in range(3)][-1]
    assert not np.array_equal(halfway, frames[3]) and not np.array_equal(halfway, nine)
    engine.update(txt2img_noise="new")
    assert not np.array_equal(engine.txt2img(), engine.txt2img())
    with pytest.raises(ValueError, match="txt2img_noise: 'fixed' must be one of new, seed"):
        engine.update(txt2img_noise="fixed")


def test_size_that_does_not_fit_the_model(tiny_components):
    with pytest.raises(ValueError, match="width: 72 must be a multiple of 16"):
        StreamDiffusion(tiny_components, StreamConfig(width=72, height=64, device="cpu"))


def test_reset_restarts_the_stream(tiny_components):
    engine = StreamDiffusion(tiny_components, StreamConfig(width=SIZE, height=SIZE, device="cpu", t_index_list=(10, 30)))
    frame = np.full((SIZE, SIZE, 3), 100, np.uint8)
    first = engine(frame)
    engine(np.zeros((SIZE, SIZE, 3), np.uint8))
    engine.reset()
    assert np.array_equal(engine(frame), first)


class _NaNAfter(torch.nn.Module):
    """Wraps a UNet so that chosen calls predict NaN everywhere (a model that blows up)."""

    def __init__(self, unet, bad_calls):
        super().__init__()
        self.unet, self.bad_calls, self.calls = unet, set(bad_calls), 0
        self.config = unet.config

    def forward(self, *args, **kwargs):
        out = self.unet(*args, **kwargs)
        self.calls += 1
        if self.calls in self.bad_calls:
            out = (out[0] * float("nan"),)
        return out


def test_nan_producing_model_never_yields_a_nan_frame(tiny_components):
    engine = StreamDiffusion(tiny_components, StreamConfig(width=SIZE, height=SIZE, device="cpu", t_index_list=(25,)))
    engine.backend.unet = _NaNAfter(engine.backend.unet, bad_calls={2, 3, 5})
    outputs = [engine(torch.rand(3, SIZE, SIZE)) for _ in range(6)]
    assert all(torch.isfinite(out).all() for out in outputs)
    assert engine.stats.nonfinite_caught == 3
    assert torch.equal(outputs[1], outputs[0]) and torch.equal(outputs[2], outputs[0])  # the last good one
    assert not torch.equal(outputs[3], outputs[0])


class _BlackOn(torch.nn.Module):
    """Wraps a VAE decoder so that chosen calls return an all-black picture."""

    def __init__(self, decode, bad_calls):
        super().__init__()
        self.decode_fn, self.bad_calls, self.calls = decode, set(bad_calls), 0

    def __call__(self, latents):
        out = self.decode_fn(latents)
        self.calls += 1
        return torch.full_like(out, -1.0) if self.calls in self.bad_calls else out


def test_black_output_of_a_non_black_input_is_replaced(tiny_components):
    engine = StreamDiffusion(tiny_components, StreamConfig(width=SIZE, height=SIZE, device="cpu", t_index_list=(25,)))
    engine.backend.decode = _BlackOn(engine.backend.decode, bad_calls={2, 4})
    outputs = [engine(torch.rand(3, SIZE, SIZE)) for _ in range(4)]
    assert all(out.amax() > 0.01 for out in outputs)
    assert torch.equal(outputs[1], outputs[0]) and torch.equal(outputs[3], outputs[2])
    assert engine.stats.black_caught == 2 and engine.stats.nonfinite_caught == 0 and engine.stats.bad_caught == 2
    # a black scene may come out black: it is not counted
    engine.backend.decode = _BlackOn(engine.backend.decode.decode_fn, bad_calls={1})
    assert engine(torch.zeros(3, SIZE, SIZE)).amax() == 0.0
    assert engine.stats.black_caught == 2


class _ForeignTensor:
    """A tensor from another library, seen only through the DLPack protocol."""

    def __init__(self, tensor):
        self._tensor = tensor

    def __dlpack__(self, **kwargs):
        return self._tensor.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._tensor.__dlpack_device__()


def test_dlpack_frames_go_in_without_a_copy_and_come_back_as_tensors(engine):
    pixels = torch.zeros((SIZE, SIZE, 3), dtype=torch.uint8)
    out = engine(_ForeignTensor(pixels))
    assert isinstance(out, torch.Tensor) and out.shape == (SIZE, SIZE, 3) and out.device == pixels.device
    assert torch.equal(out, engine(pixels))  # the same frame as the tensor itself gives
    assert torch.from_dlpack(_ForeignTensor(pixels)).data_ptr() == pixels.data_ptr()  # shared, not copied


def test_pixels_to_images_is_the_conversion_to_model_input_makes():
    from pipeline.frames import pixels_to_images

    rng = np.random.default_rng(1)
    pixels = torch.from_numpy(rng.integers(0, 256, (2, 24, 16, 3), dtype=np.uint8))
    for dtype in (torch.float32, torch.bfloat16):
        expected = pixels.permute(0, 3, 1, 2).to(dtype).div(255.0).mul(2.0).sub(1.0)
        got = pixels_to_images(pixels, dtype)
        assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, expected)
    assert torch.equal(pixels_to_images(pixels[:, :1, :1], torch.float32).flatten()[:3],
                       pixels[0, 0, 0].float() / 255.0 * 2.0 - 1.0)


def test_submit_returns_a_pending_frame_that_is_ready_on_the_cpu(engine):
    rng = np.random.default_rng(2)
    frames = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(3)]
    reference = StreamDiffusion(engine.components, engine.config)
    engine.reset()
    pending = [engine.submit(frame) for frame in frames]
    assert all(p.ready for p in pending)  # nothing runs asynchronously on a CPU
    for p, frame in zip(pending, frames):
        assert np.array_equal(p.result(), reference(frame)) and p.result() is p.result()


# ------------------------------------------------------------------ a source of another aspect ratio


@pytest.mark.parametrize("source, target, fit, boxes", [
    ((1280, 720), (512, 512), "crop", ((280, 0, 720, 720), (0, 0, 512, 512))),  # the middle square
    ((720, 1280), (512, 512), "crop", ((0, 280, 720, 720), (0, 0, 512, 512))),  # portrait: the middle rows
    ((1280, 720), (512, 512), "letterbox", ((0, 0, 1280, 720), (0, 112, 512, 288))),  # bars above and below
    ((640, 640), (768, 448), "letterbox", ((0, 0, 640, 640), (160, 0, 448, 448))),  # bars left and right
    ((1280, 720), (512, 512), "stretch", ((0, 0, 1280, 720), (0, 0, 512, 512))),
    ((1920, 1080), (1024, 576), "crop", ((0, 0, 1920, 1080), (0, 0, 1024, 576))),  # same aspect: all of it
])
def test_fit_boxes(source, target, fit, boxes):
    from pipeline.frames import fit_boxes

    assert fit_boxes(*source, *target, fit) == boxes


@pytest.mark.parametrize("source, fit, zoom, pan, taken", [
    ((1280, 720), "crop", 1.0, (-1.0, 0.0), (0, 0, 720, 720)),  # the crop slid to the left edge
    ((1280, 720), "crop", 1.0, (1.0, 0.0), (560, 0, 720, 720)),  # and to the right one
    ((1280, 720), "crop", 1.0, (0.0, 1.0), (280, 0, 720, 720)),  # no room to slide down
    ((1280, 720), "crop", 2.0, (0.0, 0.0), (460, 180, 360, 360)),  # half the width and height, in the middle
    ((512, 512), "crop", 2.0, (1.0, 1.0), (256, 256, 256, 256)),  # the bottom right quarter
    ((1280, 720), "letterbox", 2.0, (-1.0, -1.0), (0, 0, 640, 360)),  # the top left quarter, still letterboxed
])
def test_zoom_and_pan_take_a_part_of_what_the_fit_takes(source, fit, zoom, pan, taken):
    from pipeline.frames import fit_boxes

    box, placed = fit_boxes(*source, 512, 512, fit, zoom=zoom, pan=pan)
    assert box == taken and placed == fit_boxes(*source, 512, 512, fit)[1]


def _three_bands(height=40, width=120):
    """A wide picture: a grey middle third between a red and a blue one."""
    picture = np.zeros((height, width, 3), np.uint8)
    picture[:, : width // 3] = (255, 0, 0)
    picture[:, width // 3: 2 * width // 3] = (128, 128, 128)
    picture[:, 2 * width // 3:] = (0, 0, 255)
    return picture


def test_a_wider_source_is_cropped_letterboxed_or_stretched_into_the_engines_size():
    import torch.nn.functional as F

    from pipeline.frames import frame_kind, to_model_input

    picture = _three_bands()
    convert = lambda fit: to_model_input(picture, frame_kind(picture, 1), width=16, height=16,  # noqa: E731
                                         device=torch.device("cpu"), dtype=torch.float32, fit=fit)[0]
    grey = 128 / 255 * 2 - 1
    cropped = convert("crop")  # the middle 40x40: all grey
    torch.testing.assert_close(cropped, torch.full((3, 16, 16), grey), rtol=0, atol=1e-5)
    boxed = convert("letterbox")  # 120x40 into 16x16: 16x5 in rows 5..9, black above and below
    assert torch.equal(boxed[:, :5], torch.full((3, 5, 16), -1.0))
    assert torch.equal(boxed[:, 10:], torch.full((3, 6, 16), -1.0))
    assert boxed[0, 7, 0] > 0.9 and boxed[2, 7, 15] > 0.9  # red on the left, blue on the right, kept whole
    stretched = convert("stretch")  # what the engine did before fits: all of it squeezed
    expected = F.interpolate(torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255, size=(16, 16),
                             mode="bilinear", antialias=True, align_corners=False)[0] * 2 - 1
    torch.testing.assert_close(stretched, expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="fit: 'zoom' must be one of crop, letterbox, stretch"):
        convert("zoom")


def test_the_fit_changes_while_frames_flow_without_restarting_them(tiny_components):
    config = StreamConfig(width=SIZE, height=SIZE, device="cpu", t_index_list=(20, 40))
    engine = StreamDiffusion(tiny_components, config)
    assert engine.config.input_fit == "crop"
    picture = _three_bands(height=SIZE, width=3 * SIZE)
    engine(picture)
    state = engine.state
    engine.update(input_fit="letterbox")
    assert engine.state is state and engine.config.input_fit == "letterbox"  # the frames in flight go on
    engine(picture)
    with pytest.raises(ValueError, match="input_fit: 'zoom' must be one of crop, letterbox, stretch"):
        engine.update(input_fit="zoom")
    assert engine.config.input_fit == "letterbox"


def test_a_zoom_takes_part_of_a_frame_of_the_engines_own_size():
    """At zoom 2 panned to the bottom right, a frame of the engine's size gives its bottom right
    quarter, enlarged (it does not go the unzoomed frame's short way); zoom and pan are refused
    out of range, by name."""
    import torch.nn.functional as F

    from pipeline.frames import frame_kind, to_model_input

    picture = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    zoomed = to_model_input(picture, frame_kind(picture, 1), width=32, height=32, device=torch.device("cpu"),
                            dtype=torch.float32, zoom=2.0, pan=(1.0, 1.0))[0]
    quarter = torch.from_numpy(picture[16:, 16:]).permute(2, 0, 1)[None].float() / 255
    expected = F.interpolate(quarter, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)[0] * 2 - 1
    torch.testing.assert_close(zoomed, expected, rtol=0, atol=1e-5)
    for name, value, message in (("input_zoom", 0.5, "input_zoom: 0.5 must be a number in 1..8"),
                                 ("input_pan_x", 1.5, "input_pan_x: 1.5 must be a number in -1..1"),
                                 ("input_pan_y", float("nan"), "input_pan_y: nan must be a number in -1..1")):
        with pytest.raises(ValueError, match=message):
            StreamConfig(device="cpu", **{name: value})


def test_the_engine_zooms_frames_of_its_own_size_too(tiny_components):
    """Frames at the engine's size go a short way (straight to the step); at zoom 2 they do not:
    the same frame gives another picture, and back at zoom 1 the first one again."""
    config = StreamConfig(width=SIZE, height=SIZE, device="cpu", t_index_list=(25,), cfg_type="none")
    frame = np.random.default_rng(6).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    engine = StreamDiffusion(tiny_components, config)
    plain = engine(frame).copy()
    engine.update(input_zoom=2.0, input_pan_x=-1.0)
    zoomed = engine(frame).copy()
    engine.update(input_zoom=1.0)
    assert not np.array_equal(zoomed, plain)
    np.testing.assert_array_equal(engine(frame), plain)
