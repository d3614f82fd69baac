"""Sources and sinks that run for real here: test pattern, video files, file sink, null, the registry."""

import os
import struct
import sys
import time

import av
import numpy as np
import pytest

from bridge import framecode
from bridge.frames import Frame
from bridge.transports import SourceEnded, SourceLost, TransportUnavailable, open_sink, open_source, parse_spec
from clips import write_clip


def make_clip(path, *, frames=12, fps=24, width=160, height=120):
    """A short mp4 whose frames carry their index in the frame code."""
    pictures = []
    for index in range(frames):
        pixels = np.full((height, width, 3), (index * 20) % 256, np.uint8)
        framecode.encode(pixels, index, 0)
        pictures.append(pixels)
    return write_clip(path, pictures, fps=fps)


def read_all(source, limit_seconds=5.0):
    frames, deadline = [], time.monotonic() + limit_seconds
    with pytest.raises(SourceEnded):
        while time.monotonic() < deadline:
            frame = source.read(timeout=0.1)
            if frame is not None:
                frames.append(frame)
    return frames


def test_parse_spec_kinds_targets_and_options():
    spec = parse_spec("video:C:\\clips\\a.mp4?loop=1&realtime=0", role="source")
    assert (spec.kind, spec.target, spec.options) == ("video", "C:\\clips\\a.mp4", {"loop": "1", "realtime": "0"})
    assert parse_spec('ndi:TD Out', role="source").target == "TD Out"
    assert parse_spec("virtualcam", role="sink").kind == "virtualcam"


@pytest.mark.parametrize(
    "text, role, message",
    [("webcam", "source", "not a source"), ("file", "sink", "needs a path"), ("video", "source", "needs a file"),
     ("null?x", "sink", "key=value"), ("testpattern", "sink", "not a sink")],
)
def test_parse_spec_errors_name_the_field(text, role, message):
    with pytest.raises(ValueError, match=f"{role}: .*{message}"):
        parse_spec(text, role=role)


def test_unknown_option_is_an_error():
    with pytest.raises(ValueError, match="unknown option"):
        open_source("testpattern?colour=red")


def test_testpattern_moves_is_paced_and_carries_its_number_and_time():
    with open_source("testpattern?width=320&height=240&fps=50") as source:
        started = time.monotonic()
        frames = [f for f in (source.read(timeout=0.2) for _ in range(12)) if f is not None]
        elapsed = time.monotonic() - started
    assert len(frames) >= 10 and elapsed >= 0.15  # paced at about 50 fps, not a burst
    assert frames[0].format.width == 320 and frames[0].pixel_format == "RGB"
    assert not np.array_equal(frames[0].pixels, frames[1].pixels)
    for frame in frames:
        assert framecode.decode(frame.pixels) == (frame.sequence, framecode.milliseconds(frame.timestamp))
    with pytest.raises(SourceLost):
        source.read()
    source.close()  # twice is fine


def test_read_never_blocks_past_its_timeout():
    with open_source("testpattern?fps=2") as source:
        source.read(timeout=0.5)
        started = time.monotonic()
        assert source.read(timeout=0.05) is None
        assert time.monotonic() - started < 0.3


def test_video_source_plays_the_file_once_then_ends(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=12, fps=24)
    with open_source(f"video:{clip}") as source:
        started = time.monotonic()
        frames = read_all(source)
    assert 0.3 < time.monotonic() - started < 3.0  # real time: 12 frames at 24 fps
    assert [framecode.decode(f.pixels)[0] for f in frames] == list(range(12))
    assert frames[0].pixels.shape == (120, 160, 3)


