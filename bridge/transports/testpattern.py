"""`testpattern`: a moving, timestamped picture with no dependencies (like GStreamer's videotestsrc).

Each frame carries its sequence number and capture time in pixels (see bridge.framecode), so
a sink can measure capture-to-publish latency from the picture alone.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from .. import framecode
from ..frames import PIXEL_FORMATS, Frame, FrameFormat, swizzle
from .base import Source, SourceLost

MAX_SIZE = 8192  # pixels a side (a 100000 x 100000 pattern asked for 37 GiB)


class TestPatternSource(Source):
    """Frames at `fps`, paced by the clock: a colour gradient scrolling right, a bouncing square,
    and the frame-code bands on top."""

    __test__ = False  # not a pytest test class

    def __init__(self, *, width: int = 640, height: int = 480, fps: float = 30.0, pixel_format: str = "RGB") -> None:
        if not isinstance(fps, (int, float)) or not 0 < fps <= 1000:
            raise ValueError(f"fps: {fps!r} must be a number in (0, 1000]")
        if pixel_format not in PIXEL_FORMATS:
            raise ValueError(f"pixel_format: {pixel_format!r} must be one of {', '.join(PIXEL_FORMATS)}")
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SIZE:
                raise ValueError(f"{name}: {value!r} must be an integer in 1..{MAX_SIZE}")
        self.format = FrameFormat(width, height, pixel_format)
        self._period = 1.0 / fps
        self._sequence = 0
        self._next_due = time.monotonic()
        self._closed = False
        self._lock = threading.Lock()
        x = np.linspace(0, 255, width, dtype=np.float32)[None, :]  # (1, W)
        y = np.linspace(0, 255, height, dtype=np.float32)[:, None]  # (H, 1)
        background = np.stack(
            [np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)), (x + y) / 2], axis=2
        ).astype(np.uint8)  # (H, W, 3)
        self._strip = np.concatenate([background, background], axis=1)  # (H, 2W, 3): scrolling is a slice

    def read(self, timeout: float = 0.1) -> Frame | None:
        if self._closed:
            raise SourceLost("test pattern closed")
        now = time.monotonic()
        wait = self._next_due - now
        if wait > timeout:
            time.sleep(max(0.0, timeout))
            return None
        if wait > 0:
            time.sleep(wait)
        now = time.monotonic()
        # a late reader gets the current picture, not a burst of old ones
        self._next_due = max(self._next_due + self._period, now - self._period)
        frame = Frame(self._render(self._sequence, now), self.format.pixel_format, now, self._sequence)
        self._sequence += 1
        return frame

    def _render(self, sequence: int, now: float) -> np.ndarray:
        height, width = self.format.height, self.format.width
        start = width - (sequence * 4) % width  # the background scrolled right by 4 pixels a frame
        pixels = self._strip[:, start : start + width].copy()  # (H, W, 3)
        size = max(4, min(width, height) // 5)
        span_x, span_y = max(1, width - size), max(1, height - size)
        left = abs((sequence * 7) % (2 * span_x) - span_x)
        top = abs((sequence * 5) % (2 * span_y) - span_y)
        pixels[top : top + size, left : left + size] = (255, 255, 255)
        framecode.encode(pixels, sequence, framecode.milliseconds(now))
        return swizzle(pixels, "RGB", self.format.pixel_format)

    def close(self) -> None:
        with self._lock:
            self._closed = True
