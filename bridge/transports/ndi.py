"""`ndi`: receive from and publish to NDI senders through cyndilib (which bundles the NDI runtime).

NDI names a sender "HOST (name)"; a source accepts either that full name or the short name.

cyndilib notes that shape this module:
- a cyndilib Receiver always owns an NDI frame-sync, which takes every video frame, so video is
  read through `FrameSync.capture_video` (non-blocking, returns the newest frame) and a frame is
  new when its NDI timestamp changed;
- cyndilib holds the GIL inside NDI's blocking calls, so nothing here waits inside NDI: `read`
  polls and sleeps in Python, the sender is not clocked (`clock_video=False`);
- NDI refuses a second sender with a name already used on the machine, and cyndilib crashes the
  process on that refusal unless the sender also holds an audio frame; the sink attaches an
  unused one so the refusal arrives as an exception;
- a cyndilib Finder (with its Source objects) and a Receiver (with its frame-sync and PTZ) are
  reference cycles, and cyndilib has no call that destroys them: dropping one frees its NDI
  threads and sockets only at a full garbage collection, which a show process seldom runs (and
  never for objects frozen by `sdbridge run`'s gc.freeze()). So sources share one finder for the
  process, and a closed source's receiver, disconnected, waits for the next source opened with
  the same settings: a reconnect reuses it instead of leaving one more behind.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from fractions import Fraction

import numpy as np

from ..frames import Frame, FrameFormat, swizzle
from .base import Sink, Source, SourceLost, TransportUnavailable

logger = logging.getLogger(__name__)

#: the pixel formats NDI carries without conversion (one byte per channel, four channels)
NDI_PIXEL_FORMATS = ("RGBA", "BGRA")

_FULL_NAME = re.compile(r"^(?P<host>.*?) \((?P<stream>.*)\)$")
_POLL_INTERVAL = 0.002  # seconds between frame-sync polls inside read()
_FIND_INTERVAL = 0.05  # seconds between source-list refreshes while not connected

# sender names open in this process: NDI refuses duplicates, so say so before asking it
_open_sender_names: set[str] = set()
_open_sender_names_lock = threading.Lock()

# what sources reuse (see the module docstring); the lock also covers the finder's Source objects,
# whose NDI pointers the next update_sources() replaces, from the update until connect_to copies one
_ndi_lock = threading.Lock()
_finder = None  # the process's one cyndilib.Finder, made by the first source
_idle_receivers: dict[tuple, list] = {}  # (color format, bandwidth, name) -> [(Receiver, VideoFrameSync)]


def import_cyndilib():
    """cyndilib, or TransportUnavailable with the command that installs it."""
    try:
        import cyndilib
    except ImportError:
        raise TransportUnavailable("NDI needs cyndilib: pip install 'sdbridge[ndi]'") from None
    except OSError as exc:  # the bundled NDI runtime failed to load
        raise TransportUnavailable(f"the NDI runtime failed to load: {exc}") from None
    return cyndilib


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name: {name!r} must be a non-empty NDI name")
    return name


def _positive(field: str, value: object, kind: type = float):
    """`value` as a positive `kind`; strings (from "ndi:NAME?timeout=2") are parsed."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        number = kind(value)
        if kind is int and isinstance(value, float) and value != number:
            raise ValueError
    except ValueError:
        number = None
    if number is None or not number > 0:
        raise ValueError(f"{field}: {value!r} must be a positive {'integer' if kind is int else 'number'}")
    return number