def test_video_source_loops(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", frames=6, fps=60)
    with open_source(f"video:{clip}?loop=1") as source:
        numbers, deadline = [], time.monotonic() + 5
        while len(numbers) < 15 and time.monotonic() < deadline:
            frame = source.read(timeout=0.1)
            if frame is not None:
                numbers.append(framecode.decode(frame.pixels)[0])
    assert numbers[:15] == [0, 1, 2, 3, 4, 5] * 2 + [0, 1, 2]


def test_a_looping_clip_shows_its_last_frame_as_long_as_the_others_and_a_still_loops_at_its_rate(tmp_path):
    """Each pass used to restart its clock at the first frame: the last frame went by in a
    couple of ms, and a one-frame file (a still) was decoded again in a busy loop."""
    clip = write_clip(tmp_path / "three.mp4", [np.full((48, 64, 3), 80 * i, np.uint8) for i in range(3)], fps=10)
    with open_source(f"video:{clip}?loop=1") as source:
        stamps, deadline = [], time.monotonic() + 3
        while len(stamps) < 8 and time.monotonic() < deadline:
            frame = source.read(timeout=0.1)
            if frame is not None:
                stamps.append(frame.timestamp)
    gaps = np.diff(stamps)
    assert len(gaps) == 7 and gaps.min() > 0.07, f"gaps {np.round(gaps * 1000)} ms at 10 fps"  # across the wraps too
    still = tmp_path / "still.png"
    with av.open(str(still), "w", format="image2") as container:
        stream = container.add_stream("png", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "rgb24"
        picture = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 128, np.uint8), format="rgb24")
        picture.pts = 0
        for packet in [*stream.encode(picture), *stream.encode(None)]:
            container.mux(packet)
    with open_source(f"video:{still}?loop=1") as source:
        count, deadline = 0, time.monotonic() + 1.0
        while time.monotonic() < deadline:
            count += source.read(timeout=0.05) is not None
    assert 3 <= count <= 40, f"{count} frames of a still in 1 s"  # its frame rate (image2: 25 fps), not thousands


def test_missing_video_and_camera_are_one_line_errors(tmp_path):
    with pytest.raises(TransportUnavailable, match="video file not found"):
        open_source(f"video:{tmp_path / 'nope.mp4'}")
    os.mkfifo(tmp_path / "pipe.mkv")
    for name in ("", "pipe.mkv"):
        with pytest.raises(TransportUnavailable, match="is not a file .a folder, a device or a named pipe.; video: plays"):
            open_source(f"video:{tmp_path / name}")
    if sys.platform.startswith("linux"):
        with pytest.raises(TransportUnavailable, match="no camera at /dev/video97"):
            open_source("camera:97")


def test_file_sink_writes_an_mp4_that_reads_back(tmp_path):
    path = tmp_path / "out" / "result.mp4"
    sink = open_sink(f"file:{path}", width=64, height=48, fps=20)
    for index in range(10):
        sink.send(Frame(np.full((48, 64, 3), index * 25, np.uint8)))
        time.sleep(0.01)
    sink.close()
    sink.close()
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 10 and frames[0].shape == (48, 64, 3)
    assert abs(int(frames[9].mean()) - 225) < 8


def test_file_sink_writes_a_png_sequence(tmp_path):
    sink = open_sink(f"file:{tmp_path}/frames/%04d.png", width=32, height=32, fps=10)
    for index in range(3):
        sink.send(Frame(np.full((32, 32, 3), index * 100, np.uint8)))
    sink.close()
    names = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert names == ["0001.png", "0002.png", "0003.png"]
    with av.open(str(tmp_path / "frames" / "0003.png")) as container:
        assert next(container.decode(video=0)).to_ndarray(format="rgb24")[0, 0].tolist() == [200, 200, 200]


def test_file_sink_writes_any_pixel_format_in_its_colours_and_refuses_another_size(tmp_path):
    """A BGR frame was written as if RGB (red came out blue), and a frame of another size was
    stretched without a word."""
    sink = open_sink(f"file:{tmp_path}/frames/%04d.png", width=8, height=8, fps=10)
    red_bgra = np.zeros((8, 8, 4), np.uint8)
    red_bgra[..., 2] = red_bgra[..., 3] = 255
    sink.send(Frame(red_bgra, "BGRA"))
    with pytest.raises(ValueError, match="expected 8x8, got 6x8"):
        sink.send(Frame(np.zeros((8, 6, 3), np.uint8)))
    sink.close()
    with av.open(str(tmp_path / "frames" / "0001.png")) as container:
        assert next(container.decode(video=0)).to_ndarray(format="rgb24")[0, 0].tolist() == [255, 0, 0]


