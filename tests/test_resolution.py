"""The processing size changes while frames flow: `update(resolution=(w, h))` restarts the frames
in flight at the new size and readies the backend for it (compiled: compile and capture; tensorrt:
load that size's prebuilt engines, or refuse a size without them), so that one engine can switch
between several prepared sizes during a show. `warm_up(sizes=...)` readies sizes at start."""

import numpy as np
import pytest
import torch

from pipeline import StreamConfig, StreamDiffusion
from pipeline.step_graph import StepGraphs
from pipeline.config import parse_resolution

BASE = dict(width=64, height=64, device="cpu", dtype="float32", t_index_list=(20, 40), guidance_scale=1.5, seed=7)
WIDE = (96, 64)


def _engine(components, **settings):
    engine = StreamDiffusion(components, StreamConfig(**{**BASE, **settings}))
    engine.set_prompt("a harbour at dawn", "blurry")
    return engine


def _frames(count, size=(80, 60), seed=4):
    """uint8 RGB frames of a size neither engine has: every engine resizes them the same way."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(count)]


@pytest.mark.parametrize("cfg_type", ["none", "self", "full"])
def test_a_new_size_restarts_the_stream_as_a_fresh_engine_of_that_size_would(tiny_components, cfg_type):
    live = _engine(tiny_components, cfg_type=cfg_type)
    frames = iter(_frames(12))
    for _ in range(3):
        assert live(next(frames)).shape == (64, 64, 3)
    live.update(resolution=WIDE)
    assert (live.config.width, live.config.height) == WIDE
    fresh = _engine(tiny_components, cfg_type=cfg_type, width=WIDE[0], height=WIDE[1])
    for _ in range(4):  # from the first frame on: the frames in flight restarted at the new size
        frame = next(frames)
        out = live(frame)
        assert out.shape == (64, 96, 3)
        assert np.array_equal(out, fresh(frame))
    live.update(width=64, height=64)  # and back, given as width and height
    back = _engine(tiny_components, cfg_type=cfg_type)
    for frame in frames:
        assert np.array_equal(live(frame), back(frame))


def test_the_last_output_of_the_old_size_never_comes_back(tiny_components):
    """A bad output is replaced by the last good one; after a switch that must be of the new size."""
    engine = _engine(tiny_components, cfg_type="none")
    engine(_frames(1)[0])
    engine.update(resolution="96x64")
    assert engine.state.last_output is None
    decode = engine.backend.decode  # the real decoder runs at the new size; its picture goes bad
    engine.backend.decode = lambda latents: decode(latents).clone().fill_(float("nan"))
    out = engine(_frames(1)[0])
    assert out.shape == (64, 96, 3) and engine.stats.nonfinite_caught == 1


@pytest.mark.parametrize("value, message", [
    ((100, 64), "width: 100 must be a positive multiple of 8"),
    ((64, 72), "height: 72 must be a multiple of 16 for this model"),
    ((64,), "resolution: "),
    ("big", "resolution: 'big' must be a width and a height"),
    ((64.0, 64), "resolution: "),
    (None, "resolution: "),
])
def test_a_bad_size_names_what_is_wrong_and_changes_nothing(tiny_components, value, message):
    engine = _engine(tiny_components)
    engine(_frames(1)[0])
    before, state = engine.config, engine.state
    with pytest.raises(ValueError) as refused:
        engine.update(resolution=value)
    assert message in str(refused.value)
    assert engine.config == before and engine.state is state
    assert engine(_frames(1)[0]).shape == (64, 64, 3)


def test_resolution_is_one_way_to_give_the_size():
    assert parse_resolution("768x432") == (768, 432)
    assert parse_resolution("768, 432") == (768, 432)
    assert parse_resolution([512, 512]) == (512, 512)
    with pytest.raises(ValueError, match="^sizes: "):
        parse_resolution("512", name="sizes")


def test_resolution_and_width_together_are_refused(tiny_components):
    engine = _engine(tiny_components)
    with pytest.raises(ValueError, match="resolution or width and height, not both"):
        engine.update(resolution=WIDE, width=64)


def _graphed(components, **settings):
    config = StreamConfig(**{**BASE, **settings})
    plain, graphed = StreamDiffusion(components, config), StreamDiffusion(components, config)
    graphed._graphs = StepGraphs(graphed, replay="eager")
    graphed.warm_up()
    for engine in (plain, graphed):
        engine.set_prompt("a harbour at dawn", "blurry")
    return plain, graphed


def test_a_size_change_captures_its_step_graph_and_going_back_reuses_the_first(tiny_components):
    plain, graphed = _graphed(tiny_components, cfg_type="self")
    first_noise = graphed._noise.data_ptr()
    captured = graphed._graphs.captures
    frames = iter(_frames(12))
    for size in (WIDE, (64, 64), WIDE):
        for engine in (plain, graphed):
            engine.update(resolution=size)
        for _ in range(3):
            frame = next(frames)
            assert np.array_equal(plain(frame), graphed(frame)), size
    assert graphed._graphs.captures == captured + 2  # 96x64, guidance on and off; 64x64 reused
    graphed.update(resolution=(64, 64))
    assert graphed._noise.data_ptr() == first_noise, "the 64x64 graph would read noise that is gone"
    assert graphed._graphs.replays == 3 * 3  # the first frame after a switch fills the frames in flight, then replays


def test_a_size_whose_graph_runs_out_of_memory_runs_without_it_and_the_others_keep_theirs(
        tiny_components, monkeypatch, caplog):
    """/sd/resolution to a size too large for the card beside the rest: its capture runs out of
    memory. Frames at that size run without a graph (the same pictures), and going back replays
    the first size's graph again: one failure no longer turned the graphs off for the whole show."""
    from types import SimpleNamespace

    from bridge.engine import backend_label

    plain, graphed = _graphed(tiny_components, cfg_type="self")
    graphs = graphed._graphs
    new_step = graphs._new_step

    def short_of_memory(config, source, state):
        if config.width == WIDE[0]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return new_step(config, source, state)

    monkeypatch.setattr(graphs, "_new_step", short_of_memory)
    frames = iter(_frames(15))
    replays = []
    for size in (WIDE, (64, 64), WIDE):
        for engine in (plain, graphed):
            engine.update(resolution=size)
        before = graphs.replays
        for _ in range(3):
            frame = next(frames)
            assert np.array_equal(plain(frame), graphed(frame)), size
        replays.append(graphs.replays - before)
    assert replays == [0, 3, 0]
    assert graphs.failed is None and graphs.failure_for(graphed.config).startswith("OutOfMemoryError: CUDA out of memory")
    assert graphs.failure_for(graphed.config.replace(width=64)) is None
    assert len(graphs.failed_keys) == 2  # 96x64 with guidance on and off, each tried once, not at every switch
    assert "could not capture the step graph for 96x64, 2 step(s): out of memory" in caplog.text
    label = backend_label(SimpleNamespace(backend=SimpleNamespace(name="compiled", cuda_graphs="step"),
                                          _graphs=graphs, config=graphed.config))
    assert label == "compiled (no step graph for these settings: out of memory)"
    graphed.update(resolution=(64, 64))
    assert backend_label(SimpleNamespace(backend=SimpleNamespace(name="compiled", cuda_graphs="step"), _graphs=graphs,
                                         config=graphed.config)) == "compiled+step graph"


