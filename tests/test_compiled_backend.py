"""The compiled backend: nothing recompiles while settings change, and it computes what eager computes.

Most tests count compilations with a torch.compile backend that records each graph and runs it
as traced (fast, no inductor); one compiles with inductor for real, and `sdbridge bench` and
`sdbridge run` start with `--backend compiled` (reusing that test's inductor cache).
"""

import json
import subprocess
import sys
import threading
import time

import pytest
import torch

from pipeline import StreamConfig, StreamDiffusion
from pipeline.backends import BACKENDS, CompiledBackend, EagerBackend, make_backend
from pipeline.guidance import unet_batches
from test_cli import REPO, child_env

SIZE = 32  # the tiny model's smallest comfortable size (latents 4x4)


class CountingBackend:
    """A torch.compile backend that records every graph it is given and runs it as traced."""

    def __init__(self) -> None:
        self.graphs = []  # the batch size of each compiled graph's first input

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(tuple(example_inputs[0].shape) if example_inputs else ())
        return graph_module.forward

    @property
    def count(self) -> int:
        return len(self.graphs)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: compiling is mostly serial


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """dynamo keeps compiled code on the functions' code objects, shared by every backend: start clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    """One inductor cache for this file: the inductor test fills it, bench and run reuse it."""
    return tmp_path_factory.mktemp("inductor")


def _frames(count, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, SIZE, SIZE, generator=generator) for _ in range(count)]


def _config(**changes):
    values = dict(width=SIZE, height=SIZE, device="cpu", dtype="float32", t_index_list=(20, 40), guidance_scale=1.5,
                  delta=0.8, seed=3)
    values.update(changes)
    return StreamConfig(**values)


def _compiled(components, config, counter, prompt=("a harbour", "rain")):
    engine = StreamDiffusion(components, config, backend="compiled", backend_options={"compile_backend": counter})
    engine.set_prompt(*prompt)
    return engine


def _eager(components, config, prompt=("a harbour", "rain")):
    """An eager reference that leaves the compiled backend's cache processors in place (no K/V cache of its own)."""
    engine = StreamDiffusion(components, config.replace(kv_cache=False))
    engine.set_prompt(*prompt)
    return engine


def _show(engine, frames):
    """A show's worth of run-time changes that keep the step count; the output of every frame."""
    outputs = [engine(frames[0]), engine(frames[1])]
    changes = [
        lambda: engine.set_prompt("a foggy harbour at dawn"),
        lambda: engine.set_prompt("a foggy harbour at dawn", negative_prompt="people"),
        lambda: engine.update(guidance_scale=1.0),  # guidance off: fewer UNet rows for full/initialize
        lambda: engine.update(guidance_scale=2.5),  # and on again
        lambda: engine.update(delta=0.3),
        lambda: engine.update(seed=11),
        lambda: engine.update(strength=0.9),  # t_index_list changes, its length does not
        lambda: engine.set_prompt_blend([("a cat", 0.7), ("a dog", 0.3)], negative_prompt="blurry"),
        lambda: engine.update(t_index_list=(10, 30)),
        lambda: engine.update(guidance_scale=0.8),  # off again, below 1
    ]
    for k, change in enumerate(changes):
        change()
        outputs.append(engine(frames[k % len(frames)]))
        outputs.append(engine(frames[(k + 1) % len(frames)]))
    return outputs