def test_a_file_sink_opens_at_its_own_size_and_keeps_its_fit(tmp_path):
    """size=WxH: a 1280x720 recording (or webcam) from a 512x512 engine; fit: how the runtime
    fits the engine's pictures into it (the runtime's side is in test_runtime.py)."""
    sink = open_sink(f"file:{tmp_path}/wide.mp4?size=128x64&fit=Crop&filter=Nearest", width=64, height=64, fps=10)
    assert (sink.format.width, sink.format.height, sink.fit, sink.filter) == (128, 64, "crop", "nearest")
    sink.send(Frame(np.full((64, 128, 3), 90, np.uint8)))
    sink.close()
    with av.open(str(tmp_path / "wide.mp4")) as container:
        assert next(container.decode(video=0)).to_ndarray(format="rgb24").shape == (64, 128, 3)
    plain = open_sink(f"file:{tmp_path}/square.mp4", width=64, height=64, fps=10)
    assert (plain.format.width, plain.format.height, plain.fit, plain.filter) == (64, 64, "letterbox", "bilinear")
    plain.close()


@pytest.mark.parametrize("options, message", [
    ("size=1280", "option size='1280' must look like 1280x720"),
    ("size=axb", "option size='axb' must look like 1280x720"),
    ("size=1281x720", "option size='1281x720': width and height must be even numbers from 2 to 8192"),
    ("size=0x0", "width and height must be even numbers"),
    ("size=16384x720", "width and height must be even numbers"),
    ("fit=zoom", "option fit='zoom' must be one of crop, letterbox, stretch"),
    ("size=128x64&filter=lanczos", "option filter='lanczos' must be one of bilinear, nearest"),
    ("fragment=-1", "fragment: -1.0 must be seconds from 0"),
    ("fragment=nan", "fragment: nan must be seconds from 0"),
    ("fragment=soon", "option fragment='soon' is not a valid float"),
    ("overwrite=maybe", "option overwrite='maybe' is not a valid bool"),
])
def test_a_sink_option_that_cannot_be_is_one_clear_error(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        open_sink(f"file:{tmp_path}/out.mp4?{options}", width=64, height=64)
    assert list(tmp_path.iterdir()) == []


def test_an_ndi_sink_takes_a_fit_or_filter_only_with_a_size():
    """Without size=WxH an NDI sender takes each frame's own size: nothing is fitted or scaled."""
    with pytest.raises(ValueError, match="fit needs size=WxH"):
        open_sink("ndi:sdbridge?fit=crop", width=64, height=64)
    with pytest.raises(ValueError, match="filter needs size=WxH"):
        open_sink("ndi:sdbridge?filter=nearest", width=64, height=64)
    with pytest.raises(ValueError, match="unknown option.*size"):
        open_sink("spout:sdbridge?size=1280x720", width=64, height=64)
    with pytest.raises(ValueError, match="unknown option.*filter"):
        open_sink("spout:sdbridge?filter=nearest", width=64, height=64)


def test_null_sink_counts():
    sink = open_sink("null", width=8, height=8)
    sink.send(Frame(np.zeros((8, 8, 3), np.uint8)))
    assert sink.frames_sent == 1 and sink.format is None
    sink.close()
    sink.close()


def corrupt_packets(path, indices):
    """Overwrite the first bytes of the video packets at `indices` (an H.264 NAL length in mp4:
    the decoder refuses the packet with InvalidDataError)."""
    with av.open(str(path)) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    data = bytearray(open(path, "rb").read())
    for index in indices:
        position, _ = packets[index]
        data[position:position + 4] = b"\xff\xff\xff\xff"
    open(path, "wb").write(bytes(data))
    return len(packets)


@pytest.mark.skipif("libx264" not in av.codecs_available, reason="needs an H.264 encoder")
def test_an_undecodable_packet_is_skipped_not_the_rest_of_the_file(tmp_path):
    """One packet the decoder refused (avcodec_send_packet: InvalidDataError) made the whole
    source lost: the runtime reopened the file, played it from the start into the same packet,
    and a clip never got past it (nor, without loop, ever ended)."""
    rng = np.random.default_rng(0)
    clip = write_clip(tmp_path / "bad.mp4", [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8) for _ in range(30)],
                      fps=30, codec="libx264")
    assert corrupt_packets(clip, [15]) == 30
    with open_source(f"video:{clip}?realtime=0") as source:
        frames = read_all(source)  # SourceEnded, not SourceLost
    assert len(frames) >= 25, f"{len(frames)} of 30 frames"


@pytest.mark.skipif("libx264" not in av.codecs_available, reason="needs an H.264 encoder")
def test_a_stream_of_undecodable_packets_is_still_lost(tmp_path):
    rng = np.random.default_rng(1)
    clip = write_clip(tmp_path / "broken.mp4", [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(60)],
                      fps=30, codec="libx264")
    corrupt_packets(clip, range(1, 60))
    with open_source(f"video:{clip}?realtime=0&loop=1") as source:
        with pytest.raises(SourceLost) as caught:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                source.read(timeout=0.1)
    assert not isinstance(caught.value, SourceEnded) and "InvalidDataError" in str(caught.value)


