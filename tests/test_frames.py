"""Frames, conversions, the frame code in the pixels, and the newest-frame-wins slot."""

import threading
import time
import warnings

import av
import numpy as np
import pytest

from bridge import framecode
from bridge.frames import PIXEL_FORMATS, Frame, FrameFormat, convert, resize, resize_nearest, swizzle
from bridge.slots import LatestSlot
from clips import write_clip


def test_convert_swizzles_and_resizes_keeping_time_and_number():
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[..., 0] = 200  # red
    frame = Frame(pixels, "RGB", timestamp=1.5, sequence=7)
    out = convert(frame, FrameFormat(3, 2, "BGRA"))
    assert out.pixels.shape == (2, 3, 4)
    assert out.pixels[0, 0].tolist() == [0, 0, 200, 255]
    assert (out.timestamp, out.sequence) == (1.5, 7)


@pytest.mark.parametrize("source", PIXEL_FORMATS)
@pytest.mark.parametrize("target", PIXEL_FORMATS)
def test_swizzle_puts_each_colour_where_the_target_wants_it(source, target):
    """Every pair of pixel formats, by channel name: R, G and B move, alpha is kept, dropped,
    or added as 255 (swizzle copies a channel at a time; this is the meaning it must keep)."""
    pixels = np.random.default_rng(3).integers(0, 256, (5, 7, len(source)), dtype=np.uint8)
    out = swizzle(pixels, source, target)
    assert out.shape == (5, 7, len(target)) and out.dtype == np.uint8 and out.flags.c_contiguous
    for index, channel in enumerate(target):
        expected = pixels[..., source.index(channel)] if channel in source else np.full((5, 7), 255, np.uint8)
        assert np.array_equal(out[..., index], expected), f"{source} -> {target}: channel {channel}"


@pytest.mark.parametrize("size", [(7, 5, 13, 3), (13, 3, 7, 5), (512, 512, 1280, 720), (1280, 720, 512, 512), (6, 4, 6, 9)])
def test_resize_nearest_takes_the_same_pixels_as_one_gather(size):
    """Row r and column c of the result are source row r * H // h and column c * W // w, whichever
    axis resize_nearest gathers first."""
    in_width, in_height, width, height = size
    pixels = np.random.default_rng(4).integers(0, 256, (in_height, in_width, 3), dtype=np.uint8)
    rows, cols = np.arange(height) * in_height // height, np.arange(width) * in_width // width
    assert np.array_equal(resize_nearest(pixels, width, height), pixels[rows[:, None], cols[None, :]])


