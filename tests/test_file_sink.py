"""A recording of the show survives what the show survives: the process killed mid-recording, a
restart with the same command (a PNG sequence too), a disk that fills up (and is announced as it
does), a named pipe's reader that is not there or goes away; and the record button
(/sd/record/stop, /sd/record/start, record=0). Real files through PyAV throughout; a disk that takes nothing is
Linux's /dev/full (every write fails with ENOSPC) behind a symbolic link, one that fills up a
small tmpfs in a mount namespace of a child process's own (`unshare -rm`)."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import av
import numpy as np
import pytest

from bridge.frames import Frame
from bridge.transports import TransportUnavailable, open_sink
from bridge.transports.file import (DiskWatch, FileSink, claim_free_path, first_picture, is_image_sequence, numbered,
                                    sequence_take)

FPS = 30

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full (Linux's always-full device) here")

# Writes `count` frames of a sliding ramp (no scene cuts: the encoder's keyframes are the ones
# asked for) to the sink named by argv[1], then kills its own process: nothing is closed,
# flushed or finished, as when the machine's memory runs out or the process is killed.
KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from bridge.frames import Frame
    from bridge.transports import open_sink
    sink = open_sink(sys.argv[1], width=96, height=64, fps=30)
    ramp = np.tile(np.linspace(0, 255, 96, dtype=np.uint8)[None, :, None], (64, 1, 3))
    for index in range(int(sys.argv[2])):
        sink.send(Frame(np.ascontiguousarray(np.roll(ramp, index, axis=1))))
    os.kill(os.getpid(), signal.SIGKILL)
""")


def frames_in(path) -> int:
    """How many pictures a player gets out of `path` before it ends or breaks off."""
    count = 0
    try:
        with av.open(str(path)) as container:
            for _ in container.decode(video=0):
                count += 1
    except av.error.FFmpegError:
        pass
    return count


def ramp_frame(index: int, width: int = 64, height: int = 64) -> Frame:
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.uint8)[None, :, None], (height, 1, 3))
    return Frame(np.ascontiguousarray(np.roll(ramp, index, axis=1)))


@pytest.mark.parametrize("spec, fragment", [("show.mp4", 2.0), ("show.mov?fragment=0.5", 0.5), ("show.mkv", 2.0)])
def test_a_recording_plays_after_the_process_was_killed(tmp_path, spec, fragment):
    """At most `fragment` seconds (its keyframe interval) are lost with the process."""
    sent = 100
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, f"file:{tmp_path}/{spec}", str(sent)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    kept = frames_in(tmp_path / spec.partition("?")[0])
    assert sent - FPS * fragment - 2 <= kept <= sent, f"{kept} of {sent} frames play"