@pytest.mark.parametrize("cfg_type,batched", [("self", True), ("full", True), ("initialize", True), ("initialize", False)])
def test_no_compilation_while_settings_change(tiny_components, cfg_type, batched):
    counter = CountingBackend()
    config = _config(cfg_type=cfg_type, use_denoising_batch=batched)
    engine = _compiled(tiny_components, config, counter)
    batches = unet_batches(config)
    assert counter.count == len(batches) + 2  # one graph per UNet batch, the VAE encoder and decoder
    if cfg_type in ("full", "initialize"):
        assert len(batches) == 2  # guidance on and off are different batches, both compiled up front
    warm = counter.count
    outputs = _show(engine, _frames(4))
    assert counter.count == warm, f"compiled during the show: {counter.graphs[warm:]}"
    assert all(out.shape == (3, SIZE, SIZE) and torch.isfinite(out).all() for out in outputs)

    engine.update(t_index_list=(5, 25, 45))  # a new step count may compile (its batches, at once)
    if batched:  # the sequential path's batches do not depend on the step count
        assert counter.count > warm
    after_steps = counter.count
    outputs = [engine(frame) for frame in _frames(4, seed=2)]
    engine.update(guidance_scale=1.0)
    outputs.append(engine(_frames(1)[0]))
    assert counter.count == after_steps
    assert all(out.shape == (3, SIZE, SIZE) and torch.isfinite(out).all() for out in outputs)


def test_step_counts_compiled_at_start_need_no_compilation_mid_show(tiny_components):
    """`warm_up(step_counts=...)` (`--compile-steps`): an operator's t_index_list of another
    length then compiles nothing during the show."""
    counter = CountingBackend()
    config = _config(cfg_type="full")
    engine = _compiled(tiny_components, config, counter)
    engine.warm_up(step_counts=[1, 3])
    expected = set(unet_batches(config))
    for steps in ((10,), (5, 25, 45)):
        expected |= set(unet_batches(config.replace(t_index_list=steps)))
    assert counter.count == len(expected) + 2  # one graph per UNet batch of 1, 2 and 3 steps, the VAE encoder and decoder
    warm = counter.count
    outputs = []
    for steps in ((10,), (5, 25, 45), (20, 40), (12,)):
        engine.update(t_index_list=steps)
        outputs += [engine(frame) for frame in _frames(2, seed=len(steps))]
        engine.update(guidance_scale=1.0)
        outputs.append(engine(_frames(1)[0]))
        engine.update(guidance_scale=1.6)
    assert counter.count == warm, f"compiled during the show: {counter.graphs[warm:]}"
    assert all(out.shape == (3, SIZE, SIZE) and torch.isfinite(out).all() for out in outputs)
    for bad in (0, 17, "2", 2.0, True):
        with pytest.raises(ValueError, match="step_counts"):
            engine.warm_up(step_counts=[bad])


def test_sizes_compiled_at_start_need_no_compilation_mid_show(tiny_components):
    """`warm_up(sizes=...)` (`--sizes`): switching to a readied size compiles nothing; another
    size compiles in `update` (the runtime holds the output meanwhile), never at a frame."""
    counter = CountingBackend()
    engine = _compiled(tiny_components, _config(cfg_type="self"), counter)
    start = counter.count
    engine.warm_up(sizes=[(96, 64)])
    assert counter.count == 2 * start  # every graph again, at 96x64
    warm = counter.count
    for size in ((96, 64), (SIZE, SIZE), (96, 64)):
        engine.update(resolution=size)
        outputs = [engine(frame) for frame in _frames(2)]
        assert all(out.shape == (3, size[1], size[0]) and torch.isfinite(out).all() for out in outputs)
    assert counter.count == warm, f"compiled during the show: {counter.graphs[warm:]}"
    engine.update(resolution=(64, 96))
    assert counter.count == warm + start  # compiled in the update, for the new size
    engine(_frames(1)[0])
    assert counter.count == warm + start


def test_compile_steps_setting_is_read_and_checked():
    from bridge.settings import RunSettings

    assert RunSettings(sink=("null",), compile_steps="1, 2,4").compile_steps == (1, 2, 4)
    assert RunSettings(sink=("null",), compile_steps=[3]).compile_steps == (3,)
    for bad, message in (("1,x", "must be a list of integers"), ([0], "from 1 to 16"), ([17], "from 1 to 16")):
        with pytest.raises(ValueError, match=f"compile_steps: .*{message}"):
            RunSettings(sink=("null",), compile_steps=bad)


