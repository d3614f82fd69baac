"""Engine benchmark: warm up, synchronise around the measured region, report percentiles."""

from __future__ import annotations

import gc
import logging
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from pipeline import StreamConfig, StreamDiffusion, random_components, t_index_list_from_strength

from .kernels import kernel_choices

log = logging.getLogger("sdbridge.bench")


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark configuration (every field is reported in the result)."""

    arch: str = "tiny"  # random-weight architecture: tiny, sd15, sd-turbo
    steps: int = 1  # denoising steps per frame
    cfg_type: str = "self"  # none, full, self, initialize
    guidance_scale: float = 1.2  # CFG scale (guidance is on above 1)
    strength: float = 0.6  # img2img strength -> t_index_list
    width: int = 512  # pixels
    height: int = 512  # pixels
    frame_buffer_size: int = 1  # frames per call
    frames: int = 300  # measured calls
    warmup: int = 20  # calls before measuring
    backend: str = "eager"  # engine backend
    cuda_graphs: str | None = None  # CUDA graphs: "step" (one per frame), "modules" (compiled), "off"; None: the backend's default
    device: str = "auto"  # torch device
    dtype: str = "auto"  # float16 on CUDA, float32 on CPU
    similarity_filter: bool = False  # the filter on (synthetic frames all differ, so it never skips)
    kv_cache: bool = True  # cross-attention K/V precomputed per prompt
    text_encoder_graph: bool = True  # the text encoder as a CUDA graph, with the step graph
    time_limit: float = 0.0  # seconds of measuring before stopping early (0: no limit)
    inductor: tuple[tuple[str, object], ...] = ()  # compiled backend: inductor options as (name, value) pairs
    fp8: bool = False  # the UNet's transformer layers in fp8 (and the output's change against fp16 measured)
    fp8_scaling: str = "row"  # fp8 inputs scaled per row (token) or per tensor (pipeline/fp8.py)
    pipelined: bool = False  # also time the same engine pipelined: each frame submitted before the previous result is taken
    profile_frames: int = 0  # also run this many frames under torch.profiler: where the time goes, by kind of kernel
    cudnn_benchmark: bool = False  # cuDNN times its algorithms for each convolution shape at the first call (CUDA)
    channels_last: bool = False  # eager: the modules' weights in channels_last (compiled does it on CUDA always)
    sdpa: str = "auto"  # attention kernels: auto (torch's choice), flash, efficient, cudnn or math (bridge/kernels.py)
    fuse_math: bool | None = None  # compiled: the arithmetic between the modules compiled too (pipeline/step_math.py)
    fuse_qkv: bool | None = None  # eager/compiled: each self-attention layer's q, k, v from one projection
    # (pipeline/attention.py); None for either: the backend's default (compiled on CUDA: on; elsewhere off).
    # A result reports what ran.
    overlap_decode: bool = False  # each frame's decode beside the next frame's step (one frame later out)
    overlap_encode: bool = False  # each frame's encode beside the previous frame's UNet (one frame later out)
    prompt_transition: float = 0.0  # seconds each prompt change fades in (measured by prompt_changes)
    input_size: tuple[int, int] | None = None  # (width, height) of the frames fed in; None: the processing size
    input_fit: str = "crop"  # how frames of another aspect ratio are fitted (StreamConfig.input_fit)
    # "eager": where the backend captures no step graph (a CPU), the step graph's replay on the CPU,
    # so that a dry run of a GPU script goes through the step graph's path (buffers, fill, replay)
    step_graph_replay: str | None = None


LORA_BENCH_RANK = 16  # --lora-changes: the random live LoRA's rank (style LoRAs: mostly 8 to 64)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process_max_rss"


def fed_size(settings: BenchSettings) -> tuple[int, int]:
    """(width, height) of the frames fed to the engine: `input_size`, else the processing size."""
    return settings.input_size or (settings.width, settings.height)


def synthetic_frames(settings: BenchSettings, count: int = 8) -> list[np.ndarray]:
    """Distinct uint8 RGB frames in host memory (a batch each when frame_buffer_size > 1)."""
    rng = np.random.default_rng(0)
    width, height = fed_size(settings)
    shape = (height, width, 3)
    if settings.frame_buffer_size > 1:
        shape = (settings.frame_buffer_size, *shape)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]


def time_calls(call, frames: list, *, count: int, warmup: int, device: torch.device, time_limit: float = 0.0,
               submit=None) -> list[float]:
    """Per-call wall times in ms for `count` calls after `warmup` calls (the device synchronised).

    `submit` (the engine's `submit`): pipelined instead, each frame submitted before the previous
    one's result is taken (one frame in flight); the times are then those between results."""
    for k in range(warmup):
        call(frames[k % len(frames)])
    _synchronize(device)
    if submit is not None:
        return _time_pipelined(submit, frames, count=count, time_limit=time_limit)
    times = []
    started = time.perf_counter()
    for k in range(count):
        begin = time.perf_counter()
        call(frames[k % len(frames)])
        _synchronize(device)
        times.append((time.perf_counter() - begin) * 1000.0)
        if time_limit and k + 1 < count and time.perf_counter() - started > time_limit:
            log.warning("time limit of %.0f s reached after %d of %d frames", time_limit, k + 1, count)
            break
    return times


def _time_pipelined(submit, frames: list, *, count: int, time_limit: float) -> list[float]:
    times = []
    pending = submit(frames[0])
    started = last = time.perf_counter()  # from here, one interval per result: each frame's share of the time
    for k in range(1, count + 1):
        following = submit(frames[k % len(frames)])
        pending.result()
        now = time.perf_counter()
        times.append((now - last) * 1000.0)
        last, pending = now, following
        if time_limit and k < count and now - started > time_limit:
            log.warning("time limit of %.0f s reached after %d of %d frames", time_limit, k, count)
            break
    pending.result()
    return times


FP8_FRAMES = 24


def measure_fp8_change(components, config: StreamConfig, frames: list, count: int = FP8_FRAMES,
                       scaling: str = "row") -> dict:
    """How much fp8 changes the output frames: two fresh eager engines, with and without fp8, on
    the same frames (eager for both, so the difference is fp8's alone, not two compilations')."""
    engines = [StreamDiffusion(components, config, backend="eager", backend_options=options)
               for options in ({}, {"fp8": True, "fp8_scaling": scaling})]
    for engine in engines:
        engine.set_prompt("a photograph of a city street at night, neon lights", negative_prompt="blurry")
    worst, total, squared = 0, 0.0, 0.0
    for k in range(count):
        reference, fp8 = (engine(frames[k % len(frames)]).astype(np.int16) for engine in engines)
        diff = np.abs(reference - fp8)
        worst, total, squared = max(worst, int(diff.max())), total + float(diff.mean()), squared + float((diff ** 2).mean())
    mse = squared / count
    return {
        "frames": count,
        "backend": "eager",
        "fp8_layers": engines[1].backend.fp8_layers,
        "fp8_scaling": scaling,
        "max_abs_diff_uint8": worst,
        "mean_abs_diff_uint8": round(total / count, 4),
        "psnr_db": round(10.0 * np.log10(255.0 ** 2 / mse), 2) if mse > 0 else None,  # None: identical
    }


def summarize(times_ms: list[float], frames_per_call: int) -> dict:
    values = np.asarray(times_ms)
    return {
        "frames_measured": int(values.size * frames_per_call),
        "frames_per_call": frames_per_call,  # the ms figures are per call (of this many frames)
        "fps": float(frames_per_call * 1000.0 * values.size / values.sum()),
        "ms_mean": float(values.mean()),
        "ms_median": float(np.percentile(values, 50)),
        "ms_p95": float(np.percentile(values, 95)),
        "ms_p99": float(np.percentile(values, 99)),
        "ms_min": float(values.min()),
    }


def run_benchmark(settings: BenchSettings, *, sequential: bool = False, runtime: bool = False,
                  prompt_changes: int = 0, size_changes: int = 0, other_size: tuple[int, int] | None = None,
                  lora_changes: int = 0, components=None,
                  checkpoint: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Time the stream-batch path (and the sequential path too, when asked); one dict per run.

    `checkpoint(rows so far)`: called after each row and each measurement added to one, so that a
    caller can write what is measured at once (a script's time limit may kill the rest).

    `runtime`: also run the same engine through the bridge runtime (testpattern -> engine -> null)
    and report what the threads and slots add per frame, under "runtime_overhead".
    `prompt_changes`: also change the prompt that many times through the runtime at 60 fps and
    report the gaps between frames, under "prompt_changes".
    `size_changes`: likewise switch the size that many times between the configured one and
    `other_size` (readied at start with warm_up(sizes=...)), under "size_changes".
    `lora_changes`: a random live LoRA (rank LORA_BENCH_RANK on every attention projection) whose
    strength changes that many times through the runtime at 60 fps, under "lora_changes".
    """
    base = StreamConfig(
        width=settings.width, height=settings.height, device=settings.device, dtype=settings.dtype,
        cfg_type=settings.cfg_type, guidance_scale=settings.guidance_scale,
        t_index_list=t_index_list_from_strength(settings.strength, settings.steps, 50),
        frame_buffer_size=settings.frame_buffer_size, similarity_filter=settings.similarity_filter,
        kv_cache=settings.kv_cache, text_encoder_graph=settings.text_encoder_graph,
        overlap_decode=settings.overlap_decode, overlap_encode=settings.overlap_encode,
        prompt_transition=settings.prompt_transition, input_fit=settings.input_fit,
    )
    if components is None:
        started = time.perf_counter()
        log.info("building random-weight %s models on %s (%s) ...", settings.arch, base.device, base.dtype)
        components = random_components(settings.arch, dtype=base.dtype, device=base.device, seed=0)
        log.info("models ready in %.1f s", time.perf_counter() - started)
    if lora_changes and components.live_loras is None:
        from pipeline.live_lora import LiveLoras, random_factors

        factors = random_factors(components.unet, rank=LORA_BENCH_RANK)
        components.live_loras = LiveLoras(["random"], [1.0], [factors], {"unet": components.unet})
    frames = synthetic_frames(settings)
    results = []
    with kernel_choices(cudnn_benchmark=settings.cudnn_benchmark, sdpa=settings.sdpa):
        for batched in (True, False) if sequential else (True,):
            _run_one(settings, base, components, frames, results, batched=batched, runtime=runtime,
                     prompt_changes=prompt_changes, size_changes=size_changes, other_size=other_size,
                     lora_changes=lora_changes, checkpoint=checkpoint or (lambda rows: None))
    if sequential:
        rows = [r for r in results if not r["pipelined"]]
        rows[0]["speedup_vs_sequential"] = rows[0]["fps"] / rows[1]["fps"]
    return results


def _changes(engine, settings: BenchSettings, count: int, what: str, measure: Callable[..., dict]) -> dict:
    """`measure`'s figures for `count` changes through the runtime at 60 fps (half a second apart)."""
    log.info("%d %s through the runtime at 60 fps ...", count, what)
    return measure(engine, changes=count, warmup=settings.warmup, input_size=fed_size(settings),
                   timeout=max(30.0, count * 0.5 + 30.0))


def _run_one(settings: BenchSettings, base: StreamConfig, components, frames: list, results: list, *, batched: bool,
             runtime: bool, prompt_changes: int, size_changes: int, other_size: tuple[int, int] | None,
             lora_changes: int, checkpoint: Callable[[list[dict]], None]) -> None:
    """One engine of `settings` (stream batch or sequential): its rows appended to `results`,
    `checkpoint(results)` after each row and each measurement added."""
    config = base.replace(use_denoising_batch=batched)
    options = {"cuda_graphs": settings.cuda_graphs} if settings.cuda_graphs is not None else {}
    if settings.inductor:
        options["inductor_options"] = dict(settings.inductor)
    if settings.fp8:
        options["fp8"] = True
        options["fp8_scaling"] = settings.fp8_scaling
    if settings.channels_last:
        options["channels_last"] = True
    if settings.fuse_math is not None and settings.backend == "compiled":
        options["fuse_math"] = settings.fuse_math
    if settings.fuse_qkv is not None and settings.backend in ("eager", "compiled"):
        options["fuse_qkv"] = settings.fuse_qkv
    engine = StreamDiffusion(components, config, backend=settings.backend, backend_options=options)
    if settings.step_graph_replay == "eager" and engine._graphs is None:
        from pipeline.step_graph import StepGraphs

        engine._graphs = StepGraphs(engine, replay="eager")
        engine.warm_up()  # its "graphs" captured, as the CUDA ones are at construction
    engine.set_prompt("a photograph of a city street at night, neon lights", negative_prompt="blurry")
    log.info("%s %s, %d step(s), cfg %s: %d warm-up + %d frames ...", settings.arch,
             "stream batch" if batched else "sequential", settings.steps, settings.cfg_type,
             settings.warmup, settings.frames)
    synchronous = None
    for pipelined in (False, True) if settings.pipelined and batched else (False,):
        load_before = _load_average()
        gc.collect()
        if base.device.type == "cuda":  # each row's own peak (its warm-up's included), after what is freed
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(base.device)
        gc.freeze()  # as `sdbridge run` does: the models' objects are never collected, pauses stay short
        times = time_calls(engine, frames, count=settings.frames, warmup=settings.warmup, device=base.device,
                           time_limit=settings.time_limit, submit=engine.submit if pipelined else None)
        peak, peak_kind = _peak_memory_gib(base.device)
        results.append({
            **asdict(settings),
            "pipelined": pipelined,
            "use_denoising_batch": batched,
            "t_index_list": list(config.t_index_list),
            "dtype": str(config.dtype).replace("torch.", ""),
            "device": device_name(base.device),
            "device_type": base.device.type,
            "torch": torch.__version__,
            **summarize(times, settings.frame_buffer_size),
            "time_limited": len(times) < settings.frames,  # --time-limit cut it short (frames_measured says how)
            "peak_mem_gib": peak,
            "peak_mem_kind": peak_kind,
            "frames_skipped": engine.stats.frames_skipped,
            "cuda_graphs_used": getattr(engine.backend, "cuda_graphs", None),  # "off" on a CPU
            "step_graph_replays": engine._graphs.replays if engine._graphs is not None else 0,
            "text_encoder_graph": engine.prompts.graph is not None,  # captured with the step graph on CUDA
            "fp8_layers": getattr(engine.backend, "fp8_layers", 0),
            "fuse_math": engine._math.fused,  # what ran: the setting, or the backend's default
            "fuse_qkv": getattr(engine.backend, "fused_qkv_layers", 0) > 0,
            "step_math_fused": engine._math.fused,  # the arithmetic between the modules compiled (--fuse-math)
            "fused_qkv_layers": getattr(engine.backend, "fused_qkv_layers", 0),  # self-attention layers (--fuse-qkv)
            "host_load_average": [load_before, _load_average()],  # 1-minute load before and after: other work
            "host_cpus": os.cpu_count(),
        })
        synchronous = synchronous or results[-1]
        checkpoint(results)
    if settings.profile_frames and batched:
        from .profiling import profile_frames

        synchronous["profile"] = profile_frames(engine, frames, count=settings.profile_frames, device=base.device)
        checkpoint(results)
    if runtime and batched:
        from .runtime_bench import measure_runtime_overhead

        log.info("the same engine through the runtime (testpattern -> engine -> null) ...")
        synchronous["runtime_overhead"] = measure_runtime_overhead(
            engine, frames=settings.frames, warmup=settings.warmup, input_size=fed_size(settings),
            timeout=settings.time_limit or 300.0,
        )
        checkpoint(results)
    if prompt_changes and batched:
        from .runtime_bench import measure_prompt_changes

        synchronous["prompt_changes"] = _changes(engine, settings, prompt_changes, "prompt changes",
                                                 measure_prompt_changes)
        checkpoint(results)
    if size_changes and batched:
        from .runtime_bench import measure_size_changes

        own = (settings.width, settings.height)
        other = other_size or (settings.width + 128, settings.height)
        log.info("readying %dx%d, then %d size changes through the runtime at 60 fps ...", *other, size_changes)
        engine.warm_up(sizes=[other])
        synchronous["size_changes"] = measure_size_changes(
            engine, [other if k % 2 == 0 else own for k in range(size_changes)], warmup=settings.warmup,
            input_size=own, timeout=max(30.0, size_changes * 0.5 + 30.0),
        )
        checkpoint(results)
    if lora_changes and batched:
        from .runtime_bench import measure_lora_changes

        synchronous["lora_changes"] = _changes(engine, settings, lora_changes, "live LoRA strength changes",
                                               measure_lora_changes)
        checkpoint(results)
    if settings.fp8 and batched:
        log.info("fp8: the output's change against the same model without fp8 (eager, %d frames) ...", FP8_FRAMES)
        synchronous["fp8_output_change"] = measure_fp8_change(components, config, frames, scaling=settings.fp8_scaling)
        checkpoint(results)
    gc.unfreeze()  # the runtime figures above ran frozen too, as in `sdbridge run`
