"""--aspect source: the processing size takes the shape of the source's first frame, with about
as many pixels as --width x --height, in sizes every backend and SD model takes."""

import logging
import math
import time

import av
import pytest

from bridge.session import FirstFrameAgain, sized_by_source
from bridge.settings import RunSettings
from bridge.transports.base import Source, SourceEnded
from bridge.transports.testpattern import TestPatternSource
from pipeline import StreamConfig
from pipeline.config import aspect_size
from test_cli import TINY, sdbridge


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
