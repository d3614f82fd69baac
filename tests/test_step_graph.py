"""The whole-step graph's plumbing, on the CPU: StepGraphs with replay="eager" runs the captured
body again at each replay, reading and writing the same static buffers a CUDA graph would, so the
output must equal the plain stream's bit for bit through every run-time change; and everything a
graph reads must keep its address through those changes (a CUDA graph reads fixed addresses).
The CUDA replay itself runs on a GPU only: `bash bench/gpu_check.sh` checks it against eager."""

import numpy as np
import pytest
import torch

from pipeline import StreamConfig, StreamDiffusion
from pipeline.backends.eager import conditioning_tensors
from pipeline.step_graph import StepGraphs, graph_key
from test_stream_batch import OVERLAPS

SIZE = 64
BASE = dict(width=SIZE, height=SIZE, device="cpu", dtype="float32", t_index_list=(20, 40), guidance_scale=1.5, seed=7)


def _pair(components, **settings):
    """A plain stream and the same stream replaying its step through StepGraphs(replay="eager")."""
    config = StreamConfig(**{**BASE, **settings})
    plain = StreamDiffusion(components, config)
    graphed = StreamDiffusion(components, config)
    graphed._graphs = StepGraphs(graphed, replay="eager")
    graphed.warm_up()
    for engine in (plain, graphed):
        engine.set_prompt("a city at night", "blurry")
    return plain, graphed


def _frames(count, seed=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(count)]


def _addresses(engine) -> list[int]:
    """Where the per-frame tensors a graph reads live."""
    tensors = [engine._noise, engine._guidance_scale, engine._delta, engine._caught, *engine._rows.as_tuple()]
    return [tensor.data_ptr() for tensor in tensors]


def watch_prompt_copies(engine) -> list[int]:
    """The UNet batch sizes whose prompt the backend copied *inside* a replay (a CUDA graph runs
    no Python: a new prompt must be in the static buffers before it), filled as frames run."""
    backend = engine.backend
    copies_in_replay = []
    static_conditioning = backend._static_conditioning

    def watched(cond):
        rows = cond.embeds.shape[0]
        if engine._graphs.replaying and backend._copied_from.get(rows) is not cond:
            copies_in_replay.append(rows)
        return static_conditioning(cond)

    backend._static_conditioning = watched
    return copies_in_replay


def equal_through_prompt_changes(plain, graphed, changes, frames, *, negative: str, frames_each: int):
    """For each (prompt, guidance) of `changes`: set it on both streams, then assert that the next
    `frames_each` frames are equal; yields after each change's frames (for the caller's checks)."""
    for prompt, guidance in changes:
        for engine in (plain, graphed):
            engine.set_prompt(prompt, negative)
            engine.update(guidance_scale=guidance)
        for _ in range(frames_each):
            frame = next(frames)
            assert np.array_equal(plain(frame), graphed(frame)), (prompt, guidance)
        yield prompt, guidance


CHANGES = [
    ("prompt", lambda e: e.set_prompt("a forest in the rain", "blurry")),
    ("negative prompt", lambda e: e.set_prompt("a forest in the rain", "dark")),
    ("guidance", lambda e: e.update(guidance_scale=3.0)),
    ("delta", lambda e: e.update(delta=0.4)),
    ("strength", lambda e: e.update(t_index_list=(10, 30))),
    ("seed", lambda e: e.update(seed=99)),
    ("guidance off", lambda e: e.update(guidance_scale=0.8)),
    ("guidance on", lambda e: e.update(guidance_scale=2.0)),
    ("prompt blend", lambda e: e.set_prompt_blend([("a city", 0.5), ("a forest", 0.5)])),
]


