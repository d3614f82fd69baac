"""A thread per sink, so that a sink slow or stuck in `send` holds back only itself.

Before, the output thread sent to every sink in turn: an encoder falling behind (a 1080p
recording on a busy CPU: 45 ms a frame on this project's 2-core test machine), a file on a
drive that stopped answering, or a virtual camera's driver in a long call slowed or froze the
picture on every other sink too, the projector's included. Now the output thread hands each
frame to each sink's lane and goes on; the lane fits it to its sink (`bridge.frames.convert`,
the bilinear scaling of a sink of another size included) and sends it on its own thread.

A lane also mends its sink: one whose every send has failed for a while (`reopen_after`: a Spout
sender after a GPU driver reset, a virtual camera whose driver restarted) is closed and opened
again by its name, as a lost source is. And a lane whose sink writes a file stops and starts
recording on request (`record`, OSC /sd/record/stop and /sd/record/start): stopping finishes
the file; starting opens a new one by the sink's name (numbered beside the others).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

from .frames import Frame, FrameFormat, convert
from .ratelimit import RateLimitedLog
from .recovery import describe
from .transports.base import Sink, close_quietly

log = logging.getLogger(__name__)

#: frames a lane holds for a sink still sending: scheduling jitter loses none; a sink further
#: behind loses the oldest, counted as "sink_missed"
QUEUE = 3
#: a send running this long is reported (once per stuck send; the other sinks go on)
STUCK_SECONDS = 2.0
#: at closing, how long a sink still in a send is given to close at least (its lane's wait spent)
CLOSE_GRACE = 0.1
#: a sink whose sends have all failed for this long is closed and opened again by its name (a
#: Spout sender whose GL context a GPU driver reset took, a virtual camera's driver restarted)
REOPEN_AFTER = 2.0
#: seconds between tries to open it again while that fails (doubling up to the second value)
REOPEN_BACKOFF = (1.0, 10.0)  # (defaults of SinkLane's reopen_after and backoff)


class SinkLane:
    """Sends the frames `offer`ed to one sink on a thread of its own, in order, each converted
    to `target`, the sink's format (None: it takes anything), fitted as the sink's `fit` and
    `filter` say (a repeat of the last frame is converted once). A send that raises is counted
    ("sink_errors") and logged, rate-limited; the lane goes on. With `reopen` (a new sink of the
    same name, as `open_sink` makes it), a sink whose sends have all failed for `reopen_after`
    seconds is closed and replaced, tried again after `backoff[0]` seconds, doubling up to
    `backoff[1]`, while that fails; frames meanwhile count as failed sends."""

    def __init__(self, sink: Sink, target: FrameFormat | None, telemetry, *, name: str = "",
                 reopen: Callable[[], Sink] | None = None, reopen_after: float = REOPEN_AFTER,
                 backoff: tuple[float, float] = REOPEN_BACKOFF) -> None:
        self.sink: Sink | None = sink  # None while a reopen has failed
        self._reopen = reopen
        self._reopen_after, self._backoff_range = reopen_after, backoff
        self._failing_since: float | None = None  # when the current run of failed sends began
        self._next_reopen = 0.0
        self._backoff = self._backoff_range[0]
        self.reopened = 0  # times the sink was replaced
        self._recorded: list[tuple[str, int]] = []  # (path, frames) of each replaced sink that wrote a file
        self.records = writes_files(sink)  # a recording: /sd/record/stop and /start apply to it
        # the latest record(on) not yet carried out (lane thread); record=0: stopped before the first frame
        self._record_request: bool | None = False if self.records and not getattr(sink, "record_at_start", True) else None
        self._record_stopped = False  # the recording was stopped on request: frames are let go
        self._opened_at = time.monotonic()  # when the sink began: a file with split_seconds goes on in a new one
        self.name = name or type(sink).__name__
        self._target = target
        self._telemetry = telemetry
        self._warn = RateLimitedLog(log)
        self._queue: deque[Frame] = deque()
        self._condition = threading.Condition()
        self._closing = False
        self._sending_since: float | None = None  # when the send under way began
        self._reported_stuck = False
        self._converted: tuple[Frame | None, Frame | None] = (None, None)  # (the last frame, it converted)
        self.sent = 0  # sends that returned
        self._thread = threading.Thread(target=self._run, name=f"sdbridge sink {self.name}", daemon=True)
        self._thread.start()

    def offer(self, frame: Frame) -> None:
        """Queue `frame` for the sink; never waits for it. The oldest waiting frame makes room."""
        with self._condition:
            if self._closing:
                return
            if len(self._queue) >= QUEUE:
                self._queue.popleft()
                self._telemetry.count("sink_missed")
            self._queue.append(frame)
            self._condition.notify()

    def record(self, on: bool) -> None:
        """Stop (False) or start (True) this lane's recording, on its own thread before its next
        send; the latest request wins. Nothing for a lane whose sink writes no file."""
        if not self.records:
            return
        with self._condition:
            self._record_request = bool(on)
            self._condition.notify()

    @property
    def recording(self) -> bool:
        """Whether this lane writes a file now (not stopped, not failed to open again)."""
        return self.records and not self._record_stopped and self.sink is not None

    def stuck_for(self, now: float) -> float:
        """Seconds the send under way has taken so far (0 when the lane is idle)."""
        since = self._sending_since
        return 0.0 if since is None else max(0.0, now - since)

    def check(self, now: float) -> None:
        """Report a send that has taken STUCK_SECONDS or more, once per send (output thread)."""
        stuck = self.stuck_for(now)
        if stuck < STUCK_SECONDS or self._reported_stuck:
            return
        self._reported_stuck = True
        text = f"sink {self.name} has been in one send for {stuck:.1f} s; the other sinks go on"
        self._telemetry.error(text)
        log.warning("%s", text)

    def finish(self) -> None:
        """Take no more frames: the thread sends what is queued, then ends."""
        with self._condition:
            self._closing = True
            self._condition.notify()

    def close(self, timeout: float) -> bool:
        """Send what is queued (for up to `timeout` seconds), then stop the thread. True when it
        ended; False when a send is still stuck (the thread is left behind, a daemon)."""
        self.finish()
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            with self._condition:
                self._queue.clear()  # what the stuck send would still have sent
            return False
        return True

    def _next(self) -> Frame | None:
        while True:
            with self._condition:
                while not self._queue and not self._closing and self._record_request is None:
                    self._condition.wait()
                request, self._record_request = self._record_request, None
                if request is None:
                    return self._queue.popleft() if self._queue else None
            self._carry_out_record(request)  # (outside the lock: opening or finishing a file takes time)

    def _carry_out_record(self, on: bool) -> None:
        """Stop: finish the file (its recording is listed, the frames meanwhile are let go).
        Start: open a new file by the sink's name, when stopped."""
        if not on:
            if self._record_stopped:
                return
            old, self.sink = self.sink, None
            self._record_stopped, self._failing_since = True, None
            self._recorded.extend(recording_of(old))
            if old is not None:
                close_quietly(old)
                if old.frames_written or getattr(old, "record_at_start", True):
                    log.info("sink %s: recording stopped: %s", self.name,
                             ", ".join(f"{path} ({frames} frames)" for path, frames in recording_of(old)) or "nothing written")
                else:
                    log.info("sink %s: not recording until /sd/record/start (record=0)", self.name)
            return
        if not self._record_stopped:
            log.info("sink %s: already recording", self.name)
            return
        with self._condition:
            if self._closing:  # (the run is ending: no new file)
                return
        if self._reopen is None:
            text = f"sink {self.name}: cannot start recording again (it cannot be opened again by its name)"
            self._telemetry.error(text)
            log.warning("%s", text)
            return
        try:
            sink = self._reopen()
        except Exception as exc:
            text = f"sink {self.name}: could not start recording: {describe(exc)}"
            self._telemetry.error(text)
            log.warning("%s", text)
            return
        self.sink, self._target, self._converted = sink, getattr(sink, "format", None), (None, None)
        self._record_stopped, self._opened_at = False, time.monotonic()
        log.info("sink %s: recording to %s", self.name, getattr(sink, "path", "?"))

    def _split_when_due(self) -> None:
        """A file sink with `split_seconds` that has recorded that long: finish it and go on in
        the next file (between two frames: none is lost)."""
        split = getattr(self.sink, "split_seconds", None)
        if split and self.records and time.monotonic() - self._opened_at >= split:
            self._carry_out_record(False)
            self._carry_out_record(True)
            if self._record_stopped:  # the next file could not be opened: a failure, retried as any other
                self._record_stopped = False

    def _run(self) -> None:
        while (frame := self._next()) is not None:
            if self._record_stopped:
                continue  # (stopped on request: not a failure, not a missed frame)
            self._split_when_due()
            self._sending_since, self._reported_stuck = time.monotonic(), False
            try:
                if self.sink is None:
                    raise RuntimeError("not open (opening it again failed)")
                self.sink.send(self._for_sink(frame))
                self.sent += 1
                self._failing_since, self._backoff = None, self._backoff_range[0]
            except Exception as exc:  # a sink's fault never ends its lane or the others
                self._telemetry.count("sink_errors")
                self._warn.warning("send", "sink %s failed: %s", self.name, describe(exc))
                self._after_failure(time.monotonic())
            finally:
                self._sending_since = None

    def _after_failure(self, now: float) -> None:
        """Open the sink again once its sends have all failed for `reopen_after` seconds, and
        again after each backoff while that fails."""
        if self._failing_since is None:
            self._failing_since = now
        failing = now - self._failing_since
        if self._reopen is None or failing < self._reopen_after or now < self._next_reopen:
            return
        old, self.sink = self.sink, None
        self._recorded.extend(recording_of(old))
        if old is not None:  # on a helper thread: a close that hangs must not hold this lane
            closer = threading.Thread(target=close_quietly, args=(old,), name=f"sdbridge close {self.name}", daemon=True)
            closer.start()
            closer.join(self._backoff_range[0])
        try:
            sink = self._reopen()
        except Exception as exc:
            self._next_reopen = now + self._backoff
            text = (f"sink {self.name} failed for {failing:.1f} s and could not be opened again "
                    f"({describe(exc)}); next try in {self._backoff:g} s")
            self._backoff = min(self._backoff * 2, self._backoff_range[1])
            self._telemetry.error(text)
            log.warning("%s", text)
            return
        with self._condition:
            closing = self._closing
        if closing:  # the run stopped meanwhile (close_lanes has let this lane go): not left open
            close_quietly(sink)
            return
        self.sink, self._target, self._converted = sink, getattr(sink, "format", None), (None, None)
        self._failing_since, self._backoff, self._opened_at = None, self._backoff_range[0], time.monotonic()
        self.reopened += 1
        text = f"sink {self.name} failed for {failing:.1f} s: opened it again"
        self._telemetry.error(text)
        log.warning("%s", text)

    def recordings(self) -> list[tuple[str, int]]:
        """(path, frames written) of each file this lane's sinks wrote frames to, in order: a
        file sink opened again after failures records into a new file (bridge.transports.file)."""
        return self._recorded + recording_of(self.sink)

    def _for_sink(self, frame: Frame) -> Frame:
        """`frame` in the sink's format, converted once however often it is repeated."""
        target = self._target
        if target is None or frame.format == target:
            return frame
        if self._converted[0] is not frame:
            sink = self.sink
            self._converted = (frame, convert(frame, target, fit=getattr(sink, "fit", "letterbox"),
                                              filter=getattr(sink, "filter", "bilinear")))
        return self._converted[1]


