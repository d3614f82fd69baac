"""Decode a PyAV container on a thread of its own, so `Source.read` never blocks past its timeout."""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
from typing import Callable

import numpy as np

from ..frames import Frame
from ..ratelimit import RateLimitedLog
from ..slots import LatestSlot
from .base import SourceEnded, SourceLost

log = logging.getLogger(__name__)

#: undecodable packets in a row before the source counts as lost (a second of video at 30 fps)
MAX_BAD_PACKETS = 30


def upright(pixels: np.ndarray, matrix) -> np.ndarray:
    """`pixels` as a player shows them, by the display matrix a phone or camera writes instead
    of turning its pictures: nine numbers (a, b, u, c, d, v, x, y, w), FFmpeg's and QuickTime's
    layout, which map a stored pixel (p, q) to the shown (a*p + c*q + x, b*p + d*q + y) (scaled,
    and y down). A phone clip shot upright (a turn of 90 degrees clockwise), upside down, turned
    the other way, mirrored (a front camera's), or mirrored and turned: each of the eight comes
    out as ffmpeg's own autorotation shows it. A matrix of any other angle (or none) leaves the
    pixels as they are."""
    if matrix is None or len(matrix) < 5:
        return pixels
    a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
    largest = max(abs(a), abs(b), abs(c), abs(d))
    if not largest or not all(map(math.isfinite, (a, b, c, d))):
        return pixels
    a, b, c, d = (round(value / largest) if abs(value) > largest / 2 else 0 for value in (a, b, c, d))
    if a and d and not (b or c):  # the axes kept: mirrored across either
        shown = pixels[:, ::-1] if a < 0 else pixels
        shown = shown[::-1] if d < 0 else shown
    elif b and c and not (a or d):  # the axes swapped (a quarter turn): a shown row is a stored column
        shown = pixels.transpose(1, 0, *range(2, pixels.ndim))
        shown = shown[:, ::-1] if c < 0 else shown
        shown = shown[::-1] if b < 0 else shown
    else:
        return pixels
    return pixels if shown is pixels else np.ascontiguousarray(shown)


def display_matrix(video_frame) -> tuple[int, ...] | None:
    """The display matrix a decoded PyAV frame carries (its DISPLAYMATRIX side data: nine 32-bit
    numbers, in the machine's byte order), or None."""
    try:
        from av.sidedata.sidedata import Type

        data = video_frame.side_data.get(Type.DISPLAYMATRIX)
        return struct.unpack("=9i", bytes(data)) if data is not None else None
    except (AttributeError, ImportError, TypeError, ValueError, struct.error):  # (a PyAV without side data)
        return None


