"""Syphon (macOS only) through a stand-in with syphon-python's API (tests/syphon_standin.py): a
server the sink publishes is found and read by the source in this process, as between two apps.
Every wait is bounded."""

import sys
import threading
import time

import numpy as np
import pytest

import syphon_standin
from bridge.frames import Frame
from bridge.transports import TransportUnavailable, open_sink, open_source
from bridge.transports import base
from bridge.transports import syphon as syphon_module
from bridge.transports.base import SourceLost


@pytest.fixture
def syphon(monkeypatch):
    syphon_standin.reset()
    for name, module in syphon_standin.MODULES.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(syphon_module, "_loaded", None)  # what a test imports and registers ends with it
    monkeypatch.setattr(base, "_main_thread_work", [])
    yield syphon_standin
    assert syphon_standin.clients_open == 0  # every client stopped
    assert syphon_standin.autorelease_violations == []  # Cocoa's autoreleased objects drained
    assert syphon_standin.servers_alive() == []  # every server stopped


def wait_for(predicate, seconds=3.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    return predicate()


def received(sink, source, frame, seconds=3.0):
    """The first frame `source` gets while `frame` is sent over and over (bounded)."""
    def one():
        sink.send(frame)
        return source.read(timeout=0.02)

    return wait_for(one, seconds)


def picture(height, width):
    """BGRA pixels whose every row and column differ: top row, left column and channel order show."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([rows * 7 % 256, cols * 5 % 256, (rows + cols) % 256, np.full_like(rows, 255)], axis=2).astype(np.uint8)


def test_round_trip_keeps_every_pixel_and_the_top_row_on_top(syphon):
    sink = open_sink("syphon:sdbridge", width=64, height=48)
    source = open_source("syphon:sdbridge")
    pixels = picture(48, 64)
    frame = received(sink, source, Frame(pixels, "BGRA"))
    assert frame is not None and frame.pixel_format == "BGRA" and source.server == "Python - sdbridge"
    assert np.array_equal(frame.pixels, pixels)  # exact, row 0 still the top
    source.close()
    source.close()
    sink.close()
    sink.close()
    with pytest.raises(SourceLost, match="closed"):
        source.read(timeout=0.01)


def test_rgb_frames_arrive_in_their_colours(syphon):
    sink, source = open_sink("syphon:colours", width=8, height=4), open_source("syphon:colours")
    red = np.zeros((4, 8, 3), np.uint8)
    red[..., 0] = 255
    red[0, 0] = (0, 255, 0)  # a green top-left corner
    frame = received(sink, source, Frame(red, "RGB"))
    assert frame.pixels[0, 0].tolist() == [0, 255, 0, 255] and frame.pixels[3, 7].tolist() == [0, 0, 255, 255]
    source.close()
    sink.close()


def test_flip_turns_the_picture_upside_down_on_either_side(syphon):
    pixels = picture(6, 5)
    sink, source = open_sink("syphon:flipped?flip=1", width=5, height=6), open_source("syphon:flipped")
    assert np.array_equal(received(sink, source, Frame(pixels, "BGRA")).pixels, pixels[::-1])
    source.close()
    with open_source("syphon:flipped?flip=1") as twice:
        assert np.array_equal(received(sink, twice, Frame(pixels, "BGRA")).pixels, pixels)
    sink.close()


def test_a_size_change_reaches_the_source(syphon):
    sink, source = open_sink("syphon:resize", width=32, height=32), open_source("syphon:resize")
    assert received(sink, source, Frame(picture(32, 32), "BGRA")).pixels.shape == (32, 32, 4)
    bigger = picture(40, 48)

    def the_big_one():
        sink.send(Frame(bigger, "BGRA"))
        frame = source.read(timeout=0.02)
        return frame if frame is not None and frame.pixels.shape == (40, 48, 4) else None

    assert np.array_equal(wait_for(the_big_one).pixels, bigger)
    source.close()
    sink.close()


def test_a_server_that_stops_is_lost_at_once_and_found_again_when_it_returns(syphon):
    sink, source = open_sink("syphon:show", width=8, height=8), open_source("syphon:show")
    assert received(sink, source, Frame(picture(8, 8), "BGRA")) is not None
    sink.close()  # the app stops its server: Syphon tells the client
    started = time.monotonic()
    with pytest.raises(SourceLost, match="Syphon server 'Python - show' went away"):
        wait_for(lambda: source.read(timeout=0.05) and False, 2.0)
    assert time.monotonic() - started < 1.0
    source.close()
    again = open_sink("syphon:show", width=8, height=8)
    with open_source("syphon:show") as reopened:  # what the runtime does next (first open: main thread)
        assert received(again, reopened, Frame(picture(8, 8), "BGRA")) is not None
    again.close()


def test_a_crashed_server_is_lost_when_it_leaves_the_directory(syphon):
    """No retire message from a crashed app: its client stays valid and silent; the directory drops
    it (on the main thread's run loop), and the source then says so instead of freezing."""
    sink, source = open_sink("syphon:crashy", width=8, height=8), open_source("syphon:crashy")
    assert received(sink, source, Frame(picture(8, 8), "BGRA")) is not None
    syphon.vanish(sink._server)
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:  # valid and silent: nothing told the client
        source.read(timeout=0.02)
    assert syphon_module.run_main_run_loop(0.05) is True  # the main thread delivers the directory's change
    with pytest.raises(SourceLost, match="'Python - crashy' left the Syphon directory"):
        wait_for(lambda: source.read(timeout=0.05) and False, 2.0)
    source.close()
    sink.close()


def test_a_missing_server_is_lost_after_the_timeout_naming_what_is_there(syphon):
    sink = open_sink("syphon:other", width=8, height=8)
    started = time.monotonic()
    source = open_source("syphon:absent?timeout=0.3")
    assert time.monotonic() - started < syphon_module.DISCOVERY_SECONDS + 0.5  # bounded discovery
    with pytest.raises(SourceLost, match=r"'absent' not found within 0\.3 s \(visible: Python - other\)"):
        wait_for(lambda: source.read(timeout=0.05) and False, 3.0)
    source.close()
    sink.close()


def test_a_server_announced_after_the_source_opened_is_found(syphon):
    source = open_source("syphon:late?timeout=5")  # on the main thread: waits DISCOVERY_SECONDS, finds nothing
    assert source.read(timeout=0.05) is None
    sink = open_sink("syphon:late", width=8, height=8)
    assert syphon_module.run_main_run_loop(0.05)  # the announcement reaches the directory
    assert received(sink, source, Frame(picture(8, 8), "BGRA")) is not None
    source.close()
    sink.close()


def test_off_the_main_thread_the_directory_is_what_the_main_thread_last_saw(syphon):
    """macOS delivers Syphon's announcements on the main thread only: a source reopened on the
    runtime's capture thread finds a server only once the main thread has run its run loop."""
    sink = open_sink("syphon:capture", width=8, height=8)
    opened = []
    thread = threading.Thread(target=lambda: opened.append(open_source("syphon:capture?timeout=0.3")))
    started = time.monotonic()
    thread.start()
    thread.join(3.0)
    assert time.monotonic() - started < 0.5  # no waiting for announcements that cannot come there
    with pytest.raises(SourceLost, match="not found"):
        wait_for(lambda: opened[0].read(timeout=0.05) and False, 3.0)
    opened[0].close()
    assert syphon_module.run_main_run_loop(0.05)
    with open_source("syphon:capture") as source:
        assert received(sink, source, Frame(picture(8, 8), "BGRA")) is not None
    sink.close()


def test_names_match_name_then_app_and_name_then_app(syphon):
    syphon.app_name = "TouchDesigner"
    td_out = open_sink("syphon:TDSyphonSpoutOut", width=8, height=8)
    syphon.app_name = "Python"
    ours = open_sink("syphon:sdbridge", width=8, height=8)
    cases = {"TDSyphonSpoutOut": "TouchDesigner - TDSyphonSpoutOut", "TouchDesigner - TDSyphonSpoutOut":
             "TouchDesigner - TDSyphonSpoutOut", "Python": "Python - sdbridge", "": "TouchDesigner - TDSyphonSpoutOut"}
    for target, label in cases.items():
        with open_source(f"syphon:{target}") as source:
            wait_for(lambda: source.server, 2.0)
            assert source.server == label, target
    td_out.close()
    ours.close()


def test_two_servers_of_one_name_are_allowed_and_the_first_listed_is_used(syphon, caplog):
    first = open_sink("syphon:twin", width=8, height=8)
    syphon.app_name = "Resolume"
    second = open_sink("syphon:twin", width=8, height=8)  # Syphon allows it: apps tell them apart
    assert sorted(syphon.servers_alive()) == ["twin", "twin"]
    with caplog.at_level("WARNING"), open_source("syphon:twin") as source:
        wait_for(lambda: source.server, 2.0)
        assert source.server == "Python - twin"
    assert "2 servers match 'twin' (Python - twin, Resolume - twin)" in caplog.text
    with open_source("syphon:Resolume - twin") as source:
        assert received(second, source, Frame(picture(8, 8), "BGRA")) is not None
    first.close()
    second.close()


def test_matching_is_exact_and_ordered():
    from types import SimpleNamespace as Server

    servers = [Server(name="", app_name="Simple Server"), Server(name="Out", app_name="VDMX"), Server(name="VDMX", app_name="Other")]
    assert syphon_module.matching_servers(servers, "VDMX") == [servers[2]]  # a name beats an app name
    assert syphon_module.matching_servers(servers, "Simple Server") == [servers[0]]
    assert syphon_module.matching_servers(servers, "VDMX - Out") == [servers[1]]
    assert syphon_module.matching_servers(servers, "out") == []
    assert syphon_module.matching_servers(servers, "") == servers
    assert [syphon_module.server_label(s) for s in servers] == ["Simple Server", "VDMX - Out", "Other - VDMX"]


def test_a_syphon_python_error_is_reported_by_the_sink_and_ends_the_source(syphon, monkeypatch):
    sink, source = open_sink("syphon:flaky", width=8, height=8), open_source("syphon:flaky")
    frame = Frame(picture(8, 8), "BGRA")
    assert received(sink, source, frame) is not None

    def failing(*args, **kwargs):
        raise RuntimeError("simulated Metal failure")

    with monkeypatch.context() as patch:  # the server fails on one frame, then works again
        patch.setattr(syphon.SyphonMetalServer, "publish_frame_texture", failing)
        sink.send(frame)
        wait_for(lambda: sink._failed is not None, 2.0)
    with pytest.raises(RuntimeError, match="could not send a frame: RuntimeError: simulated Metal failure"):
        sink.send(frame)
    sent = sink.frames_sent
    sink.send(frame)
    assert wait_for(lambda: sink.frames_sent > sent, 2.0)
    with monkeypatch.context() as patch:  # the client fails: its thread ends, read says so
        patch.setattr(syphon.SyphonMetalClient, "new_frame_image", property(failing))
        with pytest.raises(SourceLost, match="Syphon client failed: RuntimeError: simulated Metal failure"):
            wait_for(lambda: (sink.send(frame), source.read(timeout=0.02))[1] and False, 2.0)
    source.close()
    sink.close()


def test_close_is_idempotent_from_several_threads(syphon):
    sink, source = open_sink("syphon:closing", width=8, height=8), open_source("syphon:closing")
    threads = [threading.Thread(target=transport.close) for transport in (sink, source) * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(3.0)
    assert not any(thread.is_alive() for thread in threads)
    assert syphon.servers_alive() == [] and syphon.clients_open == 0


def test_a_sink_needs_a_name_and_options_are_checked(syphon):
    with pytest.raises(ValueError, match="a Syphon server name is needed"):
        open_sink("syphon", width=8, height=8)
    with pytest.raises(ValueError, match="unknown option"):
        open_sink("syphon:x?timeout=1", width=8, height=8)
    with pytest.raises(ValueError, match="timeout=.* is not a valid float"):
        open_source("syphon:x?timeout=soon")
    with pytest.raises(ValueError, match="timeout: 0.0 must be a positive number"):
        open_source("syphon:x?timeout=0")


def test_without_syphon_python_each_case_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "syphon", None)
    monkeypatch.setattr(sys, "platform", "linux")
    with pytest.raises(TransportUnavailable, match=r"^Syphon is macOS-only; use NDI"):
        open_sink("syphon:sdbridge", width=16, height=16)
    with pytest.raises(TransportUnavailable, match=r"^Syphon is macOS-only"):
        open_source("syphon:TD")
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(TransportUnavailable, match=r"^Syphon needs syphon-python: pip install 'sdbridge\[syphon\]'$"):
        open_source("syphon:TD")


def test_a_mac_without_metal_is_one_clear_line(syphon):
    syphon.metal_device_available = False
    for open_transport in (lambda: open_sink("syphon:x", width=8, height=8), lambda: open_source("syphon:x")):
        with pytest.raises(TransportUnavailable, match="Syphon needs a Metal GPU"):
            open_transport()


def test_devices_reports_syphon_truthfully(syphon, monkeypatch):
    from bridge.devices import check_syphon

    assert check_syphon() == ("Syphon", True, "syphon-python installed, Metal device Stand-in Metal GPU")
    syphon.metal_device_available = False
    assert check_syphon()[:2] == ("Syphon", False) and "Metal GPU" in check_syphon()[2]
    monkeypatch.setitem(sys.modules, "syphon", None)
    monkeypatch.setattr(sys, "platform", "linux")
    assert check_syphon() == ("Syphon", False, "Syphon is macOS-only; use NDI to share video on other systems")


def test_a_server_started_after_the_bridge_is_found_by_the_runtimes_reconnect(syphon):
    """The show's order reversed: the bridge runs first, TouchDesigner's Syphon output comes (or
    comes back) later. macOS tells only the main thread; the runtime's wait runs its run loop
    there, so the capture thread's reconnect finds the new server and frames flow."""
    from bridge.runtime import Runtime, RuntimeConfig
    from test_runtime import RecordingSink, StandInEngine

    sink = RecordingSink()
    runtime = Runtime(engine=StandInEngine(size=8, cost=0.001),
                      open_source=lambda: open_source("syphon:later?timeout=0.2"), sinks=[sink],
                      config=RuntimeConfig(fps=30, reconnect_initial_seconds=0.05, reconnect_max_seconds=0.1))
    td_out = None
    with runtime:
        runtime.wait(timeout=0.5)  # on the main thread: the source is not found, and retried
        assert runtime.snapshot()["source_lost"] >= 1
        td_out = open_sink("syphon:later", width=8, height=8)
        lit = np.full((8, 8, 4), 200, np.uint8)

        def flowing():
            td_out.send(Frame(lit, "BGRA"))
            runtime.wait(timeout=0.05)  # the main thread's wait: where macOS delivers the announcement
            return any(int(frame.pixels[..., :3].min()) == 200 for _, frame in sink.sent[-5:])

        assert wait_for(flowing, 5.0), runtime.snapshot()
    td_out.close()
