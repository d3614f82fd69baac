"""`file:PATH`: an mp4 (or other video container) through PyAV, or a PNG sequence when the
path holds a printf pattern such as `frames/%05d.png`.

A recording survives the process: packets reach the operating system as they are written, and
an mp4, m4v or mov is written fragmented (an index every keyframe, a keyframe at least every
`fragment` seconds), so a process that is killed, or a machine that loses power once the
system has written its cache, leaves a file that plays up to its last fragment. A classic mp4
keeps its whole index for the end and is unreadable until then (`fragment=0` writes one, for
the editors that want it). An existing recording is never replaced unless asked: the new one
gets the first free name (show-2.mp4, show-3.mp4, ...), and a PNG sequence whose pictures exist
the first free take (frames/%05d.png, then frames/2-%05d.png; shot_%04d.png, then shot-2_%04d.png).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import shutil
import stat
import threading
import time
from fractions import Fraction
from typing import Callable

from ..frames import Frame, FrameFormat
from .base import Sink, TransportUnavailable, pixels_in

log = logging.getLogger(__name__)

VIDEO_CODECS = ("libx264", "h264", "mpeg4")  # first one this PyAV build has wins
FRAGMENTED = (".mp4", ".m4v", ".mov")  # containers written as fragments while fragment > 0
FRAGMENT_SECONDS = 2.0  # the default: at most this much of a recording is lost with the process
MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"  # a fragment (with its index) per keyframe
MAX_FRAGMENT_SECONDS = 3600.0
LOW_SPACE_BYTES = 2 * 2**30  # less free than this on a recording's disk: a warning (DiskWatch)
SPACE_CHECK_SECONDS = 10.0  # a recording looks at its disk's free space this often
MIN_SPLIT_SECONDS = 1.0  # split=SECONDS: at least this
MAX_NUMBER = 10000  # show-2.mp4 ... show-9999.mp4, then a clear error


#: a picture number in a PNG sequence's name, as FFmpeg's image2 muxer reads it (%d, %05d), or
#: the escaped percent sign %%
_SEQUENCE_FIELD = re.compile(r"%%|%0?\d*d")
FIRST_PICTURE = 1  # the number image2 gives the first picture (its start_number)


def _number_field(name: str) -> re.Match | None:
    return next((m for m in _SEQUENCE_FIELD.finditer(name) if m.group() != "%%"), None)


def is_image_sequence(path: str) -> bool:
    """A PNG sequence: a .png whose name holds a picture number (frames/%05d.png)."""
    return path.lower().endswith(".png") and _number_field(os.path.basename(path)) is not None


FORMAT_HINT = "its extension names no video format; end it in .mp4, .mov or .mkv, or write PNGs as frames/%05d.png"
PICTURE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def path_refusal(path: str) -> str | None:
    """Why `path` cannot be a recording, before anything is created; None when it can."""
    if os.path.isdir(path):
        return "it is a folder; name a file in it, as in file:FOLDER/show.mp4"
    if path.lower().endswith(PICTURE_EXTENSIONS) and not is_image_sequence(path):
        return ("one picture file cannot hold a video; a PNG sequence names its pictures with a number "
                "pattern, as in frames/%05d.png")
    return None


def is_special_file(path: str) -> bool:
    """An existing device or named pipe (/dev/null, a FIFO another program reads): written as
    it is, never numbered beside."""
    return os.path.exists(path) and not os.path.isfile(path)


def is_pipe(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def open_pipe(path: str):
    """A named pipe (FIFO) opened for writing, as an unbuffered file (its `name` is `path`, from
    which PyAV tells the format). Opening one the usual way blocks until a program opens it for
    reading: the show's start, or a lane opening the sink again, would hang there. Refused at
    once instead (OSError), so that a reader that is not there yet is a clear error at start,
    and mid-show one more failed reopen, retried with backoff until the reader is back."""
    def without_waiting(name: str, flags: int) -> int:
        try:
            descriptor = os.open(name, flags | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise OSError("it is a named pipe that no program reads yet; start its reader first") from None
            raise
        os.set_blocking(descriptor, True)  # (writes wait for the reader, as to any file)
        return descriptor

    return open(path, "wb", buffering=0, opener=without_waiting)


def video_codec_for(av, container) -> str:
    """The first of VIDEO_CODECS that this PyAV build has and the container takes, else the
    container's own default (vp9 for webm, gif for gif)."""
    supported = container.supported_codecs
    for name in VIDEO_CODECS:
        if name in av.codecs_available and name in supported:
            return name
    return container.default_video_codec