@pytest.mark.skipif("libx264" not in av.codecs_available, reason="needs an H.264 encoder")
@pytest.mark.parametrize("kind", ["cut inside its first frame", "every packet refused"])
def test_a_looping_file_without_a_decodable_frame_is_lost_not_reopened_in_a_busy_loop(tmp_path, kind):
    """A pass that decoded nothing returned no end time, and the reader reopened the file at
    once, over and over (a thousand times a second, most of a core and the GIL) while read()
    gave None forever."""
    rng = np.random.default_rng(2)
    clip = tmp_path / "clip.mp4"
    with av.open(str(clip), "w", options={"movflags": "faststart"}) as container:  # the index first
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(10):
            picture = av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), format="rgb24")
            picture.pts = index
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    if kind == "every packet refused":
        corrupt_packets(clip, range(10))
    else:  # a half-copied file
        with av.open(str(clip)) as container:
            first = next(p for p in container.demux(video=0) if p.size)
        clip.write_bytes(clip.read_bytes()[: first.pos + first.size // 2])
    with open_source(f"video:{clip}?loop=1") as source:
        started = time.monotonic()
        with pytest.raises(SourceLost) as caught:
            while time.monotonic() - started < 3:
                source.read(timeout=0.1)
    assert not isinstance(caught.value, SourceEnded), caught.value  # the runtime retries it, with backoff
    assert time.monotonic() - started < 1.0


def test_a_file_with_garbled_tags_plays(tmp_path):
    """A title that is not UTF-8 (a damaged file, or one tagged by a tool in another encoding)
    raised UnicodeDecodeError out of open_source: a traceback instead of the clip."""
    clip = tmp_path / "tagged.mp4"
    with av.open(str(clip), "w") as container:
        container.metadata["title"] = "TITLETITLE"
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(5):
            picture = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 50 * index, np.uint8), format="rgb24")
            picture.pts = index
            for packet in stream.encode(picture):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    data = clip.read_bytes()
    assert data.count(b"TITLETITLE") == 1
    clip.write_bytes(data.replace(b"TITLETITLE", b"TITLE\xff\xfe\xd8LE"))
    with open_source(f"video:{clip}?realtime=0") as source:
        assert len(read_all(source)) == 5


def with_display_matrix(path, matrix):
    """Rewrite the mp4's track header matrix (tkhd, version 0): what a phone writes to say how
    its clip is to be shown, instead of turning the pictures."""
    data = bytearray(path.read_bytes())
    box = data.find(b"tkhd")
    assert box > 0 and data[box + 4] == 0, "a version-0 track header"
    at = box + 4 + 4 + 20 + 8 + 8  # (version and flags; times, track, duration; reserved; layer..volume)
    assert struct.unpack(">9i", data[at:at + 36]) == (65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30)  # the identity
    data[at:at + 36] = struct.pack(">9i", *matrix, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))


ORIENTATIONS = {  # display matrix (a, b, u, c, d, v): how players (and ffmpeg's autorotation) show the clip
    "as stored": ((65536, 0, 0, 0, 65536, 0), lambda p: p),
    "a phone held upright (90 degrees clockwise)": ((0, 65536, 0, -65536, 0, 0), lambda p: np.rot90(p, -1)),
    "upside down": ((-65536, 0, 0, 0, -65536, 0), lambda p: p[::-1, ::-1]),
    "90 degrees counterclockwise": ((0, -65536, 0, 65536, 0, 0), lambda p: np.rot90(p, 1)),
    "mirrored (a front camera)": ((-65536, 0, 0, 0, 65536, 0), lambda p: p[:, ::-1]),
    "mirrored top to bottom": ((65536, 0, 0, 0, -65536, 0), lambda p: p[::-1]),
    "mirrored and turned (a transpose)": ((0, 65536, 0, 65536, 0, 0), lambda p: p.transpose(1, 0, 2)),
    "mirrored and turned the other way": ((0, -65536, 0, -65536, 0, 0), lambda p: p.transpose(1, 0, 2)[::-1, ::-1]),
}


