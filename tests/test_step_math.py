"""The fused step math (compiled backend, `fuse_math`): the same frames as the plain arithmetic,
every function compiled before frames flow, nothing compiled while a show changes settings,
with and without a step graph. Most tests count compilations with test_compiled_backend's
CountingBackend (dynamo traces for real, the graph runs as traced); one compiles with inductor."""

import functools

import numpy as np
import pytest
import torch

from pipeline import StreamConfig, StreamDiffusion, step_math
from pipeline.faults import keep_good, output_faults
from pipeline.step_graph import StepGraphs
from test_compiled_backend import CountingBackend

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: compiling is mostly serial
SIZE = 32
BASE = dict(width=SIZE, height=SIZE, device="cpu", dtype="float32", t_index_list=(20, 40), guidance_scale=1.5,
            delta=0.8, seed=3)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _engine(components, counter, *, fuse=True, **settings):
    config = StreamConfig(**{**BASE, **settings})
    engine = StreamDiffusion(components, config, backend="compiled",
                             backend_options={"compile_backend": counter, "fuse_math": fuse})
    engine.set_prompt("a harbour", "rain")
    return engine


def _frames(count, seed=5):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(count)]


SHOW = [  # run-time changes; the cfg type changes keep the UNet batches (none and self: no negative rows)
    lambda e: e.set_prompt("a foggy harbour", "people"),
    lambda e: e.update(guidance_scale=1.0),
    lambda e: e.update(guidance_scale=2.5),
    lambda e: e.update(delta=0.3),
    lambda e: e.update(seed=11),
    lambda e: e.update(strength=0.9),
    lambda e: e.update(cfg_type="none"),
    lambda e: e.update(cfg_type="self"),
    lambda e: e.update(t_index_list=(35,)),
    lambda e: e.update(t_index_list=(10, 30)),
    lambda e: e.update(resolution=(48, 32)),
    lambda e: e.update(resolution=(SIZE, SIZE)),
]


def _run_show(engine, frames):
    outputs = [engine(frames[0]), engine(frames[1])]
    for k, change in enumerate(SHOW):
        change(engine)
        size = (engine.config.height, engine.config.width)
        for frame in frames[k % 3:k % 3 + 2]:
            outputs.append(engine(frame if frame.shape[:2] == size else np.resize(frame, (*size, 3))))
    return outputs


def test_fused_math_is_compiled_before_frames_and_never_during_a_show(tiny_components):
    """Every readied step count and size, guidance on and off, a cfg type change with the same
    UNet batches: all compiled in warm_up (a dry run of the step), none at a frame; and the frames
    equal the plain arithmetic's through the same compiled modules."""
    plain_counter, counter = CountingBackend(), CountingBackend()
    plain = _engine(tiny_components, plain_counter, fuse=False)
    fused = _engine(tiny_components, counter)
    assert fused.backend.step_math.fused and not plain.backend.step_math.fused
    assert counter.count > plain_counter.count  # the math's graphs, compiled at construction
    for engine in (plain, fused):
        engine.warm_up(step_counts=[1], sizes=[(48, 32)])
        engine.update(cfg_type="none")
        engine.update(cfg_type="self")
    warm = counter.count
    frames = _frames(5)
    expected, got = _run_show(plain, frames), _run_show(fused, frames)
    assert counter.count == warm, f"compiled during the show: {counter.graphs[warm:]}"
    for k, (a, b) in enumerate(zip(expected, got)):
        assert np.array_equal(a, b), f"frame {k}"
    assert fused.stats == plain.stats


def test_fused_math_in_a_step_graph_equals_the_stream_without_one(tiny_components):
    """The step graph's body (replay="eager": the same buffers a CUDA graph reads) with the fused
    pixel conversions and arithmetic: the frames of the fused stream without a graph, bit for bit."""
    counter = CountingBackend()
    plain = _engine(tiny_components, CountingBackend(), cfg_type="initialize")
    graphed = _engine(tiny_components, counter, cfg_type="initialize")
    graphed._graphs = StepGraphs(graphed, replay="eager")
    graphed.warm_up()
    warm = counter.count
    for k, frame in enumerate(_frames(6)):
        if k == 3:
            for engine in (plain, graphed):
                engine.update(guidance_scale=0.9)
        assert np.array_equal(plain(frame), graphed(frame)), f"frame {k}"
    assert graphed._graphs.replays == 6
    assert counter.count == warm, f"compiled during the show: {counter.graphs[warm:]}"


def test_fused_txt2img_and_the_sequential_path_equal_the_plain_ones(tiny_components):
    """The dry run puts the txt2img generator back, and the sequential (non-batched) path reads
    the same fused functions."""
    for settings in ({"mode": "txt2img"}, {"use_denoising_batch": False, "t_index_list": (10, 25, 40)}):
        plain = _engine(tiny_components, CountingBackend(), fuse=False, **settings)
        counter = CountingBackend()
        fused = _engine(tiny_components, counter, **settings)
        warm = counter.count
        for frame in _frames(3):
            if "mode" in settings:
                assert np.array_equal(plain.txt2img(), fused.txt2img()), settings
            else:
                assert np.array_equal(plain(frame), fused(frame)), settings
        assert counter.count == warm, settings