@pytest.mark.parametrize("cfg_type,overlap", [
    ("none", None), ("full", None), ("self", None), ("initialize", None),
    ("none", "decode"), ("self", "decode"), ("self", "encode"), ("full", "both"),
])
def test_replayed_step_equals_the_plain_stream_through_every_runtime_change(tiny_components, cfg_type, overlap):
    """Also with the VAE overlapped (overlap_decode / overlap_encode: the VAE's work for another
    frame a branch beside this frame's UNet). With overlap_decode the first frame after the start
    (no x_0 kept yet) runs outside the graph; overlap_encode's first latents are the frame's own,
    filled in before the replay; after the seed change both replay (what they keep stays)."""
    plain, graphed = _pair(tiny_components, cfg_type=cfg_type, **OVERLAPS[overlap])
    captured = graphed._graphs.captures
    assert captured == (1 if cfg_type == "none" else 2)  # guidance on and off, before any frame
    addresses = _addresses(graphed)
    frames = iter(_frames(3 * (len(CHANGES) + 1)))
    for name, change in [("start", lambda e: None), *CHANGES]:
        change(plain)
        change(graphed)
        for _ in range(3):
            frame = next(frames)
            expected, got = plain(frame), graphed(frame)
            assert np.array_equal(expected, got), f"{cfg_type}: after the {name} change"
    assert graphed._graphs.captures == captured, "a change that keeps the step count captured a new graph"
    assert _addresses(graphed) == addresses, "a buffer the graph reads was replaced instead of updated in place"
    # every frame, the ones that refilled the stream too (the first, and the first after the seed change),
    # but with the decode overlapped the first
    assert graphed._graphs.replays == 3 * (len(CHANGES) + 1) - (1 if overlap in ("decode", "both") else 0)
    assert graphed.stats == plain.stats


def test_a_step_count_change_captures_its_graph_in_update_not_at_a_frame(tiny_components):
    plain, graphed = _pair(tiny_components, cfg_type="self")
    frames = _frames(8)
    for frame in frames[:2]:
        assert np.array_equal(plain(frame), graphed(frame))
    captured = graphed._graphs.captures
    for engine in (plain, graphed):
        engine.update(t_index_list=(10, 25, 40))
    assert graphed._graphs.captures == captured + 2 and graphed.config in graphed._graphs
    replays = graphed._graphs.replays
    for frame in frames[2:]:
        assert np.array_equal(plain(frame), graphed(frame))
    # a new step count refills the stream (as without graphs), from the frame itself, then replays
    assert graphed._graphs.replays == replays + len(frames[2:])


def test_similarity_filter_and_tensor_frames_work_with_the_graph(tiny_components):
    plain, graphed = _pair(tiny_components, cfg_type="self", similarity_filter=True, similarity_threshold=0.99)
    frame = _frames(1)[0]
    for _ in range(6):  # the same frame again and again: skipped sometimes (probabilistic, same seed on both)
        assert np.array_equal(plain(frame), graphed(frame))
    assert graphed.stats.frames_skipped == plain.stats.frames_skipped > 0
    tensor = torch.rand(3, SIZE, SIZE)
    first, second = graphed(tensor), graphed(tensor * 0.5)
    assert torch.equal(plain(tensor), first) and torch.equal(plain(tensor * 0.5), second)
    assert first.data_ptr() != second.data_ptr()  # each frame its own tensor, not the graph's memory


def test_graph_keys_tell_apart_what_changes_control_flow_and_nothing_else():
    base = StreamConfig(**BASE, cfg_type="self")
    assert graph_key(base) == graph_key(base.replace(seed=1, delta=0.2, guidance_scale=3.0, t_index_list=(5, 45)))
    for change in (dict(guidance_scale=1.0), dict(cfg_type="full"), dict(t_index_list=(20,)),
                   dict(use_denoising_batch=False), dict(width=128), dict(overlap_decode=True),
                   dict(overlap_encode=True)):
        assert graph_key(base) != graph_key(base.replace(**change)), change


def test_cuda_replay_is_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the CUDA replay is exercised by bench/gpu_check.sh")
    with pytest.raises((RuntimeError, AssertionError)):
        StepGraphs(object(), replay="cuda")
    with pytest.raises(ValueError, match="replay"):
        StepGraphs(object(), replay="sometimes")


