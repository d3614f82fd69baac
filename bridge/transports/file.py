"""`file:PATH`: an mp4 (or other video container) through PyAV, or a PNG sequence when the
path holds a printf pattern such as `frames/%05d.png`."""

from __future__ import annotations

import os
import threading
import time
from fractions import Fraction

from ..frames import Frame, FrameFormat
from .base import Sink, TransportUnavailable, pixels_in

VIDEO_CODECS = ("libx264", "h264", "mpeg4")  # first one this PyAV build has wins


def is_image_sequence(path: str) -> bool:
    return "%" in os.path.basename(path) and path.lower().endswith(".png")


class FileSink(Sink):
    """Writes each frame sent, timed by the wall clock (a repeated frame is a repeated picture).

    Frames must be `width` x `height` RGB (the runtime converts). `close` flushes the encoder.
    """

    def __init__(self, *, path: str, width: int, height: int, fps: float = 30.0, codec: str | None = None) -> None:
        if not path:
            raise ValueError("path: an output file is needed, as in file:out.mp4")
        if not isinstance(fps, (int, float)) or not 0 < fps <= 1000:
            raise ValueError(f"fps: {fps!r} must be a number in (0, 1000]")
        import av

        self.format = FrameFormat(width, height, "RGB")
        self.path = path
        self.frames_written = 0
        self._fps = fps
        self._lock = threading.Lock()
        self._closed = False
        self._start: float | None = None
        self._last_pts = -1
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            self._container, self._stream = self._open(av, path, codec)
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            raise TransportUnavailable(f"cannot write {path}: {exc}") from None

    def _open(self, av, path: str, codec: str | None):
        rate = self._rate = max(1, round(self._fps))
        if is_image_sequence(path):
            container = av.open(path, "w", format="image2")
            stream = container.add_stream("png", rate=rate)
            stream.pix_fmt = "rgb24"
        else:
            container = av.open(path, "w")
            name = codec or next(c for c in VIDEO_CODECS if c in av.codecs_available)
            stream = container.add_stream(name, rate=rate)
            stream.pix_fmt = "yuv420p"
            if name == "libx264":
                stream.options = {"preset": "veryfast", "tune": "zerolatency"}
        stream.width, stream.height = self.format.width, self.format.height
        return container, stream

    def send(self, frame: Frame) -> None:
        import av

        now = time.monotonic()
        if self._start is None:
            self._start = now
        # presentation time from the clock, strictly increasing, in frames of the nominal rate
        pts = max(self._last_pts + 1, int(round((now - self._start) * self._rate)))
        video_frame = av.VideoFrame.from_ndarray(pixels_in(frame, self.format), format="rgb24")
        video_frame.pts = pts if not is_image_sequence(self.path) else self.frames_written
        video_frame.time_base = Fraction(1, self._rate)
        with self._lock:
            if self._closed:
                return
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)
            self._last_pts = video_frame.pts
            self.frames_written += 1

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
            finally:
                self._container.close()
