"""A change that would compile (a step count or size not readied at start) is compiled on the
readier thread while the frames go on with the current settings, then applied between two frames
without compiling; a newer value wins over one being readied; a failed compilation is reported
and changes nothing. The compiled backend runs with a torch.compile backend that records the
thread of each compilation and takes its time, as a real compiler does."""

import functools
import sys
import threading
import time

import numpy as np
import pytest
import torch

from bridge.params import ParameterStore
from bridge.runtime import Runtime, RuntimeConfig
from bridge.transports.testpattern import TestPatternSource
from pipeline import StreamConfig, StreamDiffusion
from pipeline.step_graph import StepGraphs
from test_runtime import RecordingSink

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: compiling is mostly serial
SIZE = 32
TWO, THREE = (20, 40), (5, 25, 45)


class SlowCompiler:
    """A torch.compile backend: records (thread name, first input's batch), sleeps, runs the graph as traced."""

    def __init__(self, seconds=0.3, fail_batch=None):
        self.seconds, self.fail_batch = seconds, fail_batch
        self.graphs = []

    def __call__(self, graph_module, example_inputs):
        batch = example_inputs[0].shape[0] if example_inputs else None
        self.graphs.append((threading.current_thread().name, batch))
        time.sleep(self.seconds)
        if batch == self.fail_batch:
            raise RuntimeError(f"no kernel for batch {batch}")
        return graph_module.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(components, compiler, **settings):
    config = StreamConfig(**{**dict(width=SIZE, height=SIZE, device="cpu", dtype="float32", t_index_list=TWO,
                                    cfg_type="self", guidance_scale=1.4, seed=3), **settings})
    engine = StreamDiffusion(components, config, backend="compiled", backend_options={"compile_backend": compiler})
    engine.set_prompt("a harbour", "rain")
    return engine


def _frames(count):
    rng = np.random.default_rng(4)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(count)]


def test_ready_compiles_on_its_thread_while_frames_run_and_the_update_then_compiles_nothing(tiny_components):
    compiler = SlowCompiler(seconds=0.4)
    engine = _compiled(tiny_components, compiler)
    reference = StreamDiffusion(tiny_components, engine.config.replace(kv_cache=False))  # eager, plain prompt path
    reference.set_prompt("a harbour", "rain")
    assert engine.ready_beside_frames and not reference.ready_beside_frames
    assert engine.update_work(t_index_list=THREE) == "compile"
    assert engine.update_work(guidance_scale=2.0, delta=0.5, seed=9) is None  # buffers: nothing to compile
    at_start = len(compiler.graphs)
    readier = threading.Thread(target=engine.ready, kwargs={"t_index_list": THREE}, name="readier")
    frames, served = _frames(4), 0
    readier.start()
    while readier.is_alive():  # the frames go on, the same as eager's, with the current settings
        frame = frames[served % 4]
        assert np.array_equal(engine(frame), reference(frame)), f"frame {served} during the compilation"
        served += 1
    readier.join()
    assert served >= 3, "the frames waited for the compilation"
    assert engine.config.t_index_list == TWO  # ready changes no setting
    assert {name for name, _ in compiler.graphs[at_start:]} == {"readier"}
    assert engine.update_work(t_index_list=THREE) is None
    compiled = len(compiler.graphs)
    for stream in (engine, reference):
        stream.update(t_index_list=THREE)
    for frame in frames:
        assert np.array_equal(engine(frame), reference(frame)), "after the switch"
    assert len(compiler.graphs) == compiled, f"compiled at the switch: {compiler.graphs[compiled:]}"
    with pytest.raises(ValueError, match="cannot compile beside running frames"):
        reference.ready(t_index_list=THREE)
    with pytest.raises(ValueError, match="cannot change at run time"):
        engine.update_work(width=64, mode="txt2img")