def test_the_compiled_backend_gets_each_new_prompt_before_the_replay_and_never_recompiles(tiny_components):
    """A CUDA graph runs no Python: the compiled backend must have copied a new prompt into the
    buffers its graph reads *before* the replay (`prepare`), never inside it."""
    import torch._dynamo

    from test_compiled_backend import CountingBackend

    torch._dynamo.reset()
    counter = CountingBackend()
    config = StreamConfig(**{**BASE, "width": 32, "height": 32}, cfg_type="initialize")
    plain = StreamDiffusion(tiny_components, config)
    graphed = StreamDiffusion(tiny_components, config, backend="compiled", backend_options={"compile_backend": counter})
    graphed._graphs = StepGraphs(graphed, replay="eager")
    graphed.warm_up()
    copies_in_replay = watch_prompt_copies(graphed)
    warm = counter.count
    rng = np.random.default_rng(0)
    for k, (prompt, guidance) in enumerate([("a harbour", 1.5), ("a desert", 1.5), ("a desert", 0.5),
                                             ("snow", 0.5), ("snow", 2.5), ("a harbour", 2.5)]):
        for engine in (plain, graphed):
            engine.set_prompt(prompt, "rain")
            engine.update(guidance_scale=guidance)
        for _ in range(2):
            frame = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            assert np.abs(plain(frame).astype(int) - graphed(frame).astype(int)).max() <= 1, f"change {k}"
    assert not copies_in_replay, f"prompt copied inside the replay for batches {copies_in_replay}"
    assert counter.count == warm, f"compiled during the show: {counter.graphs[warm:]}"
    assert graphed._graphs.replays == 12
    torch._dynamo.reset()


def test_cuda_graph_modes_are_checked(tiny_components):
    with pytest.raises(ValueError, match="cuda_graphs 'always' must be one of step, modules, off"):
        StreamDiffusion(tiny_components, StreamConfig(**BASE), backend="compiled", backend_options={"cuda_graphs": "always"})


def test_a_failed_capture_leaves_every_frame_running_without_the_graph(tiny_components, monkeypatch, caplog):
    plain, graphed = _pair(tiny_components, cfg_type="self")
    graphs = StepGraphs(graphed, replay="eager")

    def broken(config, source, state):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(graphs, "_new_step", broken)
    graphed._graphs = graphs
    graphed.update(t_index_list=(10, 30, 45))  # a step count whose graph is captured in update
    plain.update(t_index_list=(10, 30, 45))
    assert graphs.failed == "RuntimeError: operation not permitted when stream is capturing"
    assert "every frame runs without one" in caplog.text
    for frame in _frames(3):
        assert np.array_equal(plain(frame), graphed(frame))
    assert graphs.replays == 0 and graphed.stats.frames_processed == 3


def test_eager_step_graphs_read_the_prompt_from_buffers_refreshed_before_the_replay(tiny_components):
    """With `cuda_graphs="step"` the eager backend's UNet reads the prompt from static buffers,
    as the compiled one does: each new prompt is copied in by `prepare`, never inside the replay,
    and the buffers keep their addresses (a CUDA graph of the eager kernels reads them there)."""
    config = StreamConfig(**BASE, cfg_type="full")
    plain = StreamDiffusion(tiny_components, config)
    graphed = StreamDiffusion(tiny_components, config)
    graphed.backend.step_graphs = "eager"  # what cuda_graphs="step" sets on CUDA, with the CPU replay
    graphed._graphs = StepGraphs(graphed, replay="eager")
    graphed.warm_up()
    backend = graphed.backend
    copies_in_replay = watch_prompt_copies(graphed)
    frames = iter(_frames(12))
    addresses = None
    changes = [("a harbour", 1.5), ("a desert", 1.5), ("a desert", 0.8), ("snow", 0.8), ("snow", 2.5), ("a harbour", 2.5)]
    for _ in equal_through_prompt_changes(plain, graphed, changes, frames, negative="rain", frames_each=2):
        now = {rows: [t.data_ptr() for t in conditioning_tensors(static)] for rows, static in backend._static.items()}
        addresses = addresses or now
        assert {rows: now[rows] for rows in addresses} == addresses, "a prompt buffer was replaced, not refilled"
    assert not copies_in_replay, f"prompt copied inside the replay for batches {copies_in_replay}"
    assert sorted(backend._static) == [2, 4]  # guidance off (1 step x 2 frames) and on (plus the uncond rows)
    assert graphed._graphs.replays == 12