def pixel_format_for(av, codec: str) -> str:
    """yuv420p (what players expect) when `codec` takes it, else the codec's first format."""
    formats = [f.name for f in (av.Codec(codec, "w").video_formats or ())]
    return "yuv420p" if not formats or "yuv420p" in formats else formats[0]


def free_bytes(path: str) -> int | None:
    """Free bytes on the disk holding `path`, or None where that cannot be told."""
    try:
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:  # (a device or pipe's folder may not say)
        return None


class DiskWatch:
    """Warnings while a recording's disk fills: an hour of 720p pictures that change every frame
    can take several GB, and a disk that fills ends the recording (not the show). `check(now)`
    looks at most every `every` seconds: under LOW_SPACE_BYTES free it says so, then again each
    time the free space has halved, with the minutes left at the rate the disk has been filling
    since the first look. None when there is nothing (new) to say."""

    def __init__(self, path: str, *, free_of: Callable[[str], int | None] = free_bytes,
                 every: float = SPACE_CHECK_SECONDS) -> None:
        self._path, self._free_of, self._every = path, free_of, every
        self._next = -math.inf
        self._below = LOW_SPACE_BYTES  # the next warning comes under this
        self._first: tuple[float, int] | None = None  # (time, free) at the first look

    def check(self, now: float) -> str | None:
        if now < self._next:
            return None
        self._next = now + self._every
        free = self._free_of(self._path)
        if free is None:
            return None
        if self._first is None:
            self._first = (now, free)
        if free >= self._below:
            return None
        while self._below > max(free, 1):
            self._below //= 2
        started, free_then = self._first
        left = ""
        if now > started and free_then > free:
            minutes = free / ((free_then - free) / (now - started)) / 60
            left = (f", about {minutes:.0f} min" if minutes >= 1 else ", under a minute") + " at the rate it has been filling"
        mib = free / 2**20
        return (f"{self._path}: only {mib:.{1 if mib < 10 else 0}f} MiB free on its disk{left}; the recording stops "
                "when it is full (the other sinks go on)")


def numbered(path: str, number: int) -> str:
    """`path` with `-number` before its extension (show.mp4, 2: show-2.mp4); number 1: `path`."""
    if number == 1:
        return path
    stem, extension = os.path.splitext(path)
    return f"{stem}-{number}{extension}"


def sequence_take(pattern: str, number: int) -> str:
    """A PNG sequence's `number`th take: its pictures' names with `-number` at the end of the
    text before the picture number (shot_%04d.png, 2: shot-2_%04d.png; frames/%05d.png, 2:
    frames/2-%05d.png), so that an editor sees each take as a sequence of its own. Take 1:
    `pattern`."""
    folder, name = os.path.split(pattern)
    field = _number_field(name)
    if number == 1 or field is None:
        return pattern
    prefix = name[:field.start()]
    core = prefix.rstrip("-_. ")
    separator = prefix[len(core):] or "-"
    take = f"{core}-{number}{separator}" if core else f"{number}{separator}"
    return os.path.join(folder, take + name[field.start():])


def sequence_pictures(pattern: str, names: list[str] | None = None) -> list[str]:
    """The names of the existing files that `pattern` would write: of `names` (its folder's
    files, listed here when not given), those that match it with any picture number."""
    folder, name = os.path.split(pattern)
    parts, end = [], 0
    for field in _SEQUENCE_FIELD.finditer(name):
        parts.append(re.escape(name[end:field.start()]))
        parts.append("%" if field.group() == "%%" else r"\d+")
        end = field.end()
    parts.append(re.escape(name[end:]))
    matcher = re.compile("".join(parts) + r"\Z")
    if names is None:
        try:
            names = os.listdir(folder or ".")
        except OSError:
            return []
    return sorted(n for n in names if matcher.match(n))