@pytest.mark.parametrize("graphs", [False, True])
def test_the_fused_math_of_a_new_step_count_compiles_beside_the_frames_too(tiny_components, graphs):
    """With `fuse_math` the step's arithmetic compiles for each shape as well: `ready` compiles it
    on its thread with a dry run on a copy of the stream (state, noise and counters of its own),
    so the switch compiles nothing, with or without a step graph; the frames are the plain
    math's throughout, the change landing at the same frame."""
    compiler = SlowCompiler(seconds=0.05)
    config = dict(width=SIZE, height=SIZE, device="cpu", dtype="float32", t_index_list=TWO, cfg_type="self",
                  guidance_scale=1.4, seed=3)
    engine = StreamDiffusion(tiny_components, StreamConfig(**config), backend="compiled",
                             backend_options={"compile_backend": compiler, "fuse_math": True})
    plain = StreamDiffusion(tiny_components, StreamConfig(**config, kv_cache=False))  # eager; leaves the K/V cache
    for stream in (engine, plain):
        stream.set_prompt("a harbour", "rain")
    if graphs:
        engine._graphs = StepGraphs(engine, replay="eager")  # what cuda_graphs="step" sets up on CUDA
        engine.warm_up()
    assert engine.update_work(t_index_list=THREE) == "compile"
    caught = lambda: (engine.stats.nonfinite_caught, engine.stats.black_caught)  # noqa: E731
    before = caught()
    at_start, frames, outputs = len(compiler.graphs), _frames(60), []
    readier = threading.Thread(target=engine.ready, kwargs={"t_index_list": THREE}, name="readier")
    readier.start()
    while readier.is_alive() and len(outputs) < len(frames) - 4:
        outputs.append(engine(frames[len(outputs)]))
    readier.join()
    switched = len(outputs)
    assert {name for name, _ in compiler.graphs[at_start:]} == {"readier"}, str(compiler.graphs[at_start:])
    assert engine.update_work(t_index_list=THREE) == ("capture" if graphs else None)
    assert engine.config.t_index_list == TWO and caught() == before  # the dry runs' black frames counted nowhere
    compiled = len(compiler.graphs)
    engine.update(t_index_list=THREE)
    outputs += [engine(frame) for frame in frames[switched:switched + 4]]
    assert len(compiler.graphs) == compiled, f"compiled at the switch: {compiler.graphs[compiled:]}"
    expected = [plain(frame) for frame in frames[:switched]]
    plain.update(t_index_list=THREE)
    expected += [plain(frame) for frame in frames[switched:switched + 4]]
    for k, (got, want) in enumerate(zip(outputs, expected, strict=True)):
        assert np.array_equal(got, want), f"frame {k} (the switch before frame {switched})"


def test_a_fused_function_that_misses_while_another_thread_compiles_runs_as_written_at_once():
    from pipeline import step_math
    from test_compiled_backend import CountingBackend

    counter, elsewhere = CountingBackend(), {"compiling": False}
    math = step_math.fused(functools.partial(torch.compile, backend=counter, dynamic=False, fullgraph=True),
                           lambda: elsewhere["compiling"])
    math.pixels_out(torch.rand(2, 3, 8, 8) * 2 - 1)
    compiled = counter.count
    elsewhere["compiling"] = True
    other = torch.rand(1, 3, 16, 16) * 2 - 1  # a shape never compiled: a miss
    assert torch.equal(math.pixels_out(other), step_math.pixels_out(other))
    assert counter.count == compiled  # not compiled here (it would have waited on dynamo's lock)
    elsewhere["compiling"] = False
    math.pixels_out(other)
    assert counter.count == compiled + 1  # and compiled once nobody else compiles


def test_a_step_graph_still_to_capture_is_capture_work(tiny_components):
    engine = _compiled(tiny_components, SlowCompiler(seconds=0))
    engine._graphs = StepGraphs(engine, replay="eager")  # what cuda_graphs="step" sets up on CUDA
    engine.warm_up()
    engine.ready(t_index_list=THREE)
    assert engine.update_work(t_index_list=THREE) == "capture"  # compiled, its graph not yet captured
    assert engine.update_work(guidance_scale=0.9) is None  # both sides of guidance were captured at start


def _wait_until(condition, seconds):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def _runtime(engine):
    runtime = Runtime(engine=engine, open_source=lambda: TestPatternSource(width=SIZE, height=SIZE, fps=30),
                      sinks=[RecordingSink()], config=RuntimeConfig(fps=30))
    runtime.params.attach_readier(engine.ready)
    return runtime


