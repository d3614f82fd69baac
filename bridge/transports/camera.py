"""`camera:INDEX` or `camera:DEVICE`: a webcam through PyAV (v4l2 on Linux, dshow on Windows,
avfoundation on macOS)."""

from __future__ import annotations

import glob
import os
import sys
import threading

from ..frames import Frame
from .avreader import AVReader
from .base import Source, SourceLost, TransportUnavailable, claim_close


def camera_input(device: str) -> tuple[str, str]:
    """(PyAV file name, input format) for a camera index or name on this OS."""
    if sys.platform.startswith("linux"):
        path = f"/dev/video{device}" if device.isdigit() else device
        if not os.path.exists(path):
            found = ", ".join(sorted(glob.glob("/dev/video*"))) or "none"
            raise TransportUnavailable(f"no camera at {path} (video devices found: {found})")
        return path, "v4l2"
    if sys.platform == "win32":
        if device.isdigit():
            raise TransportUnavailable("on Windows name the camera as DirectShow lists it, e.g. camera:\"Integrated Camera\"")
        return f"video={device}", "dshow"
    if sys.platform == "darwin":
        return device, "avfoundation"
    raise TransportUnavailable(f"cameras are not supported on {sys.platform}")


STALL_SECONDS = 5.0  # a camera silent this long (no frame, no error) is lost, and reopened with backoff


class CameraSource(Source):
    """Frames as the camera delivers them (newest wins). A camera that disappears, or delivers
    nothing for STALL_SECONDS, raises SourceLost; the runtime reopens it with backoff."""

    def __init__(self, *, device: str = "0", width: int | None = None, height: int | None = None, fps: float | None = None) -> None:
        file, input_format = camera_input(str(device))
        import av

        options = {}
        if width and height:
            options["video_size"] = f"{width}x{height}"
        if fps:
            options["framerate"] = f"{fps:g}"

        def open_container():
            try:
                return av.open(file, format=input_format, options=options, metadata_errors="replace")
            except (av.error.FFmpegError, OSError) as exc:
                raise TransportUnavailable(f"cannot open camera {device}: {exc}") from None

        self.format = None
        self._lock = threading.Lock()
        self._closed = False
        self._reader = AVReader(open_container=open_container, name=f"camera {device}", realtime=False, loop=False,
                                stall_seconds=STALL_SECONDS, live=True)

    def read(self, timeout: float = 0.1) -> Frame | None:
        if self._closed:
            raise SourceLost("camera closed")
        try:
            return self._reader.read(timeout)
        except SourceLost as exc:  # a camera never "ends": treat it as lost so the runtime reopens it
            raise SourceLost(str(exc)) from None

    def close(self) -> None:
        if not claim_close(self):
            return
        self._reader.close()