def test_eager_cuda_graph_modes(tiny_components):
    from pipeline.backends import EagerBackend

    backend = EagerBackend(tiny_components, cuda_graphs="step")  # on this CPU: no CUDA graph, nothing static
    assert (backend.cuda_graphs, backend.step_graphs, backend._static_prompt) == ("off", None, False)
    with pytest.raises(ValueError, match="cuda_graphs 'modules' must be one of off, step for the eager backend"):
        EagerBackend(tiny_components, cuda_graphs="modules")


def test_eager_runs_its_step_in_a_cuda_graph_by_default_on_cuda_only():
    """On CUDA the eager kernels run in one graph unless asked not to (bit for bit the same frames,
    2.5x the plain eager rate on an H200); a CPU has no CUDA graphs, whatever was asked."""
    from pipeline.backends.eager import eager_cuda_graphs

    assert eager_cuda_graphs(None, on_cuda=True) == "step"
    assert eager_cuda_graphs("off", on_cuda=True) == "off"
    assert eager_cuda_graphs("step", on_cuda=True) == "step"
    assert eager_cuda_graphs(None, on_cuda=False) == eager_cuda_graphs("step", on_cuda=False) == "off"
    with pytest.raises(ValueError, match="cuda_graphs 'modules' must be one of off, step"):
        eager_cuda_graphs("modules", on_cuda=False)  # a wrong value is named on any device


def test_submitted_frames_come_out_in_order_and_a_held_output_is_never_overwritten(tiny_components):
    """`submit` queues a frame and returns at once (on a GPU its download runs while the next
    frame is submitted): several frames in flight, resolved in any order, give what `__call__`
    gives; a resolved output is the caller's own, not the graph's memory that the next replay writes."""
    plain, graphed = _pair(tiny_components, cfg_type="self")
    frames = _frames(9)
    expected = [plain(frame) for frame in frames]
    pending = [graphed.submit(frame) for frame in frames[:3]]
    outputs = [pending[2].result(), pending[0].result(), pending[1].result()]  # out of order
    assert all(np.array_equal(out, want) for out, want in zip([outputs[1], outputs[2], outputs[0]], expected[:3]))
    held = graphed(frames[3])
    for frame, want in zip(frames[4:], expected[4:]):
        assert np.array_equal(graphed.submit(frame).result(), want)
    assert np.array_equal(held, expected[3]), "an output handed out was overwritten by a later replay"
    assert graphed._graphs.replays == len(frames)


def test_frames_at_the_engine_size_go_in_as_pixels_and_others_as_images(tiny_components):
    """8-bit RGB at the engine's size is converted inside the graph; a frame that needs a resize,
    other channels or a float layout is converted before it; both give the plain stream's frames."""
    plain, graphed = _pair(tiny_components, cfg_type="none")
    sources = []
    run = graphed._graphs.run

    def spy(inputs, *, source="images"):
        sources.append((source, inputs.dtype, tuple(inputs.shape)))
        return run(inputs, source=source)

    graphed._graphs.run = spy
    rng = np.random.default_rng(5)
    frames = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),  # first frame: fills the stream, no replay
              rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
              rng.integers(0, 256, (SIZE + 16, SIZE, 3), dtype=np.uint8),  # resized
              rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8),  # RGBA
              torch.from_numpy(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)),  # a torch uint8 frame
              torch.rand(3, SIZE, SIZE)]  # float CHW
    for frame in frames:
        want, got = plain(frame), graphed(frame)
        assert (torch.equal if isinstance(want, torch.Tensor) else np.array_equal)(want, got)
        assert type(got) is type(want) and got.shape == want.shape
    pixels, images = ("pixels", torch.uint8, (1, SIZE, SIZE, 3)), ("images", torch.float32, (1, 3, SIZE, SIZE))
    assert sources == [pixels, pixels, images, images, pixels, images]
    assert graphed._graphs.replays == len(frames)