@pytest.mark.parametrize("cfg_type,overlapped", [("full", False), ("self", False), ("self", True)])
def test_compiled_frames_equal_eager_frames(tiny_components, cfg_type, overlapped):
    config = _config(cfg_type=cfg_type, overlap_decode=overlapped, overlap_encode=overlapped)
    frames = _frames(4)
    reference = _show(_eager(tiny_components, config), frames)
    outputs = _show(_compiled(tiny_components, config, CountingBackend()), frames)
    assert len(outputs) == len(reference)
    for k, (out, ref) in enumerate(zip(outputs, reference)):
        assert (out - ref).abs().max().item() <= 1e-4, f"frame {k}"


def test_prompt_change_reaches_the_graph_through_the_same_buffers(tiny_components):
    """set_prompt copies the new K/V into the buffers the graph was traced with (no new tensors, no
    recompilation), and the compiled UNet then predicts what the eager UNet predicts for the new prompt."""
    counter = CountingBackend()
    engine = _compiled(tiny_components, _config(cfg_type="full"), counter)
    backend = engine.backend
    assert all(layer.processor.cache is backend.cache for layer in backend.cache.layers)  # the graph reads our K/V
    frame = _frames(1)[0]
    engine(frame)
    rows = max(unet_batches(engine.config))
    buffers = backend._static[rows]
    addresses = [tensor.data_ptr() for tensor in (buffers.embeds, *(t for kv in buffers.kv for t in (kv.key, kv.value)))]
    warm = counter.count

    engine.set_prompt("a lighthouse in a storm", negative_prompt="sunny")
    cond = engine._condition(rows // 2, rows // 2)  # the layout a full-CFG frame uses
    x_t = torch.randn(rows, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([999, 500, 999, 500][:rows])
    compiled = backend.denoise(x_t, t, cond)
    assert counter.count == warm
    assert backend._static[rows] is buffers
    assert [tensor.data_ptr() for tensor in (buffers.embeds, *(t for kv in buffers.kv for t in (kv.key, kv.value)))] == addresses
    for buffer, new in zip(buffers.kv, cond.kv):
        assert torch.equal(buffer.key, new.key) and torch.equal(buffer.value, new.value)
    eager = EagerBackend(tiny_components, kv_cache=False)  # installs nothing: plain attention from the embeddings
    with torch.inference_mode():
        expected = eager.denoise(x_t, t, eager.condition(cond.embeds))
    assert (compiled - expected).abs().max().item() <= 1e-5
    # the frames agree too: the compiled engine, changed mid-stream, against eager with the same history
    reference = _eager(tiny_components, _config(cfg_type="full"))
    reference(frame)
    reference.set_prompt("a lighthouse in a storm", negative_prompt="sunny")
    assert (engine(frame) - reference(frame)).abs().max().item() <= 1e-4


def test_cuda_graph_bookkeeping_on_the_cpu(tiny_components, monkeypatch):
    """The CUDA-graph path's own steps run on the CPU here (no graph is recorded: marking a step is
    a counter, a static address an attribute): static addresses are guarded, so a replaced buffer
    would recompile; none does, and a frame from another thread records the warmed graphs again first."""

    class CudaGraphSteps(CompiledBackend):
        def __init__(self, components, *, kv_cache=True, compile_backend="inductor"):
            super().__init__(components, kv_cache=kv_cache, compile_backend=compile_backend)
            self._cuda_graphs = True

    monkeypatch.setitem(BACKENDS, "compiled", CudaGraphSteps)
    counter = CountingBackend()
    config = _config(cfg_type="full")
    engine = _compiled(tiny_components, config, counter)
    warm = counter.count
    assert all(getattr(t, "_dynamo_static_input_type", None) == "guarded" for t in [engine.backend._static[2].embeds])
    frames = _frames(4)
    outputs, errors = [], []

    def show():
        try:
            outputs.extend(_show(engine, frames))
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    worker = threading.Thread(target=show, name="inference")
    worker.start()
    worker.join(timeout=120)
    assert not errors and engine.backend._recorded_in is worker
    assert counter.count == warm
    reference = _show(_eager(tiny_components, config), frames)
    assert len(outputs) == len(reference)
    assert max((out - ref).abs().max().item() for out, ref in zip(outputs, reference)) <= 1e-4


def test_options_and_errors_are_one_line(tiny_components, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"backend_options: 'eager' has no option 'compile_backend' \(its options: channels_last, cuda_graphs, fp8, fp8_scaling, fuse_qkv\)"):
        make_backend("eager", tiny_components, kv_cache=True, compile_backend="inductor")
    with pytest.raises(ValueError, match=r"'compiled' has no option 'mode' \(its options: compile_backend, cuda_graphs, fp8, fp8_scaling, fullgraph, fuse_math, fuse_qkv, inductor_options\)"):
        make_backend("compiled", tiny_components, kv_cache=True, mode="max-autotune")

    from torch._dynamo import eval_frame

    def unsupported():
        raise RuntimeError("Python 3.15+ not yet supported for torch.compile")

    monkeypatch.setattr(eval_frame, "check_if_dynamo_supported", unsupported)
    with pytest.raises(ValueError) as refused:
        StreamDiffusion(tiny_components, _config(), backend="compiled")
    assert str(refused.value) == (
        "backend: 'compiled' cannot run here: torch.compile is unavailable "
        "(Python 3.15+ not yet supported for torch.compile); use 'eager'"
    )
    from bridge import cli

    status = cli.main(["-q", "run", "--sink", "null", "--no-osc", "--model", "random:tiny", "--width", "32",
                       "--height", "32", "--device", "cpu", "--no-status", "--backend", "compiled"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "backend: 'compiled' cannot run here" in err, err


def test_a_compiler_failure_is_one_line(tiny_components):
    def broken(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler found\nlong details")

    with pytest.raises(ValueError) as refused:
        StreamDiffusion(tiny_components, _config(), backend="compiled", backend_options={"compile_backend": broken})
    message = str(refused.value)
    assert message == "backend: 'compiled' could not compile the UNet for batch 2: RuntimeError: no C++ compiler found"


def test_inductor_cache_folder_is_the_users_unless_set(monkeypatch, tmp_path):
    from pipeline.backends.compiled import inductor_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert inductor_cache_dir() == tmp_path / "cache" / "sdbridge" / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert inductor_cache_dir() == tmp_path / "mine"


def test_inductor_frames_equal_eager_frames(tiny_components, inductor_cache, monkeypatch, capsys):
    """The real compiler, once: the smallest configuration (1 step, RCFG self: one UNet batch)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache))
    config = _config(t_index_list=(30,), cfg_type="self", guidance_scale=1.2)
    frames = _frames(3)
    reference = _eager(tiny_components, config)
    expected = [reference(frame) for frame in frames]
    started = time.perf_counter()
    engine = StreamDiffusion(tiny_components, config, backend="compiled")
    compile_seconds = time.perf_counter() - started
    engine.set_prompt("a harbour", "rain")
    outputs = [engine(frame) for frame in frames]
    with capsys.disabled():
        print(f"\ninductor: tiny model {SIZE}x{SIZE}, UNet batch 1 + VAE encoder/decoder compiled in {compile_seconds:.1f} s")
    for k, (out, ref) in enumerate(zip(outputs, expected)):
        assert (out - ref).abs().max().item() <= 1e-4, f"frame {k}"
    assert any(inductor_cache.iterdir())  # the FX graph cache a later start reuses


def test_inductor_reads_a_live_loras_new_strength_without_compiling(inductor_cache, monkeypatch):
    """The real compiler takes the weights as inputs, not constants: a live LoRA's strength written
    in place reaches the next frame, with nothing compiled for it (the test above's configuration,
    so its FX graph cache serves this one)."""
    from pipeline import random_components
    from pipeline.live_lora import LiveLoras, random_factors

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache))
    config = _config(t_index_list=(30,), cfg_type="self", guidance_scale=1.2)

    def with_lora(scale):
        components = random_components("tiny", dtype=torch.float32, device=torch.device("cpu"), seed=0)
        factors = random_factors(components.unet, rank=4, seed=1)
        components.live_loras = LiveLoras(["random"], [scale], [factors], {"unet": components.unet})
        return components

    frames = _frames(3)
    engine = StreamDiffusion(with_lora(1.0), config, backend="compiled")
    engine.set_prompt("a harbour", "rain")
    before = engine(frames[0]).clone()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    engine.set_lora_scales([-3.0])
    after = [engine(frame) for frame in frames]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # nothing compiled for it
    reference = _eager(with_lora(-3.0), config)
    for k, frame in enumerate(frames):
        assert (after[k] - reference(frame)).abs().max().item() <= 1e-4, f"frame {k}"
    assert (after[0] - before).abs().max().item() > 1e-3  # the strength did change the picture


def _sdbridge(*args, cache, timeout):
    env = dict(child_env(), TORCHINDUCTOR_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "bridge.cli", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout)
    return result, time.perf_counter() - started


def test_bench_with_the_compiled_backend(inductor_cache, tmp_path, capsys):
    out = tmp_path / "bench.json"
    result, seconds = _sdbridge("bench", "--arch", "tiny", "--backend", "compiled", "--steps", "1", "--cfg", "self",
                                "--width", str(SIZE), "--height", str(SIZE), "--frames", "5", "--warmup", "1",
                                "--device", "cpu", "--fuse-math", "--json", str(out), cache=inductor_cache, timeout=170)
    with capsys.disabled():
        print(f"\nsdbridge bench --backend compiled --fuse-math: {seconds:.1f} s (inductor cache from the test before)")
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = json.loads(out.read_text())
    assert run["backend"] == "compiled" and run["frames_measured"] == 5 and run["fps"] > 0
    assert run["fuse_math"] and run["step_math_fused"]  # asked for, and what ran
    assert "compiled" in result.stdout
    assert "compiling the UNet for batch 1" in result.stderr


def test_run_with_the_compiled_backend(inductor_cache, capsys):
    result, seconds = _sdbridge("run", "--model", "random:tiny", "--width", str(SIZE), "--height", str(SIZE),
                                "--device", "cpu", "--no-status", "--no-osc", "--sink", "null", "--steps", "1",
                                "--cfg", "self", "--frames", "5", "--backend", "compiled", cache=inductor_cache,
                                timeout=170)
    with capsys.disabled():
        print(f"\nsdbridge run --backend compiled: {seconds:.1f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiling the UNet for batch 1" in result.stderr


def test_inductor_options_are_checked_at_construction_and_reach_torch_compile(tiny_components):
    from bridge.commands.bench import _inductor_option

    with pytest.raises(ValueError, match=r"inductor_options: RuntimeError: Unexpected optimization option no_such_flag"):
        make_backend("compiled", tiny_components, kv_cache=True, inductor_options={"no_such_flag": True})
    with pytest.raises(ValueError, match="inductor_options need compile_backend 'inductor'"):
        make_backend("compiled", tiny_components, kv_cache=True, compile_backend=CountingBackend(),
                     inductor_options={"epilogue_fusion": False})
    backend = make_backend("compiled", tiny_components, kv_cache=True, inductor_options={"epilogue_fusion": False})
    assert backend.inductor_options == {"epilogue_fusion": False}
    assert [_inductor_option(text) for text in ("conv_1x1_as_mm=true", "a=False", "n=3", "x=0.5", "s=text")] == [
        ("conv_1x1_as_mm", True), ("a", False), ("n", 3), ("x", 0.5), ("s", "text")]