def first_picture(pattern: str) -> str:
    """The file name of a sequence's first picture."""
    folder, name = os.path.split(pattern)
    field = _number_field(name)
    width = int(field.group()[1:-1] or 0)  # (image2 pads with zeros: %5d as %05d)
    text = name[:field.start()] + f"{FIRST_PICTURE:0{width}d}" + name[field.end():]
    return os.path.join(folder, text.replace("%%", "%"))


def claim_free_path(path: str) -> str:
    """The first of path, path-2, path-3, ... that does not exist, created empty (exclusively,
    so two sinks, or two processes, never share one). For a PNG sequence: the first take none of
    whose pictures exist, with its first picture created the same way."""
    sequence = is_image_sequence(path)
    take = sequence_take if sequence else numbered
    existing = None  # a sequence's folder, listed once (it may hold a long show's pictures)
    if sequence:
        try:
            existing = os.listdir(os.path.dirname(path) or ".")
        except OSError:
            existing = []
    for number in range(1, MAX_NUMBER):
        candidate = take(path, number)
        if sequence and sequence_pictures(candidate, existing):
            continue
        try:
            os.close(os.open(first_picture(candidate) if sequence else candidate,
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise OSError(f"{take(path, 2)} to {take(path, MAX_NUMBER - 1)} all exist; "
                  "move the old recordings away or name another file")


class FileSink(Sink):
    """Writes each frame sent, timed by the wall clock (a repeated frame is a repeated picture).

    Frames must be `width` x `height` RGB (the runtime converts). `close` flushes the encoder.
    `fragment`: seconds between keyframes at most, and for an mp4, m4v or mov between the
    fragments it is written in (0: the encoder's own keyframes and a classic file, finished only
    by `close`). `overwrite`: replace an existing file at `path` rather than record beside it.
    `space_check_seconds`: how often it looks at its disk's free space (DiskWatch).
    `path` ends up as the file written (a PNG sequence's: the pattern of its take).
    """

    #: False (the sink option record=0): the runtime stops the recording as it starts, before the
    #: first frame (the file, checked and empty, is removed) until /sd/record/start
    record_at_start = True
    #: seconds after which the runtime goes on in a new file (the sink option split=SECONDS; its
    #: lane finishes this file and opens the next by the same name, numbered: bridge.lanes)
    split_seconds: float | None = None

    def __init__(self, *, path: str, width: int, height: int, fps: float = 30.0, codec: str | None = None,
                 fragment: float = FRAGMENT_SECONDS, overwrite: bool = False,
                 space_check_seconds: float = SPACE_CHECK_SECONDS) -> None:
        if not path:
            raise ValueError("path: an output file is needed, as in file:out.mp4")
        if not isinstance(fps, (int, float)) or not 0 < fps <= 1000:
            raise ValueError(f"fps: {fps!r} must be a number in (0, 1000]")
        if isinstance(fragment, bool) or not isinstance(fragment, (int, float)) or not 0 <= fragment <= MAX_FRAGMENT_SECONDS:
            raise ValueError(f"fragment: {fragment!r} must be seconds from 0 (a classic file) to {MAX_FRAGMENT_SECONDS:g}")
        import av

        self.format = FrameFormat(width, height, "RGB")
        self.path = path
        self.frames_written = 0
        self._fps = fps
        self._fragment = float(fragment)
        self._lock = threading.Lock()
        self._closed = False
        self._start: float | None = None
        self._last_pts = -1
        self._claimed = False  # the file is ours: created by this sink, removed if it records nothing
        self._pipe = None  # a named pipe's file object, when `path` is one (open_pipe)
        # Why the recording stopped, once a write failed: PyAV crashes the process (a segmentation
        # fault) when a container whose header could not be written is written to again, and
        # frames after a lost one would refer to pictures the file does not have.
        self._failure = ""
        refusal = path_refusal(path)
        if refusal:
            raise TransportUnavailable(f"cannot write {path}: {refusal}")
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if not (overwrite or is_special_file(path)):
                self.path = claim_free_path(path)
                self._claimed = True
            self._container, self._stream = self._open(av, self.path, codec)
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            self._remove_claimed()
            reason = FORMAT_HINT if "output format" in str(exc) else str(exc)
            named = f"{path} (as {self.path})" if self.path != path else path
            raise TransportUnavailable(f"cannot write {named}: {reason}") from None
        if self.path != path and is_image_sequence(path):
            log.warning("%s has pictures: recording to %s (the sink option overwrite=1 writes over them instead)",
                        path, self.path)
        elif self.path != path:
            log.warning("%s exists: recording to %s (the sink option overwrite=1 replaces it instead)", path, self.path)
        self._disk = None if is_special_file(self.path) else DiskWatch(self.path, every=space_check_seconds)
        self._say_free_space(time.monotonic())

    def _open(self, av, path: str, codec: str | None):
        """The container and its video stream, with the header written: a codec the container
        cannot hold, or a disk that takes nothing, is an error now, not at the first frame."""
        rate = self._rate = max(1, round(self._fps))
        if is_image_sequence(path):
            container = av.open(path, "w", format="image2")
            stream = container.add_stream("png", rate=rate)
            stream.pix_fmt = "rgb24"
            stream.width, stream.height = self.format.width, self.format.height
            return container, stream
        if codec and codec not in av.codecs_available:
            raise ValueError(f"codec {codec}: this PyAV build has no such encoder (libx264, mpeg4, png, ...)")
        options = {"flush_packets": "1"}  # each packet to the operating system as it is muxed
        if self._fragment and path.lower().endswith(FRAGMENTED):
            options["movflags"] = MOVFLAGS
        if is_pipe(path):
            self._pipe = open_pipe(path)
        try:
            container = av.open(self._pipe or path, "w", container_options=options)
        except BaseException:
            self._close_pipe()
            raise
        try:
            name = codec or video_codec_for(av, container)
            stream = container.add_stream(name, rate=rate)
            stream.pix_fmt = pixel_format_for(av, name)
            if self._fragment:
                stream.gop_size = max(1, round(rate * self._fragment))
            if name == "libx264":
                stream.options = {"preset": "veryfast", "tune": "zerolatency"}
            stream.width, stream.height = self.format.width, self.format.height
            container.start_encoding()
        except BaseException as exc:
            try:
                container.close()  # (never written to again: see _failure)
            except (av.error.FFmpegError, OSError):
                pass
            self._close_pipe()
            if codec and isinstance(exc, (av.error.FFmpegError, ValueError)):
                raise ValueError(f"codec {codec}: {exc}") from None
            raise
        return container, stream

    def _say_free_space(self, now: float) -> None:
        warning = self._disk.check(now) if self._disk is not None else None
        if warning:
            log.warning("%s", warning)

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            try:
                self._pipe.close()
            except OSError:  # (its reader gone: what was unsent is lost either way)
                pass
            self._pipe = None

    def _remove_claimed(self) -> None:
        """Remove the file this sink created, when it holds no frame (a failed start, or a disk
        that refused every frame: a sink reopened again and again leaves no trail of them)."""
        if self._claimed and self.frames_written == 0:
            try:
                os.remove(first_picture(self.path) if is_image_sequence(self.path) else self.path)
            except OSError:
                return
            log.info("%s: no frame was recorded; removed the empty %s", self.path,
                     "first picture" if is_image_sequence(self.path) else "file")

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
            if self._failure:
                raise OSError(self._failure)
            try:
                for packet in self._stream.encode(video_frame):
                    self._container.mux(packet)
            except (av.error.FFmpegError, OSError) as exc:
                if not is_image_sequence(self.path):  # (a picture of a sequence is a file of its own)
                    reason = getattr(exc, "strerror", None) or str(exc)
                    self._failure = (f"{self.path} stopped recording at frame {self.frames_written + 1}: {reason} "
                                     "(it keeps the frames written before; the sink starts a new file when it is opened again)")
                raise
            self._last_pts = video_frame.pts
            self.frames_written += 1
        self._say_free_space(now)

    def close(self) -> None:
        import av

        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if not self._failure:
                    for packet in self._stream.encode(None):
                        self._container.mux(packet)
            finally:
                try:
                    self._container.close()
                except (av.error.FFmpegError, OSError) as exc:
                    if not self._failure:
                        raise
                    log.debug("%s: closing after the failure: %s", self.path, exc)  # already reported
                finally:
                    self._close_pipe()
                    self._remove_claimed()