class AVReader:
    """Runs `open_container()` and decodes its first video stream into a newest-frame-wins slot.

    realtime: pace frames by their timestamps (a file played like a live feed); a live device
    paces itself. loop: start again at the end instead of ending.
    """

    def __init__(self, *, open_container: Callable[[], object], name: str, realtime: bool, loop: bool,
                 stall_seconds: float | None = None, live: bool = False) -> None:
        """`live`: a device whose frames must come out as their packets arrive. FFmpeg's frame
        threads (thread_type AUTO) hold thread_count - 1 frames back inside the decoder: with 8
        threads, 7 frames (233 ms at 30 fps) of an H.264 or MPEG-4 camera. A live device decodes
        with slice threads only; a file keeps frame threads (it is read ahead of its pacing).
        `stall_seconds`: a live device that delivers no frame for this long, without an error (a
        capture card that lost its signal, a webcam's driver hanging: the decoder just waits), is
        lost (SourceLost), so that the runtime says so and tries to reopen it. The decode thread
        itself stays in its blocking read until the device gives bytes or goes away (FFmpeg checks
        its read timeout only between reads), so a reopen may find the device busy until then: the
        runtime retries with backoff."""
        self._open_container = open_container
        self._stall_seconds = stall_seconds
        self._last_frame: float | None = None  # when read() last got a frame (or first ran)
        self._name = name
        self._realtime = realtime
        self._loop = loop
        self._thread_type = "SLICE" if live else "AUTO"
        self._slot: LatestSlot[Frame] = LatestSlot()
        self._stop = threading.Event()
        self._failure: SourceLost | None = None
        self._sequence = 0
        self._warn = RateLimitedLog(log)
        self._container = open_container()  # errors reach the caller at open time
        self._thread = threading.Thread(target=self._run, name=f"av-reader {name}", daemon=True)
        self._started = False  # playback starts at the first read, not at open

    def read(self, timeout: float) -> Frame | None:
        if not self._started:
            self._started = True
            self._thread.start()
            self._last_frame = time.monotonic()
        frame = self._slot.take(timeout)
        if frame is not None:
            self._last_frame = time.monotonic()
            return frame
        if self._failure is not None:
            raise self._failure
        if self._stall_seconds is not None and time.monotonic() - self._last_frame > self._stall_seconds:
            raise SourceLost(f"{self._name}: no frame for {self._stall_seconds:g} s (the device stopped delivering)")
        return None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                decoded = self._sequence
                ends = self._decode_once()
                if not self._loop or self._stop.is_set():
                    break
                if self._sequence == decoded:  # reopening it at once would spin: the runtime retries with backoff
                    self._failure = SourceLost(f"{self._name}: no frame could be decoded")
                    return
                if ends is not None and self._stop.wait(max(0.0, ends - time.monotonic())):
                    break  # (realtime: the last frame is shown for its duration before the next pass)
                self._container.close()
                self._container = self._open_container()
            self._failure = SourceEnded(f"{self._name}: end of stream")
        except Exception as exc:  # a device unplugged, a corrupt file: the runtime reconnects
            self._failure = SourceLost(f"{self._name}: {type(exc).__name__}: {exc}")
        finally:
            self._slot.close()
            try:
                self._container.close()
            except Exception:  # closing a broken container may fail too; nothing left to release
                log.debug("closing %s failed", self._name, exc_info=True)

    def _decode_once(self) -> float | None:
        """Decode the container from the start to its end (or until stopped). In realtime mode,
        returns when (time.monotonic()) the last frame's time is up: its timestamp plus a frame's
        duration, so that a looping clip shows its last frame for as long as the others, and a
        one-frame file (a still) loops at its frame rate instead of as fast as it decodes."""
        stream = self._container.streams.video[0]
        stream.thread_type = self._thread_type
        frame_seconds = 1.0 / float(stream.average_rate or 30)
        start = time.monotonic()
        first_time = last_time = None
        for index, video_frame in enumerate(self._decode(stream)):
            if self._stop.is_set():
                return None
            if self._realtime:
                seconds = video_frame.time if video_frame.time is not None else index * frame_seconds
                first_time = seconds if first_time is None else first_time
                last_time = seconds
                if self._stop.wait(max(0.0, start + (seconds - first_time) - time.monotonic())):
                    return None
            pixels = upright(video_frame.to_ndarray(format="rgb24"), display_matrix(video_frame))  # (H, W, 3)
            self._slot.put(Frame(pixels, "RGB", time.monotonic(), self._sequence))
            self._sequence += 1
        if last_time is None:
            return None
        return start + (last_time - first_time) + frame_seconds

    def _decode(self, stream):
        """The stream's frames, as `container.decode(stream)` gives them, except that a packet the
        decoder refuses (InvalidDataError: a corrupt frame in a file, a garbled MJPEG frame from a
        webcam) is skipped; only more than MAX_BAD_PACKETS of them in a row end the source."""
        import av

        bad = 0
        for packet in self._container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.InvalidDataError as exc:
                bad += 1
                if bad > MAX_BAD_PACKETS:
                    raise
                self._warn.warning(self._name, "%s: skipped a packet the decoder refused: %s", self._name, exc)
                continue
            bad = 0
            yield from frames

    def close(self, timeout: float = 1.0) -> None:
        self._stop.set()
        if not self._started:
            self._container.close()
        elif self._thread is not threading.current_thread():
            self._thread.join(timeout)