def test_keep_good_chooses_on_the_device_what_the_branching_check_chooses():
    good = torch.rand(1, 3, 8, 8) * 2 - 1
    previous = torch.zeros(1, 3, 8, 8)
    black = torch.full((1, 3, 8, 8), -1.0)
    broken = good.clone()
    broken[0, 1, 2, 3] = float("nan")
    for output, source, bad in [(good, good, False), (broken, good, True), (black, good, True), (black, black, False),
                                (good.clone().fill_(float("inf")), None, True), (black, None, True)]:
        kept, faults = keep_good(output, previous, source)
        assert torch.equal(faults, output_faults(output, source)), (bad, source is None)
        assert torch.equal(kept, previous if bad else output), (bad, source is None)


def test_every_fused_function_compiles_in_inductor_and_computes_the_plain_result(tmp_path, monkeypatch):
    """The real compiler on each function alone (fullgraph: no graph break), against PLAIN."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    fused = step_math.fused(functools.partial(torch.compile, dynamic=False, fullgraph=True))
    g = torch.Generator().manual_seed(0)
    x, noise, eps, stock = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(4))
    alpha, beta = torch.rand(2, generator=g) * 0.5 + 0.4, torch.rand(2, generator=g) * 0.5 + 0.3
    c_skip, c_out = torch.rand(2, generator=g), torch.rand(2, generator=g)
    raw = torch.randn(3, 4, 4, 4, generator=g)
    x_in = torch.cat([x[:1], x])
    scalars = torch.tensor(0.7), torch.tensor(1.8)
    pixels = torch.randint(0, 256, (1, 8, 8, 3), dtype=torch.uint8, generator=g)
    images = torch.rand(1, 3, 8, 8, generator=g) * 2.2 - 1.1
    calls = {
        "add_noise": ((x, noise, alpha, beta), {}),
        "guided_x0": ((raw, x_in, torch.cat([alpha[:1], alpha]), torch.cat([beta[:1], beta]), x, alpha, beta, c_skip,
                       c_out, stock, *scalars),
                      dict(uncond=1, guided=True, cfg_type="initialize", prediction_type="v_prediction")),
        "next_stock_noise": ((eps, stock, noise, alpha, beta, c_skip, c_out, alpha.flip(0), beta.flip(0)), {}),
        "keep_good": ((images, torch.zeros_like(images), images), {}),
        "pixels_to_images": ((pixels, torch.float32), {}),
        "pixels_out": ((images,), {}),
    }
    for name, (args, kwargs) in calls.items():
        expected, got = getattr(step_math.PLAIN, name)(*args, **kwargs), getattr(fused, name)(*args, **kwargs)
        expected, got = (expected, got) if isinstance(expected, tuple) else ((expected,), (got,))
        for a, b in zip(expected, got):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            tolerance = 1 if a.dtype == torch.uint8 else 1e-5
            assert (a.double() - b.double()).abs().max().item() <= tolerance, name
        if name == "pixels_out":
            assert got[0].is_contiguous()


def test_a_function_the_compiler_fails_on_runs_as_written_and_says_so_once(caplog):
    def broken_compiler(graph_module, example_inputs):
        raise RuntimeError("no kernel for you")

    fused = step_math.fused(functools.partial(torch.compile, backend=broken_compiler, fullgraph=True))
    x, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    alpha, beta = torch.tensor([0.9, 0.5]), torch.tensor([0.4, 0.8])
    with caplog.at_level("WARNING", logger="pipeline.step_math"):
        for _ in range(3):
            assert torch.equal(fused.add_noise(x, noise, alpha, beta), step_math.PLAIN.add_noise(x, noise, alpha, beta))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "add_noise could not be compiled" in warnings[0] and "no kernel for you" in warnings[0]
    assert "no kernel for you" in fused.add_noise.failed
    assert fused.pixels_out.failed is None  # the others are untouched until they fail themselves


def test_sdbridge_run_fuse_math_reaches_the_compiled_backend_only_and_the_status_says_so(tiny_components):
    from bridge.engine import _options, backend_label
    from bridge.settings import RunSettings

    settings = RunSettings(sink=("null",), backend="compiled", backend_fallback="eager", fuse_math=True)
    assert _options(settings, "compiled") == {"fuse_math": True}
    assert not _options(settings, "eager")  # eager, as a fallback, has no fused math
    with pytest.raises(ValueError, match="fuse_math: needs backend 'compiled'"):
        RunSettings(sink=("null",), fuse_math=True)
    engine = _engine(tiny_components, CountingBackend())
    assert backend_label(engine) == "compiled+fused math"
    assert backend_label(_engine(tiny_components, CountingBackend(), fuse=False)) == "compiled"
