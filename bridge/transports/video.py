"""`video:PATH`: a video file played in real time (PyAV), once or looping."""

from __future__ import annotations

import os
import threading

from ..frames import Frame
from .avreader import AVReader
from .base import Source, SourceLost, TransportUnavailable, claim_close


class VideoSource(Source):
    """Frames of a file at the file's own rate. At the end: start again (`loop=True`) or raise
    SourceEnded, after which the runtime finishes the frames it has and stops."""

    def __init__(self, *, path: str, loop: bool = False, realtime: bool = True) -> None:
        if not path:
            raise ValueError("path: a video file is needed, as in video:clip.mp4")
        if not os.path.exists(path):
            raise TransportUnavailable(f"video file not found: {path}")
        if not os.path.isfile(path):  # (a pipe would block the open until a writer came)
            raise TransportUnavailable(f"{path} is not a file (a folder, a device or a named pipe); video: plays files")
        import av  # imported here: `sdbridge --help` stays instant

        def open_container():
            try:
                return av.open(path, metadata_errors="replace")  # (garbled tags must not stop the picture)
            except av.error.FFmpegError as exc:
                raise TransportUnavailable(f"cannot open video {path}: {exc}") from None

        self.format = None  # whatever size the file has; the runtime converts
        self._lock = threading.Lock()
        self._closed = False
        container = open_container()
        try:
            if not container.streams.video:
                raise TransportUnavailable(f"{path} has no video stream")
        finally:
            container.close()
        self._reader = AVReader(open_container=open_container, name=f"video {path}", realtime=realtime, loop=loop)

    def read(self, timeout: float = 0.1) -> Frame | None:
        if self._closed:
            raise SourceLost("video source closed")
        return self._reader.read(timeout)

    def close(self) -> None:
        if not claim_close(self):
            return
        self._reader.close()
