"""A frame number and a capture time written into the pixels, readable after resizing.

Two bands across the top of the picture, each `BITS` cells wide: the first holds the frame's
sequence number, the second its capture time in milliseconds (both modulo 2**BITS). A cell
is white for 1 and black for 0, so nearest or bilinear resizing and video compression keep
it readable as long as a cell stays a few pixels wide (the bands fit 256x256 comfortably).
Used by the test-pattern source and by the latency test at the sink.
"""

from __future__ import annotations

import functools

import numpy as np

BITS = 24  # cells per band
MODULUS = 2**BITS
BANDS = 2  # sequence, milliseconds


def band_height(height: int) -> int:
    """Rows of one band for a picture `height` pixels tall."""
    return max(2, height // 10)


def milliseconds(seconds: float) -> int:
    """A clock reading in seconds as the millisecond value the pattern stores."""
    return int(round(seconds * 1000.0)) % MODULUS


def elapsed_ms(encoded_ms: int, now_seconds: float) -> int:
    """Milliseconds from an encoded time to `now_seconds`, correct across the wrap-around."""
    return (milliseconds(now_seconds) - encoded_ms) % MODULUS


_SHIFTS = np.arange(BITS - 1, -1, -1, dtype=np.int64)  # MSB first


@functools.lru_cache(maxsize=8)
def _column_shifts(width: int) -> np.ndarray:
    """(W,) the bit shift of the cell each column belongs to."""
    return _SHIFTS[(np.arange(width) * BITS) // width]


def encode(pixels: np.ndarray, sequence: int, time_ms: int) -> None:
    """Write `sequence` and `time_ms` into the top bands of (H, W, C) uint8 `pixels` in place."""
    height, width = pixels.shape[:2]
    rows = band_height(height)
    shifts = _column_shifts(width)
    values = np.array([[sequence % MODULUS], [time_ms % MODULUS]], dtype=np.int64)  # (BANDS, 1)
    cells = ((values >> shifts) & 1).astype(np.uint8) * 255  # (BANDS, W): white for 1
    lines = np.repeat(cells[:, :, None], pixels.shape[2], axis=2)  # (BANDS, W, C): one row of each band
    for band in range(BANDS):  # whole rows at a time (a broadcast over C alone is ~50x slower)
        pixels[band * rows : (band + 1) * rows] = lines[band][None]


def decode(pixels: np.ndarray) -> tuple[int, int]:
    """(sequence, time_ms) read back from (H, W, C) uint8 pixels written by `encode` (any size)."""
    height, width = pixels.shape[:2]
    rows = band_height(height)
    centres = ((np.arange(BITS) + 0.5) * width / BITS).astype(np.intp)  # (BITS,)
    values = []
    for band in range(BANDS):
        top = band * rows + rows // 4
        bottom = max(top + 1, (band + 1) * rows - rows // 4)
        patch = pixels[top:bottom, :, :3].astype(np.float32).mean(axis=(0, 2))  # (W,)
        bits = patch[centres] > 127.5
        values.append(int(sum(int(bit) << (BITS - 1 - i) for i, bit in enumerate(bits))))
    return values[0], values[1]