def test_a_capture_shows_its_settings_to_the_capturing_thread_only(tiny_components):
    """Capturing the other side of guidance runs the step with guidance flipped; a status reader
    on another thread must keep seeing the stream's real settings meanwhile."""
    import threading

    config = StreamConfig(**BASE, cfg_type="self")
    engine = StreamDiffusion(tiny_components, config)
    graphs = StepGraphs(engine, replay="eager")
    seen = []
    new_step = graphs._new_step

    def watched(captured, source, state):
        elsewhere = []
        reader = threading.Thread(target=lambda: elsewhere.append(engine.config.guidance_scale))
        reader.start()
        reader.join()
        seen.append((captured.guidance_scale, engine.config.guidance_scale, elsewhere[0]))
        return new_step(captured, source, state)

    graphs._new_step = watched
    engine._graphs = graphs
    engine.warm_up()  # captures guidance on (1.5) and, flipped, off (1.0)
    assert {(1.0, 1.0, 1.5), (1.5, 1.5, 1.5)} == set(seen)
    assert engine.config.guidance_scale == 1.5


def test_going_back_to_a_step_count_reads_the_tensors_its_graph_was_captured_with(tiny_components):
    """A CUDA graph reads the addresses it was captured with: after 2 -> 3 -> 2 steps, the
    2-step graph (not captured again) must find the step coefficients and noise where they
    were, holding the current values (the CPU replay re-runs Python, so the addresses are checked)."""
    plain, graphed = _pair(tiny_components, cfg_type="self")
    frames = iter(_frames(12))
    for _ in range(2):
        frame = next(frames)
        assert np.array_equal(plain(frame), graphed(frame))
    two_steps = _addresses(graphed)
    captured = graphed._graphs.captures
    for t_index_list, seed in [((10, 25, 40), 7), ((15, 35), 8)]:  # 3 steps, then 2 steps with another seed
        for engine in (plain, graphed):
            engine.update(t_index_list=t_index_list, seed=seed)
        for _ in range(3):
            frame = next(frames)
            assert np.array_equal(plain(frame), graphed(frame)), t_index_list
    assert graphed._graphs.captures == captured + 2  # the 3-step graphs only; the 2-step ones are reused
    assert _addresses(graphed) == two_steps, "the 2-step graph would read tensors that are gone"


def test_step_counts_readied_at_start_are_captured_then_and_switch_without_a_capture(tiny_components):
    """`warm_up(step_counts=...)` (`--compile-steps`) captures those step counts' graphs before
    frames flow, reading the tensors the stream keeps for them; switching to one captures nothing
    and then reads exactly those tensors, filled with the real values."""
    plain, graphed = _pair(tiny_components, cfg_type="self")
    graphed.warm_up(step_counts=(1, 2, 3))
    assert graphed._graphs.captures == 3 * 2  # 1, 2 (the current count) and 3 steps, guidance on and off
    three = [t.data_ptr() for key, kept in graphed._kept.items() if key[0] == "rows" and key[1] == (3,)
             for t in kept.as_tuple()]
    assert three, "the 3-step coefficients were not kept"
    frames = iter(_frames(8))
    for _ in range(2):
        frame = next(frames)
        assert np.array_equal(plain(frame), graphed(frame))
    for engine in (plain, graphed):
        engine.update(t_index_list=(10, 25, 40))
    assert graphed._graphs.captures == 6, "a step count readied at start was captured again"
    assert [t.data_ptr() for t in graphed._rows.as_tuple()] == three
    for frame in frames:
        assert np.array_equal(plain(frame), graphed(frame))
    assert graphed._graphs.replays == 2 + 6  # every frame, the first and the refill after the switch too


