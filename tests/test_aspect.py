"""--aspect source: the processing size takes the shape of the source's first frame, with about
as many pixels as --width x --height, in sizes every backend and SD model takes, and follows the
source when its shape changes during the show (bridge.aspect)."""

import logging
import math
import time

import av
import numpy as np
import pytest

from bridge.aspect import ShapeFollower
from bridge.frames import Frame, FrameFormat
from bridge.runtime import Runtime, RuntimeConfig
from bridge.session import FirstFrameAgain, sized_by_source
from bridge.settings import RunSettings
from bridge.telemetry import status_line
from bridge.transports.base import Source, SourceEnded
from bridge.transports.testpattern import TestPatternSource
from pipeline import StreamConfig, StreamDiffusion
from pipeline.config import aspect_size
from test_cli import TINY, sdbridge
from test_runtime import RecordingSink


@pytest.mark.parametrize("source, area, expected", [
    ((1280, 720), (512, 512), (704, 384)),
    ((1920, 1080), (512, 512), (704, 384)),
    ((1280, 720), (768, 448), (768, 448)),
    ((640, 480), (512, 512), (576, 448)),
    ((1080, 1920), (512, 512), (384, 704)),
    ((512, 512), (512, 512), (512, 512)),
    ((3840, 2160), (1024, 576), (1024, 576)),
])
def test_common_sources_get_the_sizes_a_user_would_pick(source, area, expected):
    assert aspect_size(*source, area[0] * area[1]) == expected


def test_every_size_is_whole_multiples_near_the_shape_and_the_area():
    """Sources from 1:3 to 3:1, areas from 256x256 to 1024x1024: a multiple of 64 each side,
    the shape within one step of 64 on the shorter side, the area within a factor 1.6 (the steps
    are coarse at 256x256: 1920x720 gets 512x192, its exact shape, with 1.5 times the pixels)."""
    for source_width in range(240, 3841, 120):
        for source_height in (480, 720, 1080):
            if not 1 / 3 <= source_width / source_height <= 3:
                continue
            for side in (256, 512, 768, 1024):
                width, height = aspect_size(source_width, source_height, side * side)
                assert width % 64 == 0 and height % 64 == 0 and 64 <= min(width, height) and max(width, height) <= 2048
                shape_error = abs(math.log(width / height / (source_width / source_height)))
                area_error = abs(math.log(width * height / side ** 2))
                one_step = math.log(1 + 64 / min(width, height))
                assert shape_error < one_step and area_error < math.log(1.6), (source_width, source_height, side, width, height)


def test_other_multiples_and_limits_are_kept():
    assert aspect_size(1280, 720, 256 * 256, multiple=8) == (344, 192)
    assert aspect_size(100, 1, 512 * 512, limit=1024) == (1024, 64)  # as wide as the limit lets it
    with pytest.raises(ValueError, match="all must be positive"):
        aspect_size(0, 720, 512 * 512)


class Silent(Source):
    """A sender that is not there yet: no frame, ever."""

    format = None

    def __init__(self, ends=False):
        self.ends, self.closed = ends, 0

    def read(self, timeout=0.1):
        if self.ends:
            raise SourceEnded("video clip.mp4: end of stream")
        time.sleep(timeout)
        return None

    def close(self):
        self.closed += 1


def test_the_first_frame_sets_the_size_and_is_read_again():
    source = TestPatternSource(width=1280, height=720, fps=30)
    sized, config = sized_by_source(source, StreamConfig(width=512, height=512, device="cpu"), "testpattern")
    assert (config.width, config.height) == (704, 384) and isinstance(sized, FirstFrameAgain)
    first, second = sized.read(), sized.read(timeout=1.0)
    assert first.sequence < second.sequence and first.pixels.shape == (720, 1280, 3)
    assert sized.format == source.format
    sized.close()


@pytest.mark.parametrize("ends", [False, True])
def test_a_source_without_a_frame_keeps_the_size_given(caplog, ends):
    caplog.set_level(logging.WARNING)
    source, config = Silent(ends=ends), StreamConfig(width=512, height=448, device="cpu")
    started = time.monotonic()
    kept, same = sized_by_source(source, config, "spout:TD", wait=0.3)
    assert kept is source and same is config and time.monotonic() - started < 1.5
    expected = "end of stream; processing at 512x448" if ends else "no frame from spout:TD within 0.3 s; processing at 512x448"
    assert expected in caplog.text


def test_a_bad_aspect_is_one_clear_error():
    with pytest.raises(ValueError, match="aspect: 'wide' must be one of fixed, source"):
        RunSettings(aspect="wide", sink=("null",))


@pytest.mark.slow
def test_run_processes_and_records_at_the_sources_shape(tmp_path):
    out = tmp_path / "wide.mp4"
    result = sdbridge("run", "--source", "testpattern?width=1280&height=720", "--aspect", "source",
                      "--sink", f"file:{out}", *TINY, "--frames", "4")
    assert result.returncode == 0, result.stderr
    # TINY processes 64x64: its area in 16:9 is 128x64 (the nearest multiples of 64)
    assert "source 1280x720: processing at 128x64, its shape with about 64x64's pixels (--aspect source)" in result.stderr
    assert "random:tiny (128x64, eager)" in result.stderr
    with av.open(str(out)) as container:
        frame = next(container.decode(video=0))
    assert (frame.width, frame.height) == (128, 64)