def _flag(field: str, value: object) -> bool:
    """`value` as a bool; "1"/"0", "true"/"false", "yes"/"no" accepted for URI options."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{field}: {value!r} must be true or false")


def _shared_finder(cyndilib):
    global _finder
    with _ndi_lock:
        if _finder is None:
            _finder = cyndilib.Finder()
        return _finder


def _take_receiver(cyndilib, key: tuple) -> tuple:
    """(Receiver, VideoFrameSync) for `key`: an idle one a closed source left, or a new one."""
    with _ndi_lock:
        idle = _idle_receivers.get(key)
        if idle:
            return idle.pop()
    color_format, bandwidth, receiver_name = key
    receiver = cyndilib.Receiver(
        color_format=getattr(cyndilib.RecvColorFormat, color_format),
        bandwidth=getattr(cyndilib.RecvBandwidth, bandwidth),
        recv_name=receiver_name,
    )
    video = cyndilib.VideoFrameSync()
    receiver.frame_sync.set_video_frame(video)
    return receiver, video


def matches_ndi_name(full_name: str, name: str) -> bool:
    """True when `name` is NDI's full name "HOST (stream)" or its stream part."""
    if full_name == name:
        return True
    match = _FULL_NAME.match(full_name)
    return match is not None and match.group("stream") == name


class NDISource(Source):
    """Video from the NDI sender called `name` ("HOST (name)" or just "name").

    Frames come out RGBA or BGRA (`pixel_format`), in the sender's size (`format` is None);
    a sender without alpha gives alpha 255. `read` returns the newest frame, each frame at most
    once (frames the caller was too slow for are skipped), and None when none came in time; a
    sender that is connected but idle gives None. It raises SourceLost once the sender has been
    unreachable (not found, closed, network gone) for `timeout` seconds, counted from the first
    read or the last moment it was connected; until then NDI reconnects by itself when the
    sender comes back.
    """

    def __init__(
        self,
        *,
        name: str,
        timeout: float = 5.0,
        pixel_format: str = "RGBA",
        bandwidth: str = "highest",
        receiver_name: str = "sdbridge",
    ) -> None:
        self.name = _check_name(name)
        timeout = _positive("timeout", timeout)
        if pixel_format not in NDI_PIXEL_FORMATS:
            raise ValueError(f"pixel_format: {pixel_format!r} must be one of {', '.join(NDI_PIXEL_FORMATS)}")
        if bandwidth not in ("highest", "lowest"):
            raise ValueError(f"bandwidth: {bandwidth!r} must be 'highest' or 'lowest'")
        cyndilib = import_cyndilib()
        self.timeout = timeout
        self.full_name: str | None = None  # "HOST (name)" once found
        self._fourcc = cyndilib.FourCC
        self._lock = threading.Lock()
        self._closed = False
        self._sequence = 0
        self._last_timestamp: float | None = None
        self._next_find = 0.0
        self._last_connected: float | None = None  # the lost-clock starts at the first read
        color_format = {"RGBA": "RGBX_RGBA", "BGRA": "BGRX_BGRA"}[pixel_format]
        self._finder = _shared_finder(cyndilib)
        self._receiver_key = (color_format, bandwidth, receiver_name)
        self._receiver, self._video = _take_receiver(cyndilib, self._receiver_key)
        # a reused receiver's frame-sync still holds the last frame it received: not a new one
        self._receiver.frame_sync.capture_video()
        if self._video.xres > 0:
            self._last_timestamp = self._video.get_timestamp_posix()

    def read(self, timeout: float = 0.1) -> Frame | None:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            with self._lock:
                if self._closed:
                    raise SourceLost(f"NDI source {self.name!r} is closed")
                now = time.monotonic()
                if self._last_connected is None:
                    self._last_connected = now
                if self.full_name is None and now >= self._next_find:
                    self._next_find = now + _FIND_INTERVAL
                    self._connect_if_found()
                frame = self._capture_new_frame()
                if frame is not None:
                    self._last_connected = now
                    return frame
                self._check_lost(now)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(_POLL_INTERVAL, remaining))

    def _connect_if_found(self) -> None:
        """Connect the receiver to the first sender whose name matches, if one is visible."""
        with _ndi_lock:  # another source's update would replace the pointer connect_to copies
            self._finder.update_sources()
            found = sorted(n for n in self._finder.get_source_names() if matches_ndi_name(n, self.name))
            if not found:
                return
            source = self._finder.get_source(found[0])
            if source is None:
                return
            self._receiver.connect_to(source)
        if len(found) > 1:
            logger.warning("NDI: %d senders match %r (%s); using %r", len(found), self.name, ", ".join(found), found[0])
        self.full_name = found[0]
        self._last_connected = time.monotonic()  # give the connection `timeout` to come up
        logger.info("NDI source %r: connecting to %r", self.name, self.full_name)

    def _capture_new_frame(self) -> Frame | None:
        # 1. ask the frame-sync for its newest frame (returns at once; repeats the last one)
        video = self._video
        self._receiver.frame_sync.capture_video()
        width, height = video.xres, video.yres
        if width <= 0 or height <= 0:
            return None  # nothing received yet
        # 2. a frame is new when its NDI timestamp changed
        timestamp = video.get_timestamp_posix()
        if timestamp == self._last_timestamp:
            return None
        self._last_timestamp = timestamp
        # 3. copy it out of NDI's buffer (the copy releases NDI's frame)
        fourcc = video.fourcc
        data = video.get_array()  # (stride * height,) uint8
        if fourcc in (self._fourcc.RGBA, self._fourcc.RGBX):
            pixel_format = "RGBA"
        elif fourcc in (self._fourcc.BGRA, self._fourcc.BGRX):
            pixel_format = "BGRA"
        else:
            raise SourceLost(f"NDI source {self.name!r} delivered {fourcc.name}, expected RGBA/BGRA")
        stride = video.get_line_stride()
        pixels = data.reshape(height, stride)[:, : width * 4].reshape(height, width, 4)  # (H, W, 4)
        if stride != width * 4:
            pixels = np.ascontiguousarray(pixels)
        # 4. number it
        frame = Frame(pixels, pixel_format, time.monotonic(), self._sequence)
        self._sequence += 1
        return frame

    def _check_lost(self, now: float) -> None:
        """SourceLost once the receiver has had no connection for `timeout` seconds."""
        if self.full_name is not None and self._receiver.get_num_connections() > 0:
            self._last_connected = now
            return
        silent_for = now - self._last_connected
        if silent_for < self.timeout:
            return
        if self.full_name is None:
            visible = ", ".join(sorted(self._finder.get_source_names())) or "none"
            raise SourceLost(f"NDI source {self.name!r} not found within {self.timeout:g} s (visible: {visible})")
        raise SourceLost(f"NDI source {self.full_name!r} lost: no connection for {silent_for:.1f} s")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            receiver, self._receiver = self._receiver, None
            video, self._video = self._video, None
            # NDI keeps a receiver pointed at its sender and reconnects it when the sender comes
            # back; cyndilib's disconnect() only tells NDI to let go while a connection is up.
            # It does clear the receiver's source, so reconnect() then connects it to nothing.
            receiver.disconnect()
            receiver.reconnect()
            with _ndi_lock:  # kept for the next source (see the module docstring)
                _idle_receivers.setdefault(self._receiver_key, []).append((receiver, video))


