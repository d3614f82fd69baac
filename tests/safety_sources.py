"""Source-loss shows for the show-safety tests and bench/source_loss.py: a source that goes away
on a schedule in three ways, a sink that records every send, and the figures of a run.

Ways a source goes away (each one a real path through the runtime):
- "stall":  the sender stops sending (read returns None; the source object stays);
- "lost":   the sender is destroyed (read raises SourceLost; reopening fails until it is back);
- "reborn": the sender is destroyed and a receiver reopens at once but sees nothing until the
            sender is recreated (read raises SourceLost once, then the new source reads None).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

from bridge.frames import resize_nearest
from bridge.transports.base import Sink, Source, SourceLost, TransportUnavailable
from bridge.transports.testpattern import TestPatternSource

WAYS = ("stall", "lost", "reborn")


class StandInEngine:
    """The engine API the runtime uses, with a fixed cost per frame (sleeping, like a GPU wait)."""

    def __init__(self, *, size: int = 64, cost: float = 0.01) -> None:
        self.config = SimpleNamespace(width=size, height=size, mode="img2img")
        self.stats = SimpleNamespace(frames_skipped=0, nonfinite_caught=0)
        self.cost = cost

    def __call__(self, pixels):
        time.sleep(self.cost)
        return np.ascontiguousarray(resize_nearest(pixels, self.config.width, self.config.height))

    def update(self, **values):
        pass

    def set_prompt(self, prompt, negative_prompt=None):
        pass


class OutageShow:
    """Opens sources that follow `outages`: (start, end, way) in seconds after `t0`."""

    def __init__(self, *, t0: float, outages: list[tuple[float, float, str]], size=(160, 120), fps: float = 30.0):
        self.t0, self.outages, self.size, self.fps = t0, outages, size, fps
        self.opened = 0
        self._reported_lost: set[int] = set()  # "reborn" outages whose loss was already raised

    def outage(self) -> tuple[int, str] | None:
        now = time.monotonic() - self.t0
        for index, (start, end, way) in enumerate(self.outages):
            if start <= now < end:
                return index, way
        return None

    def open(self) -> Source:
        current = self.outage()
        if current is not None and current[1] == "lost":
            raise TransportUnavailable("sender not found")
        self.opened += 1
        return _ShowSource(self)


class _ShowSource(Source):
    def __init__(self, show: OutageShow) -> None:
        self.show = show
        self.pattern = TestPatternSource(width=show.size[0], height=show.size[1], fps=show.fps)

    def read(self, timeout: float = 0.1):
        current = self.show.outage()
        if current is None:
            return self.pattern.read(timeout)
        index, way = current
        if way == "lost" or (way == "reborn" and index not in self.show._reported_lost):
            self.show._reported_lost.add(index)
            raise SourceLost("sender gone")
        time.sleep(min(timeout, 0.02))
        return None

    def close(self) -> None:
        self.pattern.close()


class RecordingSink(Sink):
    """Records every send as a `Sent` (no pixels kept, so hours of sends fit in memory)."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []

    def send(self, frame) -> None:
        self.sent.append(Sent(time.monotonic(), frame.timestamp, id(frame), bool(frame.pixels.any())))

    def close(self) -> None:
        pass


class Sent(NamedTuple):
    at: float  # when it was sent (monotonic)
    captured: float  # the capture time of the input it shows
    identity: int  # id() of the Frame: a repeat is the same object
    lit: bool  # not all black


def outage_plan(durations, *, start: float = 0.5, up: float = 0.4) -> tuple[list[tuple[float, float, str]], float]:
    """Outages of the given durations, ways in turn, `up` seconds of source between them; the end time."""
    outages = []
    for index, duration in enumerate(durations):
        outages.append((start, start + float(duration), WAYS[index % len(WAYS)]))
        start += float(duration) + up
    return outages, start


def figures(sent, outages, t0: float, fps: float) -> dict:
    """What the sink saw: the longest gap between sends, whether every send during an outage was
    the last frame from before it, and how soon after each return a frame captured after it came out."""
    times = np.array([record.at for record in sent])
    gaps = np.diff(times)
    pickups, held_violations = [], 0
    for start, end, way in outages:
        begin, finish = t0 + start, t0 + end
        during = [record for record in sent if begin + 0.15 < record.at < finish]  # after frames in flight
        if during:  # one frame, the last good one (never the black one)
            held_violations += sum(1 for r in during if r.identity != during[0].identity) + (not during[0].lit)
        back = next((r.at for r in sent if r.at >= finish and r.captured >= finish), None)
        pickups.append(None if back is None else back - finish)
    found = [p for p in pickups if p is not None]
    bar = 2.0 / fps
    late = [(round(float(times[i] - t0), 2), round(float(gaps[i] * 1000), 1)) for i in np.flatnonzero(gaps > bar)]
    return {
        "sends": len(sent),
        "max_gap_ms": float(gaps.max() * 1000) if len(gaps) else None,
        "p99_gap_ms": float(np.percentile(gaps, 99) * 1000) if len(gaps) else None,
        "frame_period_ms": 1000.0 / fps,
        "gaps_over_2_periods": len(late),
        "late_gaps": late[:50],  # (seconds after t0, gap in ms) of the first 50 gaps over 2 frame periods
        "held_violations": held_violations,  # sends during an outage that were not the held frame
        "pickups_missing": len(pickups) - len(found),
        "pickup_ms_median": float(np.median(found) * 1000) if found else None,
        "pickup_ms_max": float(max(found) * 1000) if found else None,
    }
