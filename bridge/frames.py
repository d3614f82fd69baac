"""The one frame type that travels between sources, the engine and sinks, and its conversions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PIXEL_FORMATS = ("RGB", "BGR", "RGBA", "BGRA")
FITS = ("crop", "letterbox", "stretch")  # how a frame meets another aspect ratio (`fitted`; pipeline.config.INPUT_FITS)
FILTERS = ("bilinear", "nearest")  # how a frame is scaled on the host (`resize`)


@dataclass(frozen=True)
class FrameFormat:
    """What one side of a connection produces or accepts."""

    width: int  # pixels
    height: int  # pixels
    pixel_format: str = "RGB"  # one of PIXEL_FORMATS, 8 bits per channel

    def __post_init__(self) -> None:
        if self.pixel_format not in PIXEL_FORMATS:
            raise ValueError(f"pixel_format: {self.pixel_format!r} must be one of {', '.join(PIXEL_FORMATS)}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}: {value!r} must be a positive integer")

    @property
    def channels(self) -> int:
        return len(self.pixel_format)

    def __str__(self) -> str:
        return f"{self.width}x{self.height} {self.pixel_format}"


@dataclass(frozen=True)
class Frame:
    """One picture: uint8 pixels (H, W, C) in `pixel_format`, with capture time and number."""

    pixels: np.ndarray  # (H, W, C) uint8, C = len(pixel_format)
    pixel_format: str = "RGB"  # one of PIXEL_FORMATS
    timestamp: float = 0.0  # time.monotonic() when the source captured it
    sequence: int = 0  # the source's frame counter

    def __post_init__(self) -> None:
        if self.pixel_format not in PIXEL_FORMATS:
            raise ValueError(f"pixel_format: {self.pixel_format!r} must be one of {', '.join(PIXEL_FORMATS)}")
        pixels = self.pixels
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3:
            raise ValueError(
                f"pixels: expected a uint8 array (H, W, {len(self.pixel_format)}), got "
                f"{getattr(pixels, 'dtype', type(pixels).__name__)} {getattr(pixels, 'shape', '')}"
            )
        if pixels.shape[2] != len(self.pixel_format):
            raise ValueError(
                f"pixels: {self.pixel_format} needs {len(self.pixel_format)} channels, got {pixels.shape[2]}"
            )

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def format(self) -> FrameFormat:
        return FrameFormat(self.width, self.height, self.pixel_format)


def swizzle(pixels: np.ndarray, source_format: str, target_format: str) -> np.ndarray:
    """Reorder or add/drop channels between RGB/BGR/RGBA/BGRA (alpha added as 255)."""
    if source_format == target_format:
        return pixels
    # a channel at a time into a new array: a fifth of the time of a gather along the last axis
    out = np.empty(pixels.shape[:2] + (len(target_format),), pixels.dtype)
    for index, channel in enumerate(target_format):
        where = source_format.find(channel)
        if where >= 0:
            out[..., index] = pixels[..., where]
        else:  # alpha for a frame without one
            out[..., index] = 255
    return out


def resize(pixels: np.ndarray, width: int, height: int, filter: str = "bilinear") -> np.ndarray:
    """(H, W, C) uint8 pixels at width x height: "bilinear" (smooth; area-averaged when
    shrinking, as the engine scales its input) or "nearest" (each pixel repeated or dropped:
    blocky when enlarging, cheapest)."""
    if filter == "nearest":
        return resize_nearest(pixels, width, height)
    if filter == "bilinear":
        return resize_bilinear(pixels, width, height)
    raise ValueError(f"filter: {filter!r} must be one of {', '.join(FILTERS)}")


def resize_nearest(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize of (H, W, C) pixels."""
    in_height, in_width = pixels.shape[:2]
    if (in_width, in_height) == (width, height):
        return pixels
    rows = (np.arange(height) * in_height // height).astype(np.intp)
    cols = (np.arange(width) * in_width // width).astype(np.intp)
    # one axis at a time, the one that leaves fewer pixels for the other first: a third of
    # the time of one 2-D gather (512x512 into 1280x720: 2 ms instead of 12 on one core)
    if in_height * width <= height * in_width:
        return np.take(np.take(pixels, cols, axis=1), rows, axis=0)
    return np.take(np.take(pixels, rows, axis=0), cols, axis=1)


def resize_bilinear(pixels: np.ndarray, width: int, height: int, out: np.ndarray | None = None) -> np.ndarray:
    """Bilinear resize of (H, W, C) uint8 pixels, antialiased when shrinking (each output pixel
    then averages the input pixels it covers), with Pillow's 8-bit resampling: on the calling
    thread alone, without holding the GIL, and without an OpenMP pool (torch's kernels, 2.5 times
    as fast on 2 cores, would start one in every sink's thread, and idle pools beside the
    inference thread's slow a CPU engine down; bridge/openmp.py). `out`: an (height, width, C)
    array to write into, a view of a larger one allowed (a letterbox's canvas). A new,
    writable array otherwise."""
    in_height, in_width, channels = pixels.shape
    if (in_width, in_height) == (width, height) and out is None:
        return pixels
    from PIL import Image  # (here: only a resize needs it)

    mode = _PIL_MODES[channels]
    source = Image.frombuffer(mode, (in_width, in_height), np.ascontiguousarray(pixels), "raw", mode, 0, 1)
    scaled = source.resize((width, height), Image.Resampling.BILINEAR)
    if out is None:
        out = np.empty((height, width, channels), np.uint8)
    out[...] = np.frombuffer(scaled.tobytes(), np.uint8).reshape(height, width, channels)
    return out


_PIL_MODES = {3: "RGB", 4: "RGBX"}  # (RGBX: the fourth channel resampled like the others, not premultiplied)


def fitted(pixels: np.ndarray, width: int, height: int, fit: str, *, zoom: float = 1.0,
           pan: tuple[float, float] = (0.0, 0.0), filter: str = "bilinear") -> np.ndarray:
    """(H, W, C) pixels at width x height, scaled as `filter` says (`resize`): their middle
    cropped to fill it ("crop"), scaled to fit inside with their aspect ratio kept, centred on
    black ("letterbox": a wide picture in a square gets bars above and below), or "stretch"ed;
    then zoomed and panned; as the engine fits its input (pipeline.frames.fit_boxes)."""
    from pipeline.frames import fit_boxes  # (here: a sink's module loads without torch)

    in_height, in_width = pixels.shape[:2]
    (x, y, taken_width, taken_height), (left, top, placed_width, placed_height) = fit_boxes(
        in_width, in_height, width, height, fit, zoom=zoom, pan=pan)
    taken = pixels[y:y + taken_height, x:x + taken_width]
    if (placed_width, placed_height) == (width, height):
        return resize(taken, width, height, filter)
    out = np.zeros((height, width, *pixels.shape[2:]), pixels.dtype)
    placed = out[top:top + placed_height, left:left + placed_width]  # (a view: the bars stay black)
    if filter == "bilinear":
        resize_bilinear(taken, placed_width, placed_height, out=placed)
    else:
        placed[...] = resize(taken, placed_width, placed_height, filter)
    return out


def convert(frame: Frame, target: FrameFormat, *, fit: str = "stretch", zoom: float = 1.0,
            pan: tuple[float, float] = (0.0, 0.0), filter: str = "bilinear") -> Frame:
    """The same frame in `target`'s size and pixel format (timestamp and sequence kept), a
    frame of another aspect ratio fitted as `fit` says, zoomed and panned, scaled as `filter`
    says (see `fitted`)."""
    if frame.format == target and zoom == 1.0:
        return frame
    pixels = fitted(frame.pixels, target.width, target.height, fit, zoom=zoom, pan=pan, filter=filter)
    pixels = swizzle(pixels, frame.pixel_format, target.pixel_format)
    return Frame(np.ascontiguousarray(pixels), target.pixel_format, frame.timestamp, frame.sequence)