class NDISink(Sink):
    """Publishes frames as the NDI sender `name` (other machines see "HOST (name)").

    With `width` and `height` the sender opens now and `format` is fixed (the runtime converts
    to it), unless `follow_size`; without them it opens on the first frame. Without a fixed
    format it takes each frame's size and reopens when the size changes (what `open_sink` makes:
    opened at the engine's size, following `/sd/resolution`). `pixel_format` is what goes on the wire, RGBA or BGRA (RGB/BGR frames are
    swizzled); `alpha=False` marks the fourth channel as unused (RGBX/BGRX), which NDI encodes
    cheaper. `send` does not wait for NDI's clock or for receivers. `close` frees the name at once.
    """

    def __init__(
        self,
        *,
        name: str,
        width: int | None = None,
        height: int | None = None,
        pixel_format: str = "RGBA",
        alpha: bool = False,
        frame_rate: float = 30.0,
        follow_size: bool = False,
    ) -> None:
        self.name = _check_name(name)
        if pixel_format not in NDI_PIXEL_FORMATS:
            raise ValueError(f"pixel_format: {pixel_format!r} must be one of {', '.join(NDI_PIXEL_FORMATS)}")
        if (width is None) != (height is None):
            raise ValueError(f"width, height: give both or neither, got width={width!r} height={height!r}")
        frame_rate = _positive("frame_rate", frame_rate)
        alpha = _flag("alpha", alpha)
        opened_at = None if width is None else FrameFormat(_positive("width", width, int),
                                                           _positive("height", height, int), pixel_format)
        self.format = None if _flag("follow_size", follow_size) else opened_at
        self._cyndilib = import_cyndilib()
        self._pixel_format = pixel_format
        self._fourcc = getattr(self._cyndilib.FourCC, pixel_format if alpha else pixel_format[:3] + "X")
        self._frame_rate = Fraction(frame_rate).limit_denominator(1001)
        self._lock = threading.Lock()
        self._closed = False
        self._sender = None
        self._size: tuple[int, int] | None = None  # (width, height) of the open sender
        self._converted: tuple = (None, None)  # (the last frame sent, its pixels in wire order)
        if opened_at is not None:
            self._open(opened_at.width, opened_at.height)

    @property
    def full_name(self) -> str | None:
        """NDI's name for this sender, "HOST (name)"; None until it opens."""
        return None if self._sender is None else self._sender.name

    def send(self, frame: Frame) -> None:
        with self._lock:
            if self._closed:
                return
            # 1. check the size, or follow it
            if self.format is not None and frame.format != self.format:
                raise ValueError(f"frame: expected {self.format}, got {frame.format}")
            if self._size != (frame.width, frame.height):
                if self._sender is not None:
                    logger.info("NDI sink %r: size %dx%d -> %dx%d, reopening", self.name, *self._size,
                                frame.width, frame.height)
                    self._release()
                self._open(frame.width, frame.height)
            # 2. put the channels in wire order (a no-op when they already are; a repeat of the last
            # frame, the output's fill-in, is converted once)
            if self._converted[0] is not frame:
                self._converted = (frame, np.ascontiguousarray(swizzle(frame.pixels, frame.pixel_format,
                                                                       self._pixel_format)))
            pixels = self._converted[1]
            # 3. hand it to NDI, which encodes and sends on its own threads
            self._sender.write_video_async(pixels.reshape(-1))

    def _open(self, width: int, height: int) -> None:
        cyndilib = self._cyndilib
        with _open_sender_names_lock:
            if self.name in _open_sender_names:
                raise TransportUnavailable(f"NDI sender name {self.name!r} is already open in this process")
            _open_sender_names.add(self.name)
        try:
            video = cyndilib.VideoSendFrame()
            video.set_resolution(width, height)
            video.set_fourcc(self._fourcc)
            video.set_frame_rate(self._frame_rate)
            sender = cyndilib.Sender(self.name, clock_video=False, clock_audio=False)
            sender.set_video_frame(video)
            sender.set_audio_frame(cyndilib.AudioSendFrame())  # never sent; see the module docstring
            try:
                sender.open()
            except MemoryError:
                raise TransportUnavailable(
                    f"NDI refused to create sender {self.name!r}: another NDI sender on this machine has that name"
                ) from None
        except BaseException:
            with _open_sender_names_lock:
                _open_sender_names.discard(self.name)
            raise
        self._sender = sender
        self._size = (width, height)
        logger.info("NDI sink: sending as %r, %dx%d %s", sender.name, width, height, self._fourcc.name)

    def _release(self) -> None:
        sender, self._sender, self._size = self._sender, None, None
        if sender is None:
            return
        try:
            sender.close()  # NDI destroys the sender here: the name is free on return
        finally:
            with _open_sender_names_lock:
                _open_sender_names.discard(self.name)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._release()
