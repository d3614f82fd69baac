"""`null`: a sink that accepts every frame and keeps only counts (like GStreamer's fakesink)."""

from __future__ import annotations

import threading

from ..frames import Frame
from .base import Sink


class NullSink(Sink):
    """Discards frames; `frames_sent` and `last_frame` are there for tests and benchmarks."""

    def __init__(self) -> None:
        self.format = None  # accepts whatever the engine produces
        self.frames_sent = 0
        self.last_frame: Frame | None = None
        self._lock = threading.Lock()
        self.closed = False

    def send(self, frame: Frame) -> None:
        self.frames_sent += 1
        self.last_frame = frame

    def close(self) -> None:
        with self._lock:
            self.closed = True
