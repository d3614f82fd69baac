"""Where a frame's time goes: frames run under torch.profiler, the time of each GPU kernel (on
CUDA) or of each operator's own work (on a CPU) summed, per frame, and grouped by kind
(convolution, matrix product, attention, normalisation, fused elementwise, copies, ...).

What `sdbridge bench --profile N` reports, to say which part of the step a change should aim at.
A CUDA graph's replay may hide its kernels from the profiler on some drivers: the result then
says so, and `--cuda-graphs off` profiles the same kernels launched one by one. Without a step
graph the result also splits the time by stage (the VAE encoder, the UNet, the VAE decoder: the
stream's profiler ranges, pipeline/stream.py), each stage's kernels (or CPU time) summed. On
CUDA it also gives the time the GPU was busy, kernels that ran side by side (the VAE's branch
beside the UNet's, `--overlap-decode`, `--overlap-encode`) counted once, and so how much of the
kernels' summed time ran beside other kernels.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("sdbridge.bench")

# (kind, name fragments), the first match wins. Inductor names its generated kernels after the
# operators they fuse ("triton_poi_fused_convolution_silu_3": a conv's bias and activation), so
# those come first; cuDNN's convolution kernels are implicit GEMMs ("..._fprop_implicit_gemm_..."),
# so convolution is looked for before matrix products
KINDS = (
    ("fused (inductor)", ("triton_poi", "triton_per", "triton_red", "cpp_fused", "compiledfxgraph")),  # (the last:
    # on a CPU, the own time of inductor's call range is its fused C++ code; on a GPU the range is
    # an annotation, left out: kernel_entries)
    ("attention", ("flash", "fmha", "attention", "sdpa", "softmax")),
    ("convolution", ("conv", "fprop", "implicit_gemm", "winograd", "dgrad", "wgrad")),
    ("matrix product", ("gemm", "nvjet", "cutlass", "xmma", "triton_tem", "aten::mm", "aten::addmm", "aten::bmm",
                        "aten::baddbmm", "aten::linear", "aten::matmul", "scaled_mm")),
    ("normalisation", ("norm", "moments")),  # group norm's CUDA kernels: RowwiseMomentsCUDAKernel, ...
    ("copy", ("memcpy", "memset", "copy", "aten::cat", "aten::to", "contiguous")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "aten::add", "aten::sub", "aten::mul", "aten::div",
                     "aten::silu", "aten::gelu", "aten::where", "aten::clamp", "aten::pow", "aten::sqrt")),
)
TOP = 15  # the most costly names reported one by one
TOP_PER_KIND = 10  # and within each kind (inductor's fused kernels name what they fuse: which norm, which op)


def kind_of(name: str) -> str:
    """The kind of kernel or operator `name` (see KINDS), "other" when none matches."""
    lowered = name.lower()
    for kind, fragments in KINDS:
        if any(fragment in lowered for fragment in fragments):
            return kind
    return "other"


def summarize_times(entries: list[tuple[str, float, int]], frames: int) -> dict:
    """`entries`: (name, total µs, calls) over `frames` frames -> per-frame figures by kind, the
    TOP names and the TOP_PER_KIND names of each kind, largest first."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1 (got {frames})")
    total_us = sum(us for _, us, _ in entries)
    by_kind: dict[str, float] = {}
    for name, us, _ in entries:
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + us
    share = (lambda us: us / total_us) if total_us > 0 else (lambda us: 0.0)
    ranked = sorted(entries, key=lambda entry: entry[1], reverse=True)

    def named(name: str, us: float, calls: int) -> dict:
        return {"name": name[:160], "kind": kind_of(name), "ms_per_frame": us / 1000.0 / frames,
                "calls_per_frame": calls / frames}

    return {
        "ms_per_frame": total_us / 1000.0 / frames,
        "by_kind": [{"kind": kind, "ms_per_frame": us / 1000.0 / frames, "share": share(us)}
                    for kind, us in sorted(by_kind.items(), key=lambda item: item[1], reverse=True)],
        "top": [named(*entry) for entry in ranked[:TOP]],
        "top_by_kind": {kind: [named(*entry) for entry in ranked if kind_of(entry[0]) == kind][:TOP_PER_KIND]
                        for kind in by_kind},
    }