def test_compile_steps_readies_step_counts_wherever_there_is_something_to_ready(tiny_components):
    """`--compile-steps` (bridge.engine): compiled compiles, a backend with step graphs (eager's
    default on CUDA) captures; plain eager has nothing to ready and the run says so."""
    from bridge.engine import readies_step_counts
    from test_compiled_backend import CountingBackend

    config = StreamConfig(**{**BASE, "width": 32, "height": 32})
    eager = StreamDiffusion(tiny_components, config)
    compiled = StreamDiffusion(tiny_components, config, backend="compiled",
                               backend_options={"compile_backend": CountingBackend()})
    assert not readies_step_counts(eager) and readies_step_counts(compiled)
    eager.backend.step_graphs = "eager"  # what cuda_graphs="step" sets on CUDA, with the CPU replay
    assert readies_step_counts(eager)


def test_a_refilled_frame_replays_and_a_bad_output_then_falls_back_to_the_input(tiny_components):
    """The first frame after a start and after a seed change fills the frames in flight from itself
    outside the graph, then replays; with nothing good out yet, a bad output gives the input back
    (as the plain stream does), and later bad outputs give the last good one."""
    plain, graphed = _pair(tiny_components, cfg_type="self")
    calls = {id(plain): 0, id(graphed): 0}
    for engine in (plain, graphed):  # the 1st and 4th decodes of each stream come out NaN
        decode = engine.backend.decode

        def poisoned(latents, decode=decode, key=id(engine)):
            calls[key] += 1
            out = decode(latents)
            return torch.full_like(out, float("nan")) if calls[key] in (1, 4) else out

        engine.backend.decode = poisoned
    frames = _frames(6)
    outputs = []
    for k, frame in enumerate(frames):
        if k == 3:
            for engine in (plain, graphed):
                engine.update(seed=11)  # refills the frames in flight at the next frame
        expected, got = plain(frame), graphed(frame)
        assert np.array_equal(expected, got), f"frame {k}"
        outputs.append(got)
    assert np.abs(outputs[0].astype(int) - frames[0].astype(int)).max() <= 1  # the input, back through 8 bits
    assert np.array_equal(outputs[3], outputs[2])  # after the seed change: the last good output
    assert graphed._graphs.replays == len(frames) and graphed.stats.nonfinite_caught == 2


def test_graphs_of_sizes_reached_mid_show_are_released_beyond_the_limit_readied_ones_never(tiny_components, monkeypatch):
    """A fader sweeping /sd/resolution captures graphs for each size it passes; each holds its own
    buffers, so only the ON_DEMAND_LIMIT most recently used ones captured mid-show stay. What was
    readied at start stays for good, and a released size captured again gives the same frames."""
    from pipeline import step_graph

    monkeypatch.setattr(step_graph, "ON_DEMAND_LIMIT", 4)  # two sizes, guidance on and off each
    plain, graphed = _pair(tiny_components, cfg_type="self")
    graphs = graphed._graphs
    start = StreamConfig(**{**BASE, "cfg_type": "self"})
    graphed.warm_up(sizes=[(48, 48)])  # readied at start, as --sizes does: kept
    assert graphs.held == 4 and graphs.captures == 4

    def held_sizes():
        return {side for side in (32, 48, 64, 80, 96) if start.replace(width=side, height=side) in graphs}

    rng = np.random.default_rng(5)
    for side in (32, 80, 48, 32, 96, 80):
        for engine in (plain, graphed):
            engine.update(resolution=(side, side))
        for _ in range(2):
            frame = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            assert np.array_equal(plain(frame), graphed(frame)), side
        assert graphs.held <= 4 + 4, side
        if side == 96:  # 80 was the least recently used of those captured mid-show (32 ran again since)
            assert held_sizes() == {32, 48, 64, 96} and graphs.captures == 4 + 2 * 3
    assert held_sizes() == {48, 64, 80, 96}  # 80 captured again; 32's graphs went for it
    assert graphs.captures == 4 + 2 * 4