def test_sizes_readied_at_start_switch_without_a_capture(tiny_components):
    plain, graphed = _graphed(tiny_components, cfg_type="self")
    graphed.warm_up(step_counts=(1,), sizes=[WIDE, "64x64"])
    assert graphed._graphs.captures == 2 * 2 * 2  # (64x64, 96x64) x (1, 2 steps) x guidance on and off
    for engine in (plain, graphed):
        engine.update(resolution=WIDE, t_index_list=(30,))
    assert graphed._graphs.captures == 8, "a size readied at start was captured again"
    for frame in _frames(4):
        assert np.array_equal(plain(frame), graphed(frame))
    assert graphed._graphs.replays == 4  # the first at the new size too (filled from the frame itself)
    with pytest.raises(ValueError, match="^sizes: "):
        graphed.warm_up(sizes=["wide"])


def test_sizes_setting_is_read_and_checked(tmp_path):
    from bridge.settings import RunSettings, check_presets_fit, merge, read_config_file

    assert RunSettings(sink=("null",), sizes="768x432, 1024x576").sizes == ("768x432", "1024x576")
    config = tmp_path / "show.toml"
    config.write_text('sink = "null"\nsizes = ["768x432"]\n[presets.2]\nresolution = "1024x576"\n')
    settings = merge(read_config_file(str(config)), {})
    assert settings.sizes == ("768x432",) and settings.presets[2] == {"resolution": (1024, 576)}
    for bad, message in (("768", "must be WIDTHxHEIGHT"), ("768x433", "multiples of 8"), ("0x64", "multiples of 8"),
                         ("8192x64", "up to 4096")):
        with pytest.raises(ValueError, match=f"^sizes: .*{message}"):
            RunSettings(sink=("null",), sizes=(bad,))
    with pytest.raises(ValueError, match="^presets.2.width: 100 must be a positive multiple of 8"):
        check_presets_fit({2: {"resolution": (100, 64)}}, StreamConfig(device="cpu"))


def test_run_readies_its_sizes_at_start_or_says_in_one_line_which_cannot_be(tmp_path):
    import subprocess
    import sys

    from test_cli import REPO, TINY, child_env

    def run(*extra):
        command = [sys.executable, "-m", "bridge.cli", "run", "--source", "testpattern", "--sink", "null", *TINY,
                   "--frames", "3", "--no-osc", *extra]
        return subprocess.run(command, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=120)

    done = run("--sizes", "128x64,64x128")
    assert done.returncode == 0, done.stderr
    assert "readying 128x64, 64x128 as well (for /sd/resolution)" in done.stderr
    refused = run("--sizes", "72x64")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "sdbridge run: error: width: 72 must be a multiple of 16 for this model (VAE x8, UNet x2)")
