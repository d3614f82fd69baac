"""Short video files for tests, written with PyAV (a real encoder, real container)."""

from __future__ import annotations

from typing import Iterable

import av
import numpy as np


def write_clip(path, pictures: Iterable[np.ndarray], *, fps: int, codec: str | None = None) -> str:
    """Encode RGB uint8 pictures (H, W, 3), all the same size, into an mp4 at `fps`; the path."""
    pictures = list(pictures)
    height, width = pictures[0].shape[:2]
    with av.open(str(path), "w") as container:
        codec = codec or ("libx264" if "libx264" in av.codecs_available else "mpeg4")
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index, pixels in enumerate(pictures):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return str(path)