def writes_files(sink: Sink | None) -> bool:
    """Whether `sink` records into a file (a file sink: it has `path` and `frames_written`)."""
    return isinstance(getattr(sink, "path", None), str) and isinstance(getattr(sink, "frames_written", None), int)


def recording_of(sink: Sink | None) -> list[tuple[str, int]]:
    """[(path, frames written)] for a sink that writes a file and wrote to it, else []. (Only
    its lane's thread sends to it, so the count is final once that thread has moved on.)"""
    return [(sink.path, sink.frames_written)] if writes_files(sink) and sink.frames_written > 0 else []


def close_lanes(lanes: list[SinkLane], timeout: float, close_sink: Callable[[Sink], None]) -> list[str]:
    """Drain and stop every lane within `timeout` seconds in all (side by side), then close each
    sink whose lane ended (`close_sink`); a sink still in a send is closed on a helper thread,
    given what is left of the time (CLOSE_GRACE at least), and named in the result if that did
    not return: it is then left as it is, as closing it would wait for the stuck send (the helper
    closes it if the send ever returns)."""
    deadline = time.monotonic() + timeout
    for lane in lanes:
        lane.finish()
    ended = [lane.close(deadline - time.monotonic()) for lane in lanes]
    stuck = []
    for lane, done in zip(lanes, ended):
        if lane.sink is None:  # (its reopening failed: nothing open)
            continue
        if done:
            close_sink(lane.sink)
            continue
        closer = threading.Thread(target=close_sink, args=(lane.sink,), name=f"sdbridge close {lane.name}", daemon=True)
        closer.start()
        closer.join(max(CLOSE_GRACE, deadline - time.monotonic()))
        if closer.is_alive():
            log.warning("sink %s is stuck in a send and could not be closed; left as it is", lane.name)
            stuck.append(lane.name)
    return stuck
