"""Show-safety promise 1: the output never stops. The source goes away (sender stops, sender
destroyed, sender destroyed and recreated) for 0.1 s to 2.5 s, 15 times (bench/source_loss.py
runs the full version: 200 cycles of 0.1 s to 30 s). The sinks get a frame at least every 2 frame
periods, the held frame is the last good one, and the source is picked up within 1 s of its
return with the runtime's default reconnect settings."""

import time

import numpy as np

from bridge.runtime import Runtime, RuntimeConfig
from safety_sources import OutageShow, RecordingSink, StandInEngine, figures, outage_plan

FPS = 30.0


def test_source_loss_cycles_output_never_stops_holds_the_last_frame_and_picks_up_within_1s():
    durations = np.geomspace(0.1, 2.5, 15)
    outages, end = outage_plan(durations)
    t0 = time.monotonic()
    show = OutageShow(t0=t0, outages=outages)
    sink = RecordingSink()
    config = RuntimeConfig(fps=FPS)  # the default reconnect backoff and stall time
    runtime = Runtime(engine=StandInEngine(cost=0.01), open_source=show.open, sinks=[sink], config=config)
    with runtime:
        runtime.wait(timeout=end + 0.3 - (time.monotonic() - t0))
    result = figures(sink.sent, outages, t0, FPS)
    print(f"\n{len(outages)} outages of 0.1..2.5 s: {result}")
    assert result["max_gap_ms"] <= 2 * 1000 / FPS + 20, result  # two periods at most (see OutputLoop), + scheduling
    assert result["held_violations"] == 0, result
    assert result["pickups_missing"] == 0 and result["pickup_ms_max"] < 1000, result
    assert runtime.snapshot()["source_lost"] >= 10


def test_the_default_backoff_retries_often_enough_to_pick_up_within_1s():
    config = RuntimeConfig()
    assert config.reconnect_max_seconds <= 0.5 and config.reconnect_initial_seconds <= config.reconnect_max_seconds


def test_a_looping_file_that_ends_and_restarts_never_stops_the_output(tmp_path):
    from bridge.transports.video import VideoSource
    from test_cli import make_clip

    clip = tmp_path / "clip.mp4"
    make_clip(clip, frames=6, fps=15)  # 0.4 s: ends and restarts 4 times in 1.8 s
    sink = RecordingSink()
    runtime = Runtime(engine=StandInEngine(cost=0.01), open_source=lambda: VideoSource(path=str(clip), loop=True),
                      sinks=[sink], config=RuntimeConfig(fps=FPS))
    with runtime:
        runtime.wait(timeout=1.8)
    gaps = np.diff([record.at for record in sink.sent])
    print(f"\nlooping 0.4 s clip for 1.8 s: {len(sink.sent)} sends, longest gap {gaps.max() * 1000:.0f} ms")
    assert gaps.max() <= 2 / FPS + 0.02  # two periods at most (see OutputLoop), + scheduling
    fresh = {record.identity for record in sink.sent}
    assert len(fresh) >= 15  # new frames kept coming across the restarts