def profile_frames(call, frames: list, *, count: int, device) -> dict:
    """Run `call` on `count` frames under torch.profiler (after the caller's warm-up) and
    summarize where their time went: GPU kernels on CUDA, operators' own CPU time elsewhere."""
    import torch  # here: the CLI imports this module for profile_line, and must start without torch
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    log.info("profiling %d frames ...", count)
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        for k in range(count):
            call(frames[k % len(frames)])
        if on_cuda:
            torch.cuda.synchronize(device)
    wall_ms = (time.perf_counter() - started) * 1000.0 / count
    from pipeline.stream import STAGE_RANGE_PREFIX

    averages = profiler.key_averages()
    if on_cuda:
        entries = kernel_entries(averages, STAGE_RANGE_PREFIX)
        source = "cuda kernels"
    else:
        entries = [(a.key, a.self_cpu_time_total, a.count) for a in averages
                   if a.self_cpu_time_total > 0 and not a.key.startswith(STAGE_RANGE_PREFIX)]  # ranges, not work
        source = "cpu operators (own time)"
    result = {"frames": count, "source": source, "wall_ms_per_frame": wall_ms, **summarize_times(entries, count)}
    stages = stage_times(profiler.events(), STAGE_RANGE_PREFIX, on_cuda=on_cuda)
    if stages:
        result["by_stage"] = [{"stage": stage, "ms_per_frame": us / 1000.0 / count} for stage, us in stages.items()]
    if on_cuda and entries:  # kernels side by side (a side stream) count once here, twice in the sum
        busy_ms = busy_us(device_intervals(profiler.events(), STAGE_RANGE_PREFIX)) / 1000.0 / count
        result.update(busy_ms_per_frame=busy_ms, side_by_side_ms_per_frame=max(0.0, result["ms_per_frame"] - busy_ms))
    if on_cuda and not entries:
        result["note"] = ("no kernels recorded: CUDA graph replays can hide them from the profiler; "
                          "--cuda-graphs off profiles the same kernels launched one by one")
    return result


def kernel_entries(averages, prefix: str) -> list[tuple[str, float, int]]:
    """(name, µs, calls) of each GPU kernel, copy and memset among the profiler's key averages;
    not the GPU-side spans of ranges (the stream's stages, named `prefix` + stage, or any user
    annotation such as inductor's "## Call CompiledFxGraph ... ##"), which cover their kernels'
    time again, and idle time too (`device_intervals` leaves out the same)."""
    import torch

    cuda = torch.autograd.DeviceType.CUDA
    return [(a.key, a.self_device_time_total, a.count) for a in averages
            if a.device_type == cuda and a.self_device_time_total > 0 and not a.key.startswith(prefix)
            and not getattr(a, "is_user_annotation", False)]


def busy_us(intervals) -> float:
    """The time covered by at least one of `intervals` ((start, end) pairs, µs): what a GPU was
    busy for when kernels on two streams overlap, where their summed times count the overlap twice."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def device_intervals(events, prefix: str) -> list[tuple[float, float]]:
    """(start, end) µs of each GPU kernel, copy and memset among the profiler's `events`; not the
    GPU-side spans of ranges (the stream's stages, named `prefix` + stage, or any user
    annotation), which cover idle time too."""
    import torch

    cuda = torch.autograd.DeviceType.CUDA
    return [(event.time_range.start, event.time_range.end) for event in events
            if event.device_type == cuda and not event.is_user_annotation and not event.name.startswith(prefix)]


def stage_times(events, prefix: str, *, on_cuda: bool) -> dict[str, float]:
    """µs per stage over the profiled frames: for each CPU-side range named `prefix` + stage, the
    time of the kernels launched inside it (CUDA), or its CPU time, children included (a CPU)."""
    import torch

    totals: dict[str, float] = {}
    for event in events:
        if not event.name.startswith(prefix) or event.device_type != torch.autograd.DeviceType.CPU:
            continue  # a CUDA-side annotation of the same range spans idle time too
        stage = event.name[len(prefix):]
        totals[stage] = totals.get(stage, 0.0) + (event.device_time_total if on_cuda else event.cpu_time_total)
    return totals


def profile_line(profile: dict, kinds: int = 6) -> str:
    """One table line: `profile (cuda kernels, 5.61 ms/frame): convolution 41%, ...`."""
    parts = ", ".join(f"{k['kind']} {100 * k['share']:.0f}%" for k in profile["by_kind"][:kinds])
    line = f"{'':<9} profile ({profile['source']}, {profile['ms_per_frame']:.2f} ms/frame"
    line += f" of {profile['wall_ms_per_frame']:.2f} wall): {parts or 'nothing recorded'}"
    if profile["top"]:
        first = profile["top"][0]
        line += f"; largest {first['name'][:60]} {first['ms_per_frame']:.2f} ms"
    if profile.get("busy_ms_per_frame") is not None:
        line += f"; GPU busy {profile['busy_ms_per_frame']:.2f} ms ({profile['side_by_side_ms_per_frame']:.2f} side by side)"
    if profile.get("by_stage"):
        line += "; by stage " + ", ".join(f"{s['stage']} {s['ms_per_frame']:.2f}" for s in profile["by_stage"]) + " ms"
    return line