def test_the_size_follows_a_new_shape_once_it_has_settled():
    follower = ShapeFollower(512 * 512, followed=(1280, 720), settle_seconds=1.0)
    assert follower.observe(1280, 720, 0.0, (704, 384)) is None  # the shape chosen at start
    assert follower.observe(1080, 1920, 10.0, (704, 384)) is None  # new: not settled yet
    assert follower.observe(1080, 1920, 10.9, (704, 384)) is None
    assert follower.observe(1080, 1920, 11.0, (704, 384)) == (384, 704)
    assert follower.observe(1080, 1920, 12.0, (384, 704)) is None  # followed: asked once
    assert follower.observe(1280, 720, 20.0, (384, 704)) is None
    assert follower.observe(1280, 720, 21.0, (384, 704)) == (704, 384)  # and back


def test_a_window_dragged_to_size_is_one_change_when_it_settles():
    """A sender's window resized by hand passes through a new shape every frame: no change then,
    one when it stops."""
    follower = ShapeFollower(512 * 512, followed=(1280, 720), settle_seconds=1.0)
    asked = [follower.observe(1280 - 8 * n, 720 + 8 * n, n / 30, (704, 384)) for n in range(60)]
    assert asked == [None] * 60
    asked = [follower.observe(800, 1200, 2 + n / 30, (704, 384)) for n in range(60)]
    assert [size for size in asked if size] == [(384, 576)] and asked.index((384, 576)) == 30  # 2:3, exactly


def test_a_source_flickering_between_two_shapes_changes_nothing():
    follower = ShapeFollower(512 * 512, followed=(1280, 720), settle_seconds=0.5)
    shapes = [(1280, 720), (720, 1280)] * 100
    assert all(follower.observe(*shape, n / 30, (704, 384)) is None for n, shape in enumerate(shapes))


def test_a_new_shape_whose_size_runs_now_changes_nothing():
    """An operator's /sd/resolution already at that size, or a shape with the same size (1920x1080
    after 1280x720): nothing to ask."""
    follower = ShapeFollower(512 * 512, followed=(1280, 720), settle_seconds=0.0)
    assert follower.observe(1920, 1080, 1.0, (704, 384)) is None
    assert follower.observe(640, 480, 2.0, (576, 448)) is None
    follower = ShapeFollower(512 * 512, settle_seconds=0.0)  # no frame at start: the first one counts
    assert follower.observe(1280, 720, 0.0, (512, 512)) == (704, 384)
    with pytest.raises(ValueError, match="area 0 must be positive"):
        ShapeFollower(0)


class Turning(Source):
    """A TouchDesigner TOP switched from landscape to portrait mid-show: 128x72 frames, then
    72x128 ones from `turn_at` seconds after the first read, 30 a second."""

    format = None

    def __init__(self, turn_at):
        self.turn_at, self.started, self.sequence = turn_at, None, 0

    def read(self, timeout=0.1):
        time.sleep(1 / 30)
        now = time.monotonic()
        self.started = self.started or now
        width, height = (128, 72) if now - self.started < self.turn_at else (72, 128)
        self.sequence += 1
        return Frame(np.full((height, width, 3), 90, np.uint8), "RGB", now, self.sequence)

    def close(self):
        pass


def test_a_running_engine_follows_the_source_into_portrait(tiny_components, caplog):
    """The runtime end to end with the tiny model: the size switches once, through the parameter
    store (reported as /sd/resolution is), and the sink keeps its own size."""
    caplog.set_level(logging.INFO)
    engine = StreamDiffusion(tiny_components, StreamConfig(width=128, height=64, device="cpu", dtype="float32",
                                                           t_index_list=(20,), seed=3))
    engine.set_prompt("a lighthouse")
    sink = RecordingSink(FrameFormat(128, 64, "RGB"))
    runtime = Runtime(engine=engine, open_source=lambda: Turning(turn_at=1.0), sinks=[sink],
                      config=RuntimeConfig(fps=30), follow_shape=ShapeFollower(64 * 64, followed=(128, 72),
                                                                                  settle_seconds=0.3))
    heard = []
    runtime.params.add_listener(lambda name, value, error: heard.append((name, value, error)))
    with runtime:
        deadline = time.monotonic() + 60
        while (engine.config.width, engine.config.height) != (64, 128) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (engine.config.width, engine.config.height) == (64, 128), "the size never followed the source"
        count = len(sink.sent)
        deadline = time.monotonic() + 30
        while len(sink.sent) < count + 10 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [entry for entry in heard if entry[0] == "resolution"] == [("resolution", (64, 128), None)]
    assert runtime.params.applied["resolution"] == (64, 128)
    assert "source is now 72x128: processing at 64x128, its shape (--aspect source)" in caplog.text
    assert runtime.snapshot()["size"] == "64x128" and "| 64x128 |" in status_line(runtime.snapshot())
    assert all(frame.pixels.shape == (64, 128, 3) for _, frame in sink.sent)  # the sink's own size throughout


@pytest.mark.parametrize("aspect", ["source", "fixed"])
def test_run_follows_the_source_only_with_aspect_source(aspect):
    """`sdbridge run`'s runtime gets a follower with --aspect source, starting from the shape its
    size was chosen for and the pixels of --width x --height; none with --aspect fixed."""
    from bridge.session import _make_runtime
    from bridge.transports.null import NullSink
    from test_runtime import StandInEngine

    settings = RunSettings(aspect=aspect, sink=("null",), width=512, height=448)
    pattern = TestPatternSource(width=1280, height=720, fps=30)
    first = FirstFrameAgain(pattern, pattern.read(timeout=1.0))
    runtime = _make_runtime(settings, StandInEngine(size=64), [NullSink()], first, None)
    follower = runtime._shared.follow_shape
    if aspect == "fixed":
        assert follower is None
    else:
        assert isinstance(follower, ShapeFollower) and follower.area == 512 * 448
        assert follower.observe(1280, 720, 100.0, (64, 64)) is None  # the shape it was chosen for
    runtime.stop()
    first.close()