def test_a_classic_mp4_is_lost_with_the_process(tmp_path):
    """fragment=0 writes the index only at close: what the default protects against."""
    result = subprocess.run([sys.executable, "-c", KILLED_WRITER, f"file:{tmp_path}/show.mp4?fragment=0", "100"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert frames_in(tmp_path / "show.mp4") == 0


@pytest.mark.parametrize("name, fragment", [("show.mp4", 2.0), ("show.mp4", 0.0), ("show.mov", 1.0)])
def test_a_finished_recording_knows_its_length_and_seeks(tmp_path, name, fragment):
    sink = FileSink(path=str(tmp_path / name), width=64, height=64, fps=FPS, fragment=fragment)
    for index in range(90):
        sink.send(ramp_frame(index))
    sink.close()
    with av.open(str(tmp_path / name)) as container:
        assert container.duration == pytest.approx(3_000_000, abs=50_000)  # 90 frames at 30 fps, in µs
        container.seek(1_500_000)
        frame = next(container.decode(video=0))
        assert frame.time <= 1.55 and (not fragment or frame.time >= 1.45 - fragment)  # the keyframe before
    assert frames_in(tmp_path / name) == 90


def test_an_existing_recording_is_never_replaced_unless_asked(tmp_path, caplog):
    """The process restarted with the same command after a crash: the crash's recording stays."""
    show = tmp_path / "show.mp4"
    first = open_sink(f"file:{show}", width=64, height=64, fps=FPS)
    for index in range(10):
        first.send(ramp_frame(index))
    first.close()
    caplog.set_level(logging.WARNING)
    second = open_sink(f"file:{show}", width=64, height=64, fps=FPS)
    third = open_sink(f"file:{show}", width=64, height=64, fps=FPS)
    assert (second.path, third.path) == (str(tmp_path / "show-2.mp4"), str(tmp_path / "show-3.mp4"))
    assert f"{show} exists: recording to {tmp_path / 'show-2.mp4'} (the sink option overwrite=1" in caplog.text
    for index in range(5):
        second.send(ramp_frame(index))
    second.close()
    third.close()  # it recorded nothing: its empty file goes
    assert (frames_in(show), frames_in(tmp_path / "show-2.mp4")) == (10, 5)
    assert not (tmp_path / "show-3.mp4").exists()

    replacing = open_sink(f"file:{show}?overwrite=1", width=64, height=64, fps=FPS)
    assert replacing.path == str(show)
    replacing.send(ramp_frame(0))
    replacing.close()
    assert frames_in(show) == 1
    kept = open_sink(f"file:{show}?overwrite=yes", width=64, height=64, fps=FPS, keep_existing=True)
    assert kept.path == str(tmp_path / "show-3.mp4")  # a sink opened again never replaces its recording
    kept.close()


def test_free_names_are_numbered_before_the_extension(tmp_path):
    assert numbered("/a/show.mp4", 1) == "/a/show.mp4" and numbered("/a/show.mp4", 12) == "/a/show-12.mp4"
    assert numbered("take", 2) == "take-2"
    names = [claim_free_path(str(tmp_path / "show.mkv")) for _ in range(3)]
    assert names == [str(tmp_path / n) for n in ("show.mkv", "show-2.mkv", "show-3.mkv")]
    assert all(os.path.getsize(name) == 0 for name in names)  # claimed: created, so no one else takes it


def test_a_png_sequence_is_never_written_over_unless_asked(tmp_path, caplog):
    """A PNG sequence numbered its pictures from 1 over the ones a crashed show wrote: a start
    with the same name now writes a take of its own beside them."""
    frames = tmp_path / "frames"

    def record(spec, count, **options):
        sink = open_sink(f"file:{spec}", width=32, height=32, fps=FPS, **options)
        for index in range(count):
            sink.send(Frame(np.full((32, 32, 3), 50 * len(spec) % 256, np.uint8)))
        sink.close()
        return sink.path

    caplog.set_level(logging.INFO)
    assert record(f"{frames}/%04d.png", 3) == f"{frames}/%04d.png"
    assert record(f"{frames}/%04d.png", 2) == f"{frames}/2-%04d.png"
    assert f"{frames}/%04d.png has pictures: recording to {frames}/2-%04d.png (the sink option overwrite=1" in caplog.text
    assert record(f"{frames}/%04d.png", 0) == f"{frames}/3-%04d.png"  # nothing recorded: nothing left behind
    assert record(f"{frames}/shot_%3d.png", 1) == f"{frames}/shot_%3d.png"
    assert record(f"{frames}/shot_%3d.png", 1) == f"{frames}/shot-2_%3d.png"  # (image2 pads %3d with zeros)
    assert sorted(p.name for p in frames.iterdir()) == ["0001.png", "0002.png", "0003.png", "2-0001.png", "2-0002.png",
                                                        "shot-2_001.png", "shot_001.png"]
    first_take = (frames / "0001.png").read_bytes()
    assert record(f"{frames}/%04d.png?overwrite=1", 1) == f"{frames}/%04d.png"  # asked: written over
    assert (frames / "0001.png").read_bytes() != first_take
    assert record(f"{frames}/%04d.png?overwrite=1", 1, keep_existing=True) == f"{frames}/3-%04d.png"


def test_png_sequence_takes_are_named_for_editors_to_tell_apart():
    """Each take is a sequence of its own to an editor (which reads the number at the end of a
    name): the take goes before the picture number, not after it."""
    assert [sequence_take("frames/%05d.png", n) for n in (1, 2, 12)] == [
        "frames/%05d.png", "frames/2-%05d.png", "frames/12-%05d.png"]
    assert sequence_take("shot_%04d.png", 2) == "shot-2_%04d.png"
    assert sequence_take("show.%d.png", 3) == "show-3.%d.png"
    assert sequence_take("/a/shot%d.png", 2) == "/a/shot-2-%d.png"
    assert sequence_take("100%%_%03d.png", 2) == "100%%-2_%03d.png"
    assert [first_picture(p) for p in ("f/%05d.png", "s_%3d.png", "%d.png", "100%%_%d.png")] == [
        "f/00001.png", "s_001.png", "1.png", "100%_1.png"]
    assert is_image_sequence("f/%05d.png") and is_image_sequence("F/%D.PNG") is False
    assert not is_image_sequence("100%.png") and not is_image_sequence("%05d/a.png") and not is_image_sequence("%05d.mp4")


def test_a_named_pipe_without_a_reader_is_an_error_not_a_hang(tmp_path):
    """file:PIPE.mkv, a FIFO another program (an ffmpeg that streams it on) reads: opening it
    waited forever for that reader, freezing the start, or a lane's reopen. Now: an error at once
    while nobody reads; all frames through it while a reader does; the reader going away ends
    the recording with a named error, and the sink opens again once a reader is back."""
    pipe = tmp_path / "stream.mkv"
    os.mkfifo(pipe)
    # in a process of its own: an open that blocks (the old behaviour) cannot be interrupted in a thread,
    # and kept this test process from exiting
    opening = textwrap.dedent(f"""
        from bridge.transports import TransportUnavailable, open_sink
        try:
            open_sink("file:{pipe}", width=64, height=64, fps=30)
        except TransportUnavailable as exc:
            print(exc)
    """)
    result = subprocess.run([sys.executable, "-c", opening], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == f"cannot write {pipe}: it is a named pipe that no program reads yet; start its reader first", result.stderr

    def read_all(into, stop_after=None):
        with open(pipe, "rb") as handle:
            while block := handle.read(4096):
                into.extend(block)
                if stop_after is not None and len(into) > stop_after:
                    return  # the reader goes away

    def opened_once_read(**options):
        """The sink, opened as soon as the reader thread has the pipe open (as a lane retries)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                return open_sink(f"file:{pipe}", width=64, height=64, fps=FPS, **options)
            except TransportUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    received = bytearray()
    reader = threading.Thread(target=read_all, args=(received,), daemon=True)
    reader.start()
    sink = opened_once_read()
    assert sink.path == str(pipe)  # written as it is, never numbered beside
    for index in range(20):
        sink.send(ramp_frame(index))
    sink.close()
    reader.join(10)
    (tmp_path / "received.mkv").write_bytes(received)
    assert frames_in(tmp_path / "received.mkv") == 20

    reader = threading.Thread(target=read_all, args=(bytearray(), 3000), daemon=True)
    reader.start()
    sink = opened_once_read()
    noise = np.random.default_rng(1)
    with pytest.raises(OSError):  # (bounded: 300 frames of noise are far more than 3000 bytes)
        for _ in range(300):
            sink.send(Frame(noise.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(OSError, match=rf"{pipe} stopped recording at frame \d+: Broken pipe"):
        sink.send(ramp_frame(0))
    sink.close()
    reader.join(10)
    received = bytearray()
    reader = threading.Thread(target=read_all, args=(received,), daemon=True)
    reader.start()
    again = opened_once_read(keep_existing=True)
    again.send(ramp_frame(0))
    again.close()
    reader.join(10)
    assert len(received) > 0


def test_a_file_that_cannot_be_started_leaves_nothing_behind(tmp_path):
    with pytest.raises(TransportUnavailable, match=r"cannot write .*show\.mp4"):
        FileSink(path=str(tmp_path / "show.mp4"), width=64, height=64, codec="no-such-codec")
    assert list(tmp_path.iterdir()) == []


@needs_dev_full
def test_a_disk_that_takes_nothing_is_an_error_at_open(tmp_path):
    """The header is written when the sink opens: a full disk (or a codec the container cannot
    hold) is said before the show, not found at its first frame."""
    show = tmp_path / "show.mp4"
    show.symlink_to("/dev/full")
    with pytest.raises(TransportUnavailable, match=r"cannot write .*show\.mp4: \[Errno 28\] No space left on device"):
        open_sink(f"file:{show}?overwrite=1", width=64, height=48)
    assert show.is_symlink()  # overwrite=1: the file was not this sink's to remove
    with pytest.raises(TransportUnavailable, match=r"cannot write .*odd\.mp4: codec mjpeg: .*"):
        open_sink(f"file:{tmp_path}/odd.mp4?codec=mjpeg&size=64x48", width=64, height=48)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["show.mp4"]


MID_SHOW_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from bridge.frames import Frame
    from bridge.transports.file import FileSink
    sink = FileSink(path=sys.argv[1], width=256, height=256, fragment=0.5)
    noise, failures = np.random.default_rng(0), []
    for index in range(200):  # 200 frames of noise: far more than 512 KiB
        try:
            sink.send(Frame(noise.integers(0, 256, (256, 256, 3), dtype=np.uint8)))
        except OSError as exc:
            failures.append(str(exc))
    sink.close()
    print(sink.frames_written, len(failures))
    print(failures[0])
    print(failures[-1])
""")


def mount_namespace_unavailable() -> str | None:
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
                           capture_output=True, text=True, timeout=20)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}"