@pytest.mark.parametrize("turn", ORIENTATIONS)
def test_a_clip_is_turned_as_players_show_it(tmp_path, turn):
    """A clip shot on a phone held upright came out lying on its side: its pictures are stored
    wide, with a display matrix that players (and ffmpeg) turn them by. Mirrored clips came out
    upside down (their matrix reads as a turn of 180 degrees). Each of the eight ways a matrix
    can show a picture, on four grey quarters that tell them all apart."""
    matrix, shown = ORIENTATIONS[turn]
    picture = np.zeros((48, 96, 3), np.uint8)
    picture[:24, :48], picture[:24, 48:], picture[24:, :48] = 255, 170, 85  # (the bottom right 0)
    clip = tmp_path / "phone.mp4"
    write_clip(clip, [picture] * 3, fps=10)
    if turn != "as stored":
        with_display_matrix(clip, matrix)
    with open_source(f"video:{clip}?realtime=0") as source:
        frames = read_all(source)
    expected = shown(picture)
    assert len(frames) == 3 and frames[0].pixels.shape == expected.shape, turn

    def quarters(pixels):
        h, w = pixels.shape[0] // 2, pixels.shape[1] // 2
        return [round(float(pixels[y + h // 4:y + 3 * h // 4, x + w // 4:x + 3 * w // 4].mean()))
                for y in (0, h) for x in (0, w)]

    assert np.allclose(quarters(frames[0].pixels), quarters(expected), atol=12), (turn, quarters(frames[0].pixels))


def test_only_quarter_turns_and_mirrors_are_applied():
    """Another angle (a 45-degree matrix), a matrix of zeros or none: the pixels as stored."""
    from bridge.transports.avreader import upright

    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    for matrix in [(46341, 46341, 0, -46341, 46341, 0, 0, 0, 1 << 30), (0,) * 9, None, (1, 2)]:
        assert upright(pixels, matrix) is pixels
    assert upright(pixels, (65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30)) is pixels
    assert np.array_equal(upright(pixels, (0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)), np.rot90(pixels, -1))
    assert upright(pixels, (0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30)).flags.c_contiguous


CORRUPTIONS = ("bytes changed", "cut short", "a block overwritten")


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_a_damaged_file_is_a_clear_error_or_plays_what_it_can(tmp_path, kind):
    """15 files damaged at random (seeded): opening one is TransportUnavailable or a source, and
    reading one gives frames and ends (SourceEnded) or is lost (SourceLost); nothing else escapes,
    and no read outlasts its timeout by much. Each file read for 3 s at most."""
    ramp = np.tile(np.linspace(0, 255, 96, dtype=np.uint8)[None, :, None], (64, 1, 3))
    pictures = [np.roll(ramp, index, axis=1) for index in range(60)]
    outcomes = []
    for seed in range(15):
        rng = np.random.default_rng([CORRUPTIONS.index(kind), seed])
        clip = write_clip(tmp_path / f"clip{seed}.mp4", pictures, fps=60)
        data = bytearray(open(clip, "rb").read())
        if kind == "bytes changed":
            for position in rng.integers(0, len(data), 20):
                data[position] = rng.integers(0, 256)
        elif kind == "cut short":
            data = data[: rng.integers(1, len(data))]
        else:
            start = rng.integers(0, len(data))
            data[start:start + 200] = rng.integers(0, 256, len(data[start:start + 200]), dtype=np.uint8).tobytes()
        open(clip, "wb").write(bytes(data))
        try:
            source = open_source(f"video:{clip}?realtime=0")
        except TransportUnavailable as exc:
            assert str(clip) in str(exc)
            outcomes.append("refused")
            continue
        frames, started, ending = 0, time.monotonic(), "still reading"
        with source:
            while time.monotonic() - started < 3:
                before = time.monotonic()
                try:
                    frames += source.read(timeout=0.1) is not None
                except SourceLost as exc:  # (SourceEnded is one)
                    ending = type(exc).__name__
                    break
                assert time.monotonic() - before < 1.0
        assert ending != "still reading", f"seed {seed}: neither ended nor lost after 3 s"
        outcomes.append(f"{ending} after {frames}")
    assert len(outcomes) == 15, outcomes


class _PacedDemux:
    """A real container whose packets arrive one every `interval` seconds, as a live device's do
    (the decoder is FFmpeg's own); `arrivals[k]` is when packet k came."""

    def __init__(self, path, interval: float) -> None:
        self._container = av.open(str(path))
        self._interval = interval
        self.streams = self._container.streams
        self.arrivals: list[float] = []

    def demux(self, stream):
        for packet in self._container.demux(stream):
            if packet.size:
                time.sleep(self._interval)
                self.arrivals.append(time.monotonic())
            yield packet

    def close(self) -> None:
        self._container.close()


@pytest.mark.parametrize("live", [True, False])
def test_a_live_device_decodes_each_frame_before_its_next_packet_arrives(tmp_path, live):
    """FFmpeg's frame threads keep thread_count - 1 frames inside the decoder: for a camera
    sending MPEG-4 or H.264, frames a quarter of a second late. The camera's reader (live) decodes
    with slice threads: each frame is out before the next packet arrives. A file keeps frame
    threads (decoded ahead of its pacing); the test shows they do hold frames back here."""
    from bridge.transports.avreader import AVReader
    from clips import write_clip

    # MPEG-4 Part 2: in every FFmpeg build, frame-threaded, and no B-frames by default
    clip = write_clip(tmp_path / "camera.mp4", [np.full((48, 64, 3), 20 * k, np.uint8) for k in range(12)],
                      fps=30, codec="mpeg4")
    opened: list[_PacedDemux] = []

    def open_container():
        opened.append(_PacedDemux(clip, interval=0.06))
        opened[-1].streams.video[0].thread_count = 4  # as on a 4-core machine (FFmpeg's auto: cores + 1)
        return opened[-1]

    reader = AVReader(open_container=open_container, name="camera test", realtime=False, loop=False, live=live)
    try:
        received, deadline = [], time.monotonic() + 10
        while len(received) < 12 and time.monotonic() < deadline:
            frame = reader.read(timeout=0.2)
            if frame is not None:
                received.append(frame)
    except SourceEnded:
        pass
    finally:
        reader.close()
    arrivals = opened[0].arrivals
    # how many packets had arrived after frame k's own when it came out of the decoder
    late = [sum(1 for t in arrivals[frame.sequence + 1:] if t < frame.timestamp) for frame in received]
    if live:
        assert len(received) == 12 and max(late) == 0, late
    else:
        assert max(late) >= 1, late


def test_a_live_device_that_stops_delivering_without_an_error_is_lost(tmp_path):
    """A capture card that loses its signal, a webcam driver that hangs: the decoder just waits for
    bytes that never come. Here a real MJPEG stream through a real pipe (a FIFO), whose writer
    sends 10 frames and then nothing, without closing: the reader (as the camera source makes it,
    live) says lost once nothing came for its stall time, so the runtime reports it and reopens."""
    import io
    import os
    import threading

    from bridge.transports.avreader import AVReader

    encoded = io.BytesIO()
    with av.open(encoded, "w", format="mjpeg") as container:
        stream = container.add_stream("mjpeg", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for k in range(10):
            pixels = np.full((48, 64, 3), 20 * k, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    fifo = tmp_path / "camera.mjpeg"
    os.mkfifo(fifo)
    release = threading.Event()

    def device() -> None:  # writes, then stays open and silent until the test is done
        with open(fifo, "wb") as pipe:
            pipe.write(encoded.getvalue())
            pipe.flush()
            release.wait(30)

    writer = threading.Thread(target=device, daemon=True)
    writer.start()
    # (a device is opened without probing its stream for seconds: no probing here either)
    options = {"probesize": "32", "analyzeduration": "0"}
    reader = AVReader(open_container=lambda: av.open(str(fifo), format="mjpeg", options=options), name="camera test",
                      realtime=False, loop=False, stall_seconds=1.0)
    try:
        frames, lost, deadline = 0, None, time.monotonic() + 15
        while lost is None and time.monotonic() < deadline:
            try:
                frames += reader.read(timeout=0.1) is not None
            except SourceLost as exc:
                lost = exc
        assert frames >= 1 and lost is not None, frames
        assert not isinstance(lost, SourceEnded) and "no frame for 1 s (the device stopped delivering)" in str(lost)
        # (the decode thread itself stays blocked in its read until the device gives bytes or goes
        # away: FFmpeg's read timeout is not checked inside a blocking read; close() waits 1 s only)
    finally:
        release.set()  # the writer closes: the blocked decoder sees the end, and the reader stops
        writer.join(5)
        reader.close()