def test_a_new_step_count_compiles_beside_the_running_show_then_switches(tiny_components):
    compiler = SlowCompiler(seconds=0.5)
    engine = _compiled(tiny_components, compiler)
    runtime = _runtime(engine)
    at_start = len(compiler.graphs)
    with runtime:
        assert _wait_until(lambda: runtime.snapshot()["frames_processed"] >= 3, 20)
        runtime.params.set("t_index_list", list(THREE))
        assert _wait_until(lambda: runtime.params.readier.busy, 5)
        processed = runtime.snapshot()["frames_processed"]
        assert _wait_until(lambda: engine.config.t_index_list == THREE, 30), runtime.params.rejected
        during = runtime.snapshot()["frames_processed"] - processed
        switched = runtime.snapshot()["frames_processed"]
        assert _wait_until(lambda: runtime.snapshot()["frames_processed"] >= switched + 3, 10)
    assert during >= 10, f"only {during} frames while the new step count compiled (1 s or more)"
    assert {name for name, _ in compiler.graphs[at_start:]} == {"sdbridge readier"}, compiler.graphs[at_start:]
    assert runtime.params.applied["t_index_list"] == THREE


def test_a_newer_value_wins_over_the_one_being_readied(tiny_components):
    compiler = SlowCompiler(seconds=0.5)
    engine = _compiled(tiny_components, compiler)
    runtime = _runtime(engine)
    seen = set()
    with runtime:
        assert _wait_until(lambda: runtime.snapshot()["frames_processed"] >= 3, 20)
        runtime.params.set("t_index_list", list(THREE))
        assert _wait_until(lambda: runtime.params.readier.busy, 5)
        runtime.params.set("strength", 0.6)  # the same thing (the step list) set again, readied already: applies now
        while runtime.params.readier.busy:
            seen.add(engine.config.t_index_list)
            time.sleep(0.01)
        time.sleep(0.3)  # what the readier would have queued has had time to apply
        seen.add(engine.config.t_index_list)
        final = engine.config.t_index_list
    assert len(final) == 2 and THREE not in seen, (final, seen)
    assert "t_index_list" not in runtime.params.rejected


def test_a_failed_compilation_is_reported_and_the_show_goes_on_unchanged(tiny_components):
    compiler = SlowCompiler(seconds=0.2, fail_batch=3)
    engine = _compiled(tiny_components, compiler)
    runtime = _runtime(engine)
    with runtime:
        assert _wait_until(lambda: runtime.snapshot()["frames_processed"] >= 3, 20)
        runtime.params.set("t_index_list", list(THREE))
        assert _wait_until(lambda: "t_index_list" in runtime.params.rejected, 20)
        processed = runtime.snapshot()["frames_processed"]
        assert _wait_until(lambda: runtime.snapshot()["frames_processed"] >= processed + 5, 10)
    value, reason = runtime.params.rejected["t_index_list"]
    assert tuple(value) == THREE and "could not compile the UNet for batch 3" in reason and "no kernel" in reason
    assert compiler.graphs[-1] == ("sdbridge readier", 3)  # it failed beside the frames, not in the frame loop
    assert engine.config.t_index_list == TWO


def test_a_second_step_count_asked_for_while_the_first_compiles_is_the_one_that_lands(tiny_components):
    compiler = SlowCompiler(seconds=0.4)
    engine = _compiled(tiny_components, compiler)
    runtime = _runtime(engine)
    four, seen = (5, 15, 30, 45), set()
    with runtime:
        assert _wait_until(lambda: runtime.snapshot()["frames_processed"] >= 3, 20)
        runtime.params.set("t_index_list", list(THREE))
        assert _wait_until(lambda: runtime.params.readier.busy, 5)
        time.sleep(0.1)
        runtime.params.set("t_index_list", list(four))
        deadline = time.monotonic() + 30
        while engine.config.t_index_list != four and time.monotonic() < deadline:
            seen.add(engine.config.t_index_list)
            time.sleep(0.01)
        assert _wait_until(lambda: not runtime.params.readier.busy, 10)
        time.sleep(0.3)
        seen.add(engine.config.t_index_list)
    assert engine.config.t_index_list == four and THREE not in seen, seen
    assert {name for name, _ in compiler.graphs if name != "MainThread"} == {"sdbridge readier"}


