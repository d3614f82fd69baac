"""`virtualcam`: a virtual webcam through pyvirtualcam (OBS Virtual Camera or Unity Capture on
Windows, OBS on macOS, v4l2loopback on Linux), so OBS, Zoom or a browser sees the output."""

from __future__ import annotations

import sys
import threading

from ..frames import Frame, FrameFormat
from .base import Sink, TransportUnavailable, pixels_in

_LINUX_HINT = "no v4l2loopback device: run `sudo modprobe v4l2loopback devices=1 exclusive_caps=1`"


def _one_line(message: str) -> str:
    """pyvirtualcam lists one failure per backend, one per line; a user reads one line."""
    if "v4l2 loopback device" in message or "v4l2loopback" in message and "modprobe" in message:
        return _LINUX_HINT
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return "; ".join(lines) or "unknown error"


def import_pyvirtualcam():
    try:
        import pyvirtualcam
    except ImportError:
        raise TransportUnavailable("the virtual camera needs pyvirtualcam: pip install pyvirtualcam") from None
    return pyvirtualcam


class VirtualCamSink(Sink):
    """RGB frames of the engine's size to a virtual camera. `backend` and `device` as in
    pyvirtualcam.Camera (None: the first backend and device that work)."""

    def __init__(
        self, *, width: int, height: int, fps: float = 30.0, device: str | None = None, backend: str | None = None
    ) -> None:
        pyvirtualcam = import_pyvirtualcam()
        if backend is not None and backend not in pyvirtualcam.camera.BACKENDS:
            known = ", ".join(pyvirtualcam.camera.BACKENDS) or "none on this OS"
            raise TransportUnavailable(f"virtual camera backend {backend!r} is not available (available: {known})")
        if not pyvirtualcam.camera.BACKENDS:
            raise TransportUnavailable(f"pyvirtualcam has no virtual camera backend on {sys.platform}")
        self.format = FrameFormat(width, height, "RGB")
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._camera = pyvirtualcam.Camera(
                width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB, device=device, backend=backend
            )
        except RuntimeError as exc:
            raise TransportUnavailable(f"virtual camera: {_one_line(str(exc))}") from None

    @property
    def device(self) -> str:
        return self._camera.device

    @property
    def backend(self) -> str:
        return self._camera.backend

    def send(self, frame: Frame) -> None:
        pixels = pixels_in(frame, self.format)
        with self._lock:
            if not self._closed:
                self._camera.send(pixels)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._camera.close()