def _reference_bilinear(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """What a bilinear resize with area averaging when shrinking gives, in floating point: each
    output pixel's centre mapped into the input, a tent of half-width max(1, scale) pixels there,
    its weights normalized (separable: rows, then columns)."""
    def weights(size_in: int, size_out: int) -> np.ndarray:
        scale = size_in / size_out
        support = max(1.0, scale)
        centres = (np.arange(size_out) + 0.5) * scale  # in input pixels
        taps = np.maximum(0.0, 1.0 - np.abs((np.arange(size_in)[None, :] + 0.5) - centres[:, None]) / support)
        return taps / taps.sum(axis=1, keepdims=True)  # (size_out, size_in)

    rows, cols = weights(pixels.shape[0], height), weights(pixels.shape[1], width)
    return np.einsum("yh,hwc,xw->yxc", rows, pixels.astype(np.float64), cols)


@pytest.mark.parametrize("size", [(7, 5, 13, 3), (13, 3, 7, 5), (64, 64, 160, 90), (160, 90, 64, 64), (6, 4, 6, 9)])
@pytest.mark.parametrize("channels", [3, 4])
def test_resize_bilinear_is_a_smooth_average_of_its_neighbours(size, channels):
    """Enlarging blends the two nearest pixels along each axis; shrinking averages every pixel an
    output pixel covers (no pixel skipped: a sink smaller than the engine gets no shimmer). Within
    one level of the floating-point reference (8-bit arithmetic rounds), in a new (H, W, C) array."""
    in_width, in_height, width, height = size
    pixels = np.random.default_rng(5).integers(0, 256, (in_height, in_width, channels), dtype=np.uint8)
    out = resize(pixels, width, height)  # bilinear: the default
    assert out.shape == (height, width, channels) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert np.abs(out.astype(float) - _reference_bilinear(pixels, width, height)).max() < 1.01
    assert resize(pixels, in_width, in_height) is pixels  # its own size: nothing to do
    with pytest.raises(ValueError, match="filter: 'bicubic' must be one of bilinear, nearest"):
        resize(pixels, width, height, "bicubic")


def test_resize_bilinear_takes_a_view_of_a_larger_picture():
    """A crop is a strided view of the frame, a flipped picture one with negative strides, and
    a frame straight from a receiver's buffer may be read-only: each scaled as if it were
    copied out first."""
    pixels = np.random.default_rng(6).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    view = pixels[5:35, 10:50]
    assert np.array_equal(resize(view, 80, 60), resize(view.copy(), 80, 60))
    flipped = pixels[::-1, :, ::-1]
    assert np.array_equal(resize(flipped, 80, 60), resize(flipped.copy(), 80, 60))
    read_only = np.frombuffer(pixels.tobytes(), np.uint8).reshape(pixels.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no library's warning about sharing read-only memory either)
        assert np.array_equal(resize(read_only, 80, 60), resize(pixels, 80, 60))


def test_convert_fits_another_aspect_ratio_as_asked():
    """A wide picture (red, grey, blue thirds) into a square: its middle, all of it on black bars,
    or all of it squeezed."""
    pixels = np.zeros((40, 120, 3), np.uint8)
    pixels[:, :40], pixels[:, 40:80], pixels[:, 80:] = (255, 0, 0), (128, 128, 128), (0, 0, 255)
    frame = Frame(pixels, "RGB", timestamp=2.0, sequence=3)
    square = FrameFormat(12, 12, "RGB")
    assert (convert(frame, square, fit="crop").pixels == 128).all()
    boxed = convert(frame, square, fit="letterbox").pixels  # 12x4 in rows 4..7
    assert not boxed[:4].any() and not boxed[8:].any()
    assert boxed[5, 0].tolist() == [255, 0, 0] and boxed[5, 6].tolist() == [128] * 3
    assert boxed[5, 11].tolist() == [0, 0, 255]
    stretched = convert(frame, square).pixels  # the default
    assert stretched[0, 0].tolist() == [255, 0, 0] and stretched[11, 11].tolist() == [0, 0, 255]
    assert convert(frame, square, fit="crop").timestamp == 2.0
    with pytest.raises(ValueError, match="fit: 'zoom' must be one of"):
        convert(frame, square, fit="zoom")
    # zoomed 2x: a 20x20 part, in the middle (grey), or slid to the picture's left edge (red)
    assert (convert(frame, square, fit="crop", zoom=2.0).pixels == 128).all()
    assert (convert(frame, square, fit="crop", zoom=2.0, pan=(-1.0, 0.0)).pixels == [255, 0, 0]).all()
    assert (convert(frame, square, fit="stretch", zoom=3.0, pan=(1.0, 0.0)).pixels == [0, 0, 255]).all()
    same = FrameFormat(120, 40, "RGB")
    zoomed = convert(frame, same, zoom=2.0).pixels  # at its own size too: x 30..89 of it, enlarged
    assert convert(frame, same) is frame and zoomed.shape == (40, 120, 3)
    assert zoomed[20, 0].tolist() == [255, 0, 0] and zoomed[20, 60].tolist() == [128] * 3
    assert zoomed[20, 119].tolist() == [0, 0, 255]


def test_frame_rejects_wrong_channels_naming_the_field():
    with pytest.raises(ValueError, match="pixels"):
        Frame(np.zeros((2, 2, 3), np.uint8), "RGBA")


@pytest.mark.parametrize("scaling", ["nearest", "bilinear"])
@pytest.mark.parametrize("size", [(640, 480), (256, 256), (1280, 720), (96, 80)])
def test_frame_code_survives_resize(size, scaling):
    """Whichever way a sink scales it (its filter option)."""
    pixels = np.full((480, 640, 3), 90, np.uint8)
    framecode.encode(pixels, 123_456, framecode.milliseconds(98.765))
    width, height = size
    assert framecode.decode(resize(pixels, width, height, scaling)) == (123_456, 98_765)


def test_frame_code_survives_video_compression(tmp_path):
    pictures = []
    for index in range(3):
        pixels = np.random.default_rng(index).integers(0, 255, (256, 256, 3), np.uint8)
        framecode.encode(pixels, 1000 + index, 5000 + index)
        pictures.append(pixels)
    path = write_clip(tmp_path / "code.mp4", pictures, fps=10)
    with av.open(path) as container:
        decoded = [framecode.decode(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    assert decoded == [(1000 + i, 5000 + i) for i in range(3)]


def test_elapsed_ms_wraps_around():
    start = (framecode.MODULUS - 5) / 1000.0
    assert framecode.elapsed_ms(framecode.milliseconds(start), start + 0.010) == 10


def test_slot_newest_wins_and_counts_overwritten():
    slot = LatestSlot()
    slot.put(1)
    slot.put(2)
    assert slot.take(0.0) == 2
    assert slot.overwritten == 1
    assert slot.take(0.0) is None  # each value at most once
    assert slot.peek() == 2


def test_slot_take_waits_at_most_its_timeout_and_wakes_on_put_or_close():
    slot = LatestSlot()
    started = time.monotonic()
    assert slot.take(0.05) is None
    assert 0.04 <= time.monotonic() - started < 0.5
    threading.Timer(0.02, slot.put, args=("x",)).start()
    assert slot.take(2.0) == "x"
    threading.Timer(0.02, slot.close).start()
    started = time.monotonic()
    assert slot.take(2.0) is None
    assert time.monotonic() - started < 1.0



class _Copy:
    """What release_unused asks of a torch.cuda.Event: whether its copy has finished."""

    def __init__(self, done: bool) -> None:
        self.done = done

    def query(self) -> bool:
        return self.done


def test_staging_keeps_free_buffers_for_the_most_recent_shapes_only_and_never_one_still_copying():
    from pipeline.frames import release_unused

    copying = ("down", (96, 96, 3), "uint8")  # the oldest: one of its buffers is still being copied to
    free = {copying: [("copying", _Copy(False)), ("copied", _Copy(True))]}
    free.update({("up", (side, side, 3), "uint8"): [(f"buffer {side}", None)] for side in (64, 128, 256, 512)})
    release_unused(free, kept=2)
    assert list(free) == [copying, ("up", (256, 256, 3), "uint8"), ("up", (512, 512, 3), "uint8")]
    assert [buffer for buffer, _ in free[copying]] == ["copying"]
    free[copying][0][1].done = True
    release_unused(free, kept=2)
    assert list(free) == [("up", (256, 256, 3), "uint8"), ("up", (512, 512, 3), "uint8")]
    release_unused(free, kept=2)  # nothing beyond the limit: nothing dropped
    assert len(free) == 2
