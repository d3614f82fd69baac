"""Frames in and out of the engine: kind detection, upload, resize and normalisation on the device.

Accepted (leading batch dimension B = frame_buffer_size when it is > 1, optional when it is 1):
- numpy uint8 (H, W, C), RGB; C = 4 drops alpha, C = 1 is grey repeated to RGB;
- torch uint8 (H, W, C) on any device, the same channel rules;
- torch float (C, H, W) in [0, 1] (values outside are clamped), float32/float16/bfloat16;
- any other tensor with `__dlpack__` (CuPy, JAX, ...), taken zero-copy on its device; it comes
  back as a torch tensor on that device (which speaks DLPack too).
Any size: frames are resized (bilinear, antialiased) to the engine's width x height.
Output is the same kind, on the same device, at the engine's size, with 3 channels (RGB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


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


class HostStaging:
    """Pinned host buffers (one per shape and direction) for numpy frames to and from a CUDA
    device: the upload is a memcpy into page-locked memory and an asynchronous copy, the
    download an asynchronous copy and the frame's one host synchronisation. A buffer is
    written again only after its last copy finished (an event), and a download is copied out
    of its buffer before it is returned, so no caller ever holds memory that is reused."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._upload_done = None  # torch.cuda.Event recorded after the last upload (one, reused)

    def _buffer(self, direction: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        key = (direction, tuple(shape), dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=dtype, pin_memory=True)
        return self._buffers[key]

    def upload(self, array: np.ndarray, device: torch.device) -> torch.Tensor:
        """`array` (uint8) on `device`, through a pinned buffer."""
        host = self._buffer("up", array.shape, torch.uint8)
        if self._upload_done is None:
            self._upload_done = torch.cuda.Event()
        else:
            self._upload_done.synchronize()  # the previous upload from this buffer has finished
        np.copyto(host.numpy(), array)
        tensor = host.to(device, non_blocking=True)
        self._upload_done.record(torch.cuda.current_stream(device))
        return tensor

    def download(self, tensor: torch.Tensor) -> np.ndarray:
        """A host copy of device `tensor` (waits for the device: the frame's one synchronisation)."""
        host = self._buffer("down", tensor.shape, tensor.dtype)
        host.copy_(tensor, non_blocking=True)
        torch.cuda.current_stream(tensor.device).synchronize()
        return host.numpy().copy()


def to_model_input(
    frame, kind: FrameKind, *, width: int, height: int, device: torch.device, dtype: torch.dtype,
    staging: HostStaging | None = None,
) -> torch.Tensor:
    """Upload once and convert on the device: (B, 3, height, width) in [-1, 1], engine dtype.
    With `staging`, a numpy frame goes to a CUDA device through its pinned buffer."""
    if kind.library == "numpy" and staging is not None and torch.device(device).type == "cuda":
        tensor = staging.upload(frame, torch.device(device))
    else:
        tensor = torch.from_numpy(frame) if kind.library == "numpy" else frame
    if not kind.batched:
        tensor = tensor.unsqueeze(0)
    tensor = tensor.to(device, non_blocking=True)
    if kind.layout == "HWC":
        tensor = tensor.permute(0, 3, 1, 2).to(dtype).div_(255.0)  # (B, C, H, W) in [0, 1]
    else:
        tensor = tensor.to(dtype).clamp(0.0, 1.0)
    channels = tensor.shape[1]
    if channels == 4:
        tensor = tensor[:, :3]
    elif channels == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    if tensor.shape[-2:] != (height, width):
        work = tensor.float() if tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu" else tensor
        tensor = F.interpolate(work, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        tensor = tensor.to(dtype)  # (antialiased resize has no bfloat16 CPU kernel: done in float32 there)
    return tensor.mul(2.0).sub_(1.0).contiguous()  # (B, 3, H, W) in [-1, 1]


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the same device."""
    images = images.add(1.0).mul_(0.5).clamp_(0.0, 1.0).mul_(255.0).round_()
    return images.to(torch.uint8).permute(0, 2, 3, 1)


def from_model_output(images: torch.Tensor, kind: FrameKind, *, pixels: torch.Tensor | None = None,
                      staging: HostStaging | None = None):
    """(B, 3, H, W) in [-1, 1] back to the caller's kind, device and layout (one download).
    `pixels`: `to_pixels(images)` when already made (the step graph makes it); `staging`: pinned
    buffers for the download of a numpy frame from a CUDA device."""
    if kind.layout == "HWC":
        images = to_pixels(images) if pixels is None else pixels  # (B, H, W, 3)
    else:
        images = images.add(1.0).mul_(0.5).clamp_(0.0, 1.0).to(kind.dtype)  # (B, 3, H, W) in [0, 1]
    if not kind.batched:
        images = images[0]
    if kind.library == "numpy":
        if staging is not None and images.device.type == "cuda":
            return staging.download(images.contiguous())
        return np.ascontiguousarray(images.cpu().numpy())
    return images.to(kind.device).contiguous()