def test_a_disk_that_fills_up_mid_recording_keeps_what_was_written(tmp_path):
    """A 512 KiB tmpfs in a mount namespace of the child's own fills up after some frames."""
    reason = mount_namespace_unavailable()
    if reason:
        pytest.skip(reason)
    setup = "mount -t tmpfs -o size=512k none /mnt"
    result = subprocess.run(["unshare", "-rm", "sh", "-c", f'{setup} && "$0" "$@" && cp /mnt/show.mp4 {tmp_path}',
                             sys.executable, "-c", MID_SHOW_WRITER, "/mnt/show.mp4"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    counts, first, last = result.stdout.splitlines()
    written, failed = map(int, counts.split())
    assert written >= 5 and written + failed == 200
    assert first.endswith("No space left on device: '/mnt/show.mp4'")
    assert last.startswith(f"/mnt/show.mp4 stopped recording at frame {written + 1}: No space left on device")
    assert written - FPS * 0.5 - 2 <= frames_in(tmp_path / "show.mp4") <= written  # up to its last whole fragment


FILLING_SHOW = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from bridge.frames import Frame
    from bridge.runtime import Runtime, RuntimeConfig
    from bridge.session import sink_reopeners
    from bridge.transports import open_sink
    from bridge.transports.base import Source
    from test_file_sink import frames_in
    from test_runtime import RecordingSink, StandInEngine

    class Noise(Source):  # pictures no encoder can shrink much: the disk fills within a second
        format = None
        def __init__(self):
            self.rng, self.number, self.next = np.random.default_rng(0), 0, time.monotonic()
        def read(self, timeout=0.1):
            time.sleep(max(0.0, self.next - time.monotonic()))
            self.next, self.number = self.next + 1 / 30, self.number + 1
            return Frame(self.rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), "RGB", time.monotonic(), self.number)
        def close(self):
            pass

    with open("/mnt/filler", "wb") as filler:
        filler.write(bytes(700 * 1024))  # of the 1 MiB
    spec = "file:/mnt/show.mp4"
    other = RecordingSink()
    runtime = Runtime(engine=StandInEngine(size=128, cost=0.005), open_source=Noise,
                      sinks=[open_sink(spec, width=128, height=128, fps=30), other],
                      config=RuntimeConfig(fps=30, sink_reopen_seconds=0.3),
                      reopen_sinks=sink_reopeners([spec, "null"], width=128, height=128, fps=30))
    with runtime:
        deadline = time.monotonic() + 20
        while runtime.telemetry.snapshot()["sink_errors"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        full = time.monotonic()
        time.sleep(1.0)  # full for a second: the sink fails, is opened again, and that fails too
        os.remove("/mnt/filler")
        freed = time.monotonic()
        runtime.wait(timeout=3.0)
    sent = [t for t, _ in other.sent]
    print(json.dumps(runtime.recordings()))
    print(" ".join(f"{name}:{frames_in('/mnt/' + name)}" for name in sorted(os.listdir("/mnt"))))
    print(len([t for t in sent if full < t < freed]), max(np.diff(sent)))
""")


def test_a_disk_that_fills_mid_show_costs_the_recording_only_while_it_is_full(tmp_path):
    """A 1 MiB tmpfs in a mount namespace of the child's own, mostly taken by another file: the
    recording fills it and fails; the other sink goes on; the file sink is opened again (into
    show-2.mp4, which cannot start while the disk is full and leaves no empty file behind); once
    the other file is deleted, show-2.mp4 records."""
    reason = mount_namespace_unavailable()
    if reason:
        pytest.skip(reason)
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=1m none /mnt && exec "$0" "$@"',
                             sys.executable, "-c", FILLING_SHOW, tests], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(tests))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    recordings, files, continuity = result.stdout.splitlines()[-3:]
    counts = dict(entry.split(":") for entry in files.split())
    # what the exit summary lists: each file with the frames written to it (a fragment may be cut)
    written = dict(json.loads(recordings))
    assert list(written) == ["/mnt/show.mp4", "/mnt/show-2.mp4"], recordings
    assert int(counts["show.mp4"]) <= written["/mnt/show.mp4"] and int(counts["show-2.mp4"]) == written["/mnt/show-2.mp4"]
    assert sorted(counts) == ["show-2.mp4", "show.mp4"], files  # no show-3.mp4: the failed starts left nothing
    assert int(counts["show.mp4"]) >= 3 and int(counts["show-2.mp4"]) >= 30, files  # the last 3 s, or most of them
    while_full, longest_gap = continuity.split()
    assert int(while_full) >= 20 and float(longest_gap) < 0.25, continuity  # the other sink saw no gap
    assert "sink 1 FileSink failed: OSError: [Errno 28] No space left on device: '/mnt/show.mp4'" in result.stderr
    assert "cannot write /mnt/show.mp4 (as /mnt/show-2.mp4): [Errno 28] No space left on device" in result.stderr
    assert "s: opened it again" in result.stderr
    assert "/mnt/show.mp4: only 0.3 MiB free on its disk; the recording stops when it is full" in result.stderr


def wait_for(condition, seconds=3.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_recording_stops_and_starts_a_new_file_while_the_other_sinks_go_on(tmp_path, caplog):
    """/sd/record/stop and /sd/record/start (Runtime.record_stop, record_start): the record button."""
    from bridge.runtime import Runtime, RuntimeConfig
    from bridge.session import sink_reopeners
    from bridge.transports.testpattern import TestPatternSource
    from test_runtime import RecordingSink, StandInEngine

    caplog.set_level(logging.INFO)
    specs = [f"file:{tmp_path}/show.mp4", f"file:{tmp_path}/frames/%04d.png"]
    sinks = [open_sink(spec, width=64, height=64, fps=FPS) for spec in specs] + [RecordingSink()]
    runtime = Runtime(engine=StandInEngine(size=64, cost=0.005),
                      open_source=lambda: TestPatternSource(width=64, height=64, fps=FPS), sinks=sinks,
                      config=RuntimeConfig(fps=FPS), reopen_sinks=sink_reopeners([*specs, "null"], width=64, height=64, fps=FPS))
    with runtime:
        assert wait_for(lambda: runtime.snapshot()["recording"] == 2 and sinks[0].frames_written >= 10)
        runtime.record_start()  # already recording: nothing changes
        assert wait_for(lambda: "already recording" in caplog.text)
        runtime.record_stop()
        assert wait_for(lambda: runtime.snapshot()["recording"] == 0)
        stopped_at = (sinks[0].frames_written, sinks[1].frames_written)
        time.sleep(0.5)  # frames meanwhile go to the other sink only
        runtime.record_start()
        assert wait_for(lambda: runtime.snapshot()["recording"] == 2)
        new = [str(tmp_path / "show-2.mp4"), str(tmp_path / "frames/2-%04d.png")]  # (the PNG sequence: a new take)
        assert wait_for(lambda: all(dict(runtime.recordings()).get(path, 0) >= 10 for path in new))
        snapshot = runtime.snapshot()
    assert (sinks[0].frames_written, sinks[1].frames_written) == stopped_at  # finished when stopped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "show-2.mp4", "show.mp4"]
    recordings = dict(runtime.recordings())
    takes = [str(tmp_path / "frames/%04d.png"), str(tmp_path / "frames/2-%04d.png")]
    assert sorted(recordings) == sorted([str(tmp_path / "show.mp4"), str(tmp_path / "show-2.mp4"), *takes])
    assert frames_in(tmp_path / "show.mp4") == recordings[str(tmp_path / "show.mp4")] == stopped_at[0]
    assert frames_in(tmp_path / "show-2.mp4") == recordings[str(tmp_path / "show-2.mp4")] >= 10
    pictures = sorted(p.name for p in (tmp_path / "frames").iterdir())  # a take of its own: none written over
    assert pictures == sorted([f"{n:04d}.png" for n in range(1, stopped_at[1] + 1)]
                              + [f"2-{n:04d}.png" for n in range(1, recordings[takes[1]] + 1)])
    sent = [t for t, _ in sinks[2].sent]
    assert max(np.diff(sent)) < 0.25 and snapshot["sink_errors"] == 0  # a stopped recording is not a failure
    assert not snapshot["last_error"]
    assert f"recording stopped: {tmp_path / 'show.mp4'} ({stopped_at[0]} frames)" in caplog.text
    assert f"recording to {tmp_path / 'show-2.mp4'}" in caplog.text


def test_a_recording_armed_with_record_0_waits_for_record_start(tmp_path, caplog):
    """file:show.mp4?record=0: checked at start (name, codec, disk), then nothing is written
    until /sd/record/start; the status line and /sd/status/recording say when it records."""
    from bridge.runtime import Runtime, RuntimeConfig
    from bridge.session import sink_reopeners
    from bridge.telemetry import status_line
    from bridge.transports.testpattern import TestPatternSource
    from test_runtime import StandInEngine

    caplog.set_level(logging.INFO)
    spec = f"file:{tmp_path}/show.mp4?record=0"
    sink = open_sink(spec, width=64, height=64, fps=FPS)
    assert sink.record_at_start is False
    reopened = open_sink(spec, width=64, height=64, fps=FPS, keep_existing=True)
    assert reopened.record_at_start is True and reopened.path == str(tmp_path / "show-2.mp4")  # (as the lane would)
    reopened.close()  # (nothing written: its file goes)
    runtime = Runtime(engine=StandInEngine(size=64, cost=0.005),
                      open_source=lambda: TestPatternSource(width=64, height=64, fps=FPS), sinks=[sink],
                      config=RuntimeConfig(fps=FPS), reopen_sinks=sink_reopeners([spec], width=64, height=64, fps=FPS))
    with runtime:
        assert wait_for(lambda: runtime.snapshot()["frames_out"] >= 10)
        armed = sorted(p.name for p in tmp_path.iterdir()), runtime.snapshot()
        runtime.record_start()
        assert wait_for(lambda: runtime.snapshot()["recording"] == 1)
        time.sleep(0.5)
        line = status_line(runtime.snapshot())
    assert armed[0] == [] and armed[1]["recording"] == 0  # checked at start, then removed: nothing was recorded
    assert "recording" not in status_line(armed[1]) and "| recording 1" in line
    assert "not recording until /sd/record/start (record=0)" in caplog.text
    assert frames_in(tmp_path / "show.mp4") >= 10 and dict(runtime.recordings()) == {
        str(tmp_path / "show.mp4"): frames_in(tmp_path / "show.mp4")}
    # with overwrite=1 too, an armed sink checks beside the old show and leaves it whole
    armed_again = open_sink(f"file:{tmp_path}/show.mp4?record=0&overwrite=1", width=64, height=64, fps=FPS)
    assert armed_again.path == str(tmp_path / "show-2.mp4")
    armed_again.close()
    assert frames_in(tmp_path / "show.mp4") >= 10 and not (tmp_path / "show-2.mp4").exists()


def test_a_long_recording_is_split_into_files_without_losing_a_frame(tmp_path):
    """split=1: every second the file is finished and the next one opened, between two frames."""
    from bridge.runtime import Runtime, RuntimeConfig
    from bridge.session import sink_reopeners
    from bridge.transports.testpattern import TestPatternSource
    from test_runtime import StandInEngine

    spec = f"file:{tmp_path}/show.mp4?split=1"
    sink = open_sink(spec, width=64, height=64, fps=FPS)
    runtime = Runtime(engine=StandInEngine(size=64, cost=0.005),
                      open_source=lambda: TestPatternSource(width=64, height=64, fps=FPS), sinks=[sink],
                      config=RuntimeConfig(fps=FPS), reopen_sinks=sink_reopeners([spec], width=64, height=64, fps=FPS))
    with runtime:
        runtime.wait(timeout=2.6)
    names = ["show.mp4", "show-2.mp4", "show-3.mp4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    played = [frames_in(tmp_path / name) for name in names]
    assert dict(runtime.recordings()) == {str(tmp_path / name): count for name, count in zip(names, played)}
    assert sum(played) == runtime.sinks_sent()[0][1]  # every frame the sink took is in one of the files
    assert all(count >= FPS * 0.5 for count in played[:2]), played
    with pytest.raises(ValueError, match="option split='0.5' must be seconds from 1 to a week"):
        open_sink(f"file:{tmp_path}/x.mp4?split=0.5", width=64, height=64)
    with pytest.raises(ValueError, match="for a video file"):
        open_sink(f"file:{tmp_path}/frames/%04d.png?split=10", width=64, height=64)


def test_a_filling_disk_is_announced_as_it_halves_with_the_minutes_left():
    """An operator learns the recording is about to stop while there is time to act: under 2 GiB
    free, then at each halving, with the minutes left at the rate the disk has been filling."""
    gib = 2**30
    free = iter([3 * gib, 3 * gib, 1.5 * gib, 1.4 * gib, 0.9 * gib, 0.4 * gib])
    watch = DiskWatch("/shows/show.mp4", free_of=lambda path: int(next(free)), every=60)
    said = [watch.check(t) for t in (0, 30, 60, 600, 1200, 1800, 2400)]
    assert said[:3] == [None, None, None]  # plenty (and not looked at again within 60 s)
    assert said[3] == ("/shows/show.mp4: only 1536 MiB free on its disk, about 10 min at the rate it has been filling; "
                       "the recording stops when it is full (the other sinks go on)")
    assert said[4] is None  # 1.4 GiB: not halved since
    assert said[5].startswith("/shows/show.mp4: only 922 MiB free on its disk, about 13 min")
    assert said[6].startswith("/shows/show.mp4: only 410 MiB free on its disk, about 6 min")
    unknown = DiskWatch("/dev/stdout", free_of=lambda path: None, every=0)
    assert [unknown.check(t) for t in range(3)] == [None] * 3


FILLING_WRITER = textwrap.dedent("""
    import logging, sys
    import numpy as np
    from bridge.frames import Frame
    from bridge.transports.file import FileSink
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    sink = FileSink(path="/mnt/show.mkv", width=128, height=128, fps=30, space_check_seconds=0.0)
    noise = np.random.default_rng(0)
    for _ in range(2000):  # (bounded: 4 MiB of noise pictures take about 100)
        try:
            sink.send(Frame(noise.integers(0, 256, (128, 128, 3), dtype=np.uint8)))
        except OSError:
            break
    sink.close()
""")


def test_a_recording_says_so_at_start_and_while_its_disk_fills(tmp_path):
    """A real 4 MiB tmpfs (in a mount namespace of the child's own) filled by a recording: the
    free space is said at the start, then at each halving, with the time left."""
    reason = mount_namespace_unavailable()
    if reason:
        pytest.skip(reason)
    result = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=4m none /mnt && exec "$0" "$@"',
                             sys.executable, "-c", FILLING_WRITER],
                            capture_output=True, text=True, timeout=120, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    said = [line for line in result.stdout.splitlines() if "free on its disk" in line]
    assert said[0] == "/mnt/show.mkv: only 4.0 MiB free on its disk; the recording stops when it is full (the other sinks go on)"
    free = [float(line.split("only ")[1].split(" MiB")[0]) for line in said]
    # each after the free space fell under the next halving (2 MiB, 1 MiB, ...; said to a tenth)
    assert len(said) >= 3 and free[1] <= 2.0 and all(b <= a / 2 + 0.05 for a, b in zip(free[1:], free[2:])), said
    assert all(", under a minute at the rate it has been filling" in line for line in said[1:]), said