def test_a_readied_value_never_replaces_a_newer_one():
    store = ParameterStore()
    store.set("t_index_list", [10, 30])
    store.take()
    since = store.taken_generations(["t_index_list", "seed"])
    store.set("strength", 0.9)  # the same setting, set again: pending
    store._queue({"t_index_list": THREE, "seed": 5}, since=since)
    assert store.take() == {"seed": 5, "strength": 0.9}  # the readied list never landed
    store._queue({"t_index_list": THREE}, since=since)  # set again (and taken) since: dropped too
    assert store.take() == {}
    store.set("t_index_list", [5, 25])
    store.take()
    store._queue({"t_index_list": THREE}, since=store.taken_generations(["strength"]))  # nothing newer: it lands
    assert store.take() == {"t_index_list": THREE}


@pytest.mark.parametrize("fails", [False, True])
def test_the_readier_hands_the_gil_over_sooner_while_it_compiles_and_puts_the_interval_back(fails):
    """Each torch call on the frame thread gives up the GIL and takes it back from the compiling
    thread, which lets go only after the switch interval: the readier shortens it while it works."""
    from bridge.params import READY_SWITCH_INTERVAL

    seen, before = [], sys.getswitchinterval()
    assert READY_SWITCH_INTERVAL < before

    def ready(**values):
        seen.append(sys.getswitchinterval())
        if fails:
            raise ValueError("no kernel for this size")

    store = ParameterStore()
    store.attach_readier(ready)
    try:
        store.readier.submit({"t_index_list": THREE}, store.taken_generations(["t_index_list"]))
        assert _wait_until(lambda: seen and not store.readier.busy and ("t_index_list" in store.rejected) == fails, 5)
    finally:
        store.close()
    assert seen == [pytest.approx(READY_SWITCH_INTERVAL)]  # Python keeps it in microseconds
    assert sys.getswitchinterval() == before


def test_the_ready_check_measures_frames_and_gaps_while_readying(tiny_components):
    """bench/ready_check.py's measurement (bridge.runtime_bench.measure_ready_beside), with the slow compiler."""
    from bridge.runtime_bench import measure_ready_beside

    engine = _compiled(tiny_components, SlowCompiler(seconds=0.4))
    result = measure_ready_beside(engine, "t_index_list", list(THREE), output_fps=30, warmup=5, input_size=(SIZE, SIZE),
                                  after_seconds=0.5, timeout=60)
    assert result["applied"] and result["rejected"] is None and engine.config.t_index_list == THREE
    assert result["ready_seconds"] >= 0.4  # the UNet for batch 3 (RCFG self: no negative rows), 0.4 s
    assert result["frames_while_readying"] >= 5, result
    assert result["gap_ms_max_while_readying"] is not None and result["gap_ms_median_before"] is not None
    assert result["graphs_compiled"] >= 1


def test_a_frame_that_misses_the_compiled_graphs_while_another_thread_compiles_runs_eagerly_at_once(tiny_components):
    """dynamo compiles under one process-wide lock: a frame whose call misses the compiled graphs
    (with inductor that happened to the VAE encoder mid-compilation, costing 30 s) would wait
    for the whole compilation. While a warm-up runs beside the frames, the frame thread's calls
    use the cached graphs only and run a miss eagerly."""
    compiler = SlowCompiler(seconds=1.5)
    engine = _compiled(tiny_components, compiler)
    readier = threading.Thread(target=engine.ready, kwargs={"t_index_list": THREE}, name="readier")
    readier.start()
    assert _wait_until(lambda: any(name == "readier" for name, _ in compiler.graphs), 20)
    wider = torch.rand(1, 3, SIZE, SIZE + 16) * 2 - 1  # a size the encoder was never compiled for: a miss
    started = time.monotonic()
    latents = engine.backend.encode(wider)
    took = time.monotonic() - started
    readier.join()
    assert latents.shape == (1, 4, SIZE // 8, (SIZE + 16) // 8)
    assert took < 1.0, f"the frame thread waited {took:.1f} s for the other thread's compilation"
    assert not [entry for entry in compiler.graphs[4:] if entry[0] == "MainThread"], compiler.graphs  # 4: at start
