"""Frames in and out of the engine: kind detection, upload, resize and normalisation on the device.

Accepted (leading batch dimension B = frame_buffer_size when it is > 1, optional when it is 1):
- numpy uint8 (H, W, C), RGB; C = 4 drops alpha, C = 1 is grey repeated to RGB;
- torch uint8 (H, W, C) on any device, the same channel rules;
- torch float (C, H, W) in [0, 1] (values outside are clamped), float32/float16/bfloat16;
- any other tensor with `__dlpack__` (CuPy, JAX, ...), taken zero-copy on its device; it comes
  back as a torch tensor on that device (which speaks DLPack too).
Any size: frames are resized (bilinear, antialiased) to the engine's width x height; a frame of
another aspect ratio is fitted first (`fit_boxes`): its middle cropped to the engine's aspect
("crop", the default), shown whole on black bars ("letterbox"), or stretched ("stretch").
Output is the same kind, on the same device, at the engine's size, with 3 channels (RGB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import INPUT_FITS

Box = tuple[int, int, int, int]  # (x, y, width, height) in pixels


def fit_boxes(in_width: int, in_height: int, width: int, height: int, fit: str, *, zoom: float = 1.0,
              pan: tuple[float, float] = (0.0, 0.0)) -> tuple[Box, Box]:
    """(the part of an in_width x in_height picture to take, where it goes in a width x height
    one): "crop" takes the largest part of the target's aspect ratio and fills the target;
    "letterbox" takes all of it and places it in the middle, scaled to fit, aspect kept (the
    rest is black); "stretch" takes all of it to all of the target. `zoom` (>= 1) then takes
    1/zoom of that part's width and height; `pan` (x, y, each -1..1) slides what is taken across
    the picture, from its left (top) edge at -1 through the middle at 0 to its right (bottom)
    edge at 1."""
    if fit not in INPUT_FITS:
        raise ValueError(f"fit: {fit!r} must be one of {', '.join(INPUT_FITS)}")
    target = (0, 0, width, height)
    if fit == "crop" and in_width * height != in_height * width:
        scale = max(width / in_width, height / in_height)
        taken = (min(in_width, max(1, round(width / scale))), min(in_height, max(1, round(height / scale))))
    else:
        taken = (in_width, in_height)
    placed = target
    if fit == "letterbox" and in_width * height != in_height * width:
        scale = min(width / in_width, height / in_height)
        placed_width = min(width, max(1, round(in_width * scale)))
        placed_height = min(height, max(1, round(in_height * scale)))
        placed = ((width - placed_width) // 2, (height - placed_height) // 2, placed_width, placed_height)
    taken = (max(1, round(taken[0] / zoom)), max(1, round(taken[1] / zoom)))
    x, y = (_slide(in_width - taken[0], pan[0]), _slide(in_height - taken[1], pan[1]))
    return (x, y, *taken), placed


def _slide(spare: int, pan: float) -> int:
    """Where a part `spare` pixels shorter than the picture starts at `pan` (-1..1; 0: the middle,
    spare // 2), in whole pixels (pan taken to a thousandth, so the arithmetic is exact)."""
    return spare * round((1.0 + pan) * 1000) // 2000


@dataclass(frozen=True)
class FrameKind:
    """How a frame arrived, so the output goes back the same way."""

    library: str  # "numpy" or "torch"
    layout: str  # "HWC" (uint8) or "CHW" (float)
    batched: bool  # had a leading batch dimension
    device: torch.device  # where the caller's frame lived
    dtype: torch.dtype  # the caller's element type


def _describe(frame) -> str:
    return f"{type(frame).__module__}.{type(frame).__name__} {getattr(frame, 'dtype', '')} {tuple(getattr(frame, 'shape', ()))}"


def as_tensor(frame):
    """A tensor from another library (CuPy, JAX, ...) through DLPack, zero-copy and on its own
    device; numpy arrays and torch tensors are returned as they are."""
    if isinstance(frame, (np.ndarray, torch.Tensor)) or not hasattr(frame, "__dlpack__"):
        return frame
    try:
        return torch.from_dlpack(frame)
    except (RuntimeError, TypeError, BufferError) as exc:
        raise ValueError(f"frame: {_describe(frame)} could not be shared through DLPack ({exc})") from None


def frame_kind(frame, frame_buffer_size: int) -> FrameKind:
    """Classify a frame or raise ValueError naming what is wrong with it."""
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8:
            raise ValueError(f"frame: numpy frames must be uint8 (H, W, C); got {_describe(frame)}")
        library, layout, dtype, device = "numpy", "HWC", torch.uint8, torch.device("cpu")
    elif isinstance(frame, torch.Tensor):
        if frame.dtype == torch.uint8:
            layout = "HWC"
        elif frame.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            layout = "CHW"
        else:
            raise ValueError(f"frame: tensors must be uint8 (H, W, C) or float (C, H, W); got {_describe(frame)}")
        library, dtype, device = "torch", frame.dtype, frame.device
    else:
        raise ValueError(f"frame: expected a numpy array, a torch tensor or a DLPack tensor; got {_describe(frame)}")
    if frame.ndim == 3 and frame_buffer_size == 1:
        batched = False
    elif frame.ndim == 4 and frame.shape[0] == frame_buffer_size:
        batched = True
    else:
        what = f"a batch of {frame_buffer_size} frames" if frame_buffer_size > 1 else "one frame"
        raise ValueError(
            f"frame: expected {what} ({layout}{', with a leading batch dimension' if frame_buffer_size > 1 else ''}); "
            f"got {_describe(frame)}"
        )
    channels = frame.shape[-1] if layout == "HWC" else frame.shape[-3]
    if channels not in (1, 3, 4):
        raise ValueError(f"frame: expected 1, 3 or 4 channels ({layout}); got {channels} in {_describe(frame)}")
    if min(frame.shape[-3:]) == 0:
        raise ValueError(f"frame: empty frame {_describe(frame)}")
    return FrameKind(library, layout, batched, device, dtype)


class PendingFrame:
    """A frame on its way out of the engine: `result()` gives it (waiting for the device if its
    copy to the host is still running). Returned by `StreamDiffusion.submit`."""

    def __init__(self, value=None, wait=None) -> None:
        self._value, self._wait = value, wait  # the frame, or the call that waits for it and gives it

    def result(self):
        """The frame, in the caller's kind; the same object on every call."""
        if self._wait is not None:
            self._value, self._wait = self._wait(), None
        return self._value

    @property
    def ready(self) -> bool:
        """True once `result()` no longer waits."""
        return self._wait is None


class HostStaging:
    """Pinned host buffers for numpy frames to and from a CUDA device, with the copies on side
    streams so that they overlap the frames computing on the current stream.

    Upload: the frame is copied (a memcpy) into a free pinned buffer, then to the device on the
    upload stream; the current stream waits for that copy only, so a frame can be uploaded while
    the previous one still computes. Download: the download stream waits for the current
    stream's work so far, then copies to a pinned buffer; `result()` waits for that copy (the
    frame's one host synchronisation) and copies the frame out of the buffer, which is then
    free again. A pinned buffer is reused only once its copy finished, and device memory that
    crosses streams is kept until both are done with it (`record_stream`). Several frames may be
    in flight at once; each holds its own buffers."""

    SHAPES_KEPT = 8  # free buffers are kept for this many (direction, shape, dtype), the most recently used

    def __init__(self) -> None:
        # (direction, shape, dtype) -> [(pinned buffer, its last copy's event)], least recently used first
        self._free: dict[tuple, list] = {}
        self._streams: dict[torch.device, tuple] = {}  # device -> (upload stream, download stream)

    def _side_streams(self, device: torch.device) -> tuple:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device]

    def _take(self, key: tuple):
        """A pinned buffer whose last copy has finished (a new one when none is)."""
        pool = self._free.pop(key, [])
        self._free[key] = pool  # now the most recently used
        release_unused(self._free, self.SHAPES_KEPT)
        for index, (buffer, event) in enumerate(pool):
            if event is None or event.query():
                del pool[index]
                return buffer
        _, shape, dtype = key
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def _give_back(self, key: tuple, buffer: torch.Tensor, event) -> None:
        self._free.setdefault(key, []).append((buffer, event))

    def upload(self, array: np.ndarray, device: torch.device) -> torch.Tensor:
        """`array` (uint8) on `device`, copied on the upload stream; ready for the current stream."""
        key = ("up", tuple(array.shape), torch.uint8)
        host = self._take(key)
        np.copyto(host.numpy(), array)
        current = torch.cuda.current_stream(device)
        upload, _ = self._side_streams(device)
        with torch.cuda.stream(upload):
            tensor = host.to(device, non_blocking=True)  # allocated for the upload stream
            copied = torch.cuda.Event()
            copied.record(upload)
        current.wait_event(copied)
        tensor.record_stream(current)  # freed only once the current stream is done with it too
        self._give_back(key, host, copied)
        return tensor

    def download_async(self, tensor: torch.Tensor, *, owned: bool = True) -> PendingFrame:
        """A host copy of device `tensor`, made on the download stream once the current stream's
        work so far is done. `owned=False`: `tensor` is memory the current stream writes again
        soon (a graph's output), so it is first copied on the device (a few microseconds)."""
        current = torch.cuda.current_stream(tensor.device)
        if not owned:
            tensor = tensor.clone()
        key = ("down", tuple(tensor.shape), tensor.dtype)
        host = self._take(key)
        _, download = self._side_streams(tensor.device)
        download.wait_stream(current)
        with torch.cuda.stream(download):
            host.copy_(tensor, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(download)
        tensor.record_stream(download)

        def wait() -> np.ndarray:
            copied.synchronize()
            frame = host.numpy().copy()
            self._give_back(key, host, None)
            return frame

        return PendingFrame(wait=wait)

    def download(self, tensor: torch.Tensor) -> np.ndarray:
        """A host copy of device `tensor` (waits for the device: the frame's one synchronisation)."""
        return self.download_async(tensor).result()


def release_unused(free: dict[tuple, list], kept: int) -> None:
    """Drop the free buffers of the least recently used keys of `free` (oldest first) beyond
    `kept` keys, except those whose copy may still run (an event not yet done): a size sweep (an
    operator's /sd/resolution fader) would otherwise keep pinned memory for every size it passed.
    Torch's pinned-memory cache then reuses what they held."""
    for key in list(free)[:-kept] if len(free) > kept else []:
        pending = [(buffer, event) for buffer, event in free[key] if event is not None and not event.query()]
        if pending:
            free[key] = pending
        else:
            del free[key]


def tensor_from_numpy(frame: np.ndarray) -> torch.Tensor:
    """`frame` as a CPU tensor sharing its memory, or a copy when a stride is negative (a view
    such as OpenCV's BGR-to-RGB `bgr[..., ::-1]`, which torch cannot share)."""
    return torch.from_numpy(frame if min(frame.strides, default=0) >= 0 else np.ascontiguousarray(frame))


def to_model_input(
    frame, kind: FrameKind, *, width: int, height: int, device: torch.device, dtype: torch.dtype,
    staging: HostStaging | None = None, fit: str = "crop", zoom: float = 1.0, pan: tuple[float, float] = (0.0, 0.0),
) -> torch.Tensor:
    """Upload once and convert on the device: (B, 3, height, width) in [-1, 1], engine dtype;
    a frame of another aspect ratio fitted as `fit` says, and zoomed and panned (see
    `fit_boxes`). With `staging`, a numpy frame goes to a CUDA device through its pinned buffer."""
    if kind.library == "numpy" and staging is not None and torch.device(device).type == "cuda":
        tensor = staging.upload(frame, torch.device(device))
    else:
        tensor = tensor_from_numpy(frame) if kind.library == "numpy" else frame
    if not kind.batched:
        tensor = tensor.unsqueeze(0)
    tensor = tensor.to(device, non_blocking=True)
    whole = zoom == 1.0  # (at 1, a frame of the engine's size is taken whole wherever it is panned)
    if whole and kind.layout == "HWC" and tensor.shape[-3:] == (height, width, 3):  # the common case, as a step
        return pixels_to_images(tensor, dtype)  # graph does it
    if kind.layout == "HWC":
        tensor = tensor.permute(0, 3, 1, 2).to(dtype).div_(255.0)  # (B, C, H, W) in [0, 1]
    else:  # (a NaN or inf in a float frame: black or white there, never into the stream, where it spreads)
        tensor = tensor.to(dtype).nan_to_num(nan=0.0, posinf=1.0, neginf=0.0).clamp_(0.0, 1.0)
    channels = tensor.shape[1]
    if channels == 4:
        tensor = tensor[:, :3]
    elif channels == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    if not whole or tensor.shape[-2:] != (height, width):
        tensor = _fitted(tensor, width, height, fit, zoom, pan)
    return tensor.mul(2.0).sub_(1.0).contiguous()  # (B, 3, H, W) in [-1, 1]


def _fitted(tensor: torch.Tensor, width: int, height: int, fit: str, zoom: float,
            pan: tuple[float, float]) -> torch.Tensor:
    """(B, C, h, w) in [0, 1] at width x height, fitted, zoomed and panned (see `fit_boxes`)."""
    (x, y, taken_width, taken_height), (left, top, placed_width, placed_height) = fit_boxes(
        tensor.shape[-1], tensor.shape[-2], width, height, fit, zoom=zoom, pan=pan)
    tensor = tensor[..., y:y + taken_height, x:x + taken_width]  # (a view: nothing copied)
    dtype = tensor.dtype
    work = tensor.float() if dtype == torch.bfloat16 and tensor.device.type == "cpu" else tensor
    if tensor.shape[-2:] != (placed_height, placed_width):
        work = F.interpolate(work, size=(placed_height, placed_width), mode="bilinear", antialias=True,
                             align_corners=False)  # (antialiased resize has no bfloat16 CPU kernel: float32 there)
    if (placed_width, placed_height) != (width, height):
        work = F.pad(work, (left, width - placed_width - left, top, height - placed_height - top))  # black bars
    return work.to(dtype)


def takes_pixels(frame, kind: FrameKind, *, width: int, height: int) -> bool:
    """Whether `frame` is 8-bit RGB at exactly width x height (what `pixels_to_images` takes)."""
    return kind.layout == "HWC" and tuple(frame.shape[-3:]) == (height, width, 3)


def pixels_to_images(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1], `dtype`, on the same device (the same
    arithmetic as `to_model_input`, so a step graph that takes pixels gives the same frames)."""
    images = pixels.permute(0, 3, 1, 2).to(dtype).div_(255.0)  # (B, 3, H, W) in [0, 1]
    return images.mul(2.0).sub_(1.0).contiguous()


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the same device."""
    images = images.add(1.0).mul_(0.5).clamp_(0.0, 1.0).mul_(255.0).round_()
    return images.to(torch.uint8).permute(0, 2, 3, 1)


def deliver(images: torch.Tensor, kind: FrameKind, *, pixels: torch.Tensor | None = None,
            staging: HostStaging | None = None, owned: bool = True) -> PendingFrame:
    """(B, 3, H, W) in [-1, 1] on its way back to the caller's kind, device and layout (one
    download). `pixels`: `to_pixels(images)` when already made (the step graph makes it);
    `staging`: pinned buffers and a side stream for the download of a numpy frame from a CUDA
    device, which then runs while the caller goes on; `owned=False`: `images` and `pixels` are
    memory that later work on the device overwrites (a graph's), copied before they are handed out."""
    if kind.layout == "HWC":
        images = to_pixels(images) if pixels is None else pixels  # (B, H, W, 3)
        owned = owned or pixels is None
    else:
        images = images.add(1.0).mul_(0.5).clamp_(0.0, 1.0).to(kind.dtype)  # (B, 3, H, W) in [0, 1]: a new tensor
        owned = True
    if not kind.batched:
        images = images[0]
    if kind.library == "numpy":
        if staging is not None and images.device.type == "cuda":
            return staging.download_async(images.contiguous(), owned=owned)
        array = images.cpu().numpy()
        return PendingFrame(np.ascontiguousarray(array) if owned else array.copy())
    out = images.to(kind.device)
    if out.data_ptr() == images.data_ptr() and not owned:
        out = out.clone()  # the caller keeps it; the graph's memory is written again at the next replay
    return PendingFrame(out.contiguous())


def from_model_output(images: torch.Tensor, kind: FrameKind, *, pixels: torch.Tensor | None = None,
                      staging: HostStaging | None = None):
    """`deliver`, waited for: the frame in the caller's kind."""
    return deliver(images, kind, pixels=pixels, staging=staging).result()
