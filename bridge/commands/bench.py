"""`sdbridge bench`: frame-in-host-memory to frame-in-host-memory timings of the engine.

Builds random-weight models of the exact architectures (the arithmetic of the real
checkpoints), runs img2img on synthetic frames through the public API, and writes one JSON
object per configuration run (see ../shared/benchmarks.md for the method).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ..control.table import INPUT_FITS
from ..errors import UserError
from ..profiling import profile_line
from ..kernels import SDPA_KERNELS

log = logging.getLogger("sdbridge.bench")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure engine throughput and latency on random-weight models",
        description="Time img2img through the public API (host frame in, host frame out). Several values of "
        "--arch, --steps and --cfg run every combination; each is one JSON object.",
    )
    parser.add_argument("--arch", nargs="+", default=["tiny"], choices=["tiny", "sd15", "sd-turbo"])
    parser.add_argument("--steps", nargs="+", type=int, default=[1], help="denoising steps per frame (len(t_index_list))")
    parser.add_argument("--cfg", nargs="+", default=["self"], choices=["none", "full", "self", "initialize"])
    parser.add_argument("--guidance", type=float, default=1.2, help="guidance scale (default 1.2)")
    parser.add_argument("--strength", type=float, default=0.6, help="img2img strength, sets t_index_list (default 0.6)")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--input-size", metavar="WxH",
                        help="feed frames of this size (default: --width x --height), e.g. 1920x1080: what a "
                             "camera or NDI source of another size costs the engine (upload, fit, resize)")
    parser.add_argument("--input-fit", choices=INPUT_FITS, default="crop",
                        help="how frames of another aspect ratio are fitted (as run's --input-fit; default crop)")
    parser.add_argument("--frame-buffer-size", type=int, default=1,
                        help="frames taken and returned per engine call (1..16; fps counts frames, not calls)")
    parser.add_argument("--frames", type=int, default=300, help="measured frames per configuration")
    parser.add_argument("--warmup", type=int, default=20, help="frames run before measuring")
    parser.add_argument("--sequential", action="store_true", help="also run the non-batched path and report the ratio")
    parser.add_argument("--runtime", action="store_true",
                        help="also run the engine through the runtime's threads (testpattern -> null): the overhead per frame")
    parser.add_argument("--prompt-changes", type=int, default=0, metavar="N",
                        help="also change the prompt N times through the runtime at 60 fps: the largest gap between frames")
    parser.add_argument("--prompt-transition", type=float, default=0.0, metavar="SECONDS",
                        help="each prompt change fades in over this time (with --prompt-changes: the gaps while "
                             "fading, each frame's cross-attention K/V built outside the step graph)")
    parser.add_argument("--lora-changes", type=int, default=0, metavar="N",
                        help="a random live LoRA (rank 16 on every attention projection) whose strength changes N "
                             "times through the runtime at 60 fps: the cost of a change and the largest gap")
    parser.add_argument("--size-changes", type=int, default=0, metavar="N",
                        help="also switch the size N times through the runtime at 60 fps (/sd/resolution's path), "
                             "between --width x --height and --other-size, readied at start: the largest gap")
    parser.add_argument("--other-size", metavar="WxH",
                        help="the size --size-changes switches to (default: 128 pixels wider)")
    parser.add_argument("--similarity-filter", action="store_true", help="enable the similarity filter (frames differ)")
    parser.add_argument("--no-kv-cache", action="store_true", help="compute cross-attention K/V every frame")
    parser.add_argument("--no-text-encoder-graph", action="store_true",
                        help="with the step graph: run the text encoder without its CUDA graph (to compare prompt changes)")
    parser.add_argument("--backend", default="eager",
                        help="engine backend: eager (default) or compiled (torch.compile; compiled before the warm-up frames)")
    parser.add_argument("--cuda-graphs", choices=["step", "modules", "off"],
                        help="on CUDA: the whole step in one graph (the eager and compiled backends' default; "
                             "tensorrt takes it too), a graph per compiled module, or none (tensorrt's default)")
    parser.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE", type=_inductor_option,
                        help="compiled backend: an inductor option for its compilations, e.g. conv_1x1_as_mm=true "
                             "(repeatable; true/false, numbers and text are understood)")
    parser.add_argument("--fp8", action="store_true",
                        help="the UNet's transformer layers in fp8 (Ada/Hopper GPUs; the CPU for tests), and the output's "
                             "change against the same model without fp8 (max, mean, PSNR over 24 frames)")
    parser.add_argument("--fp8-scaling", choices=["row", "tensor"], default="row",
                        help="with --fp8: each input row (token) and weight channel with its own scale (default), or "
                             "one scale per tensor (the first method: a reduction and a cast kernel per layer)")
    parser.add_argument("--pipelined", action="store_true",
                        help="also time the same engine pipelined, each frame submitted (engine.submit) before the "
                             "previous one's result is taken: on a GPU the copies and the Python between frames "
                             "overlap the previous frame's compute (a second row)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also run N frames under torch.profiler: the time of the GPU kernels (CPU operators on "
                             "a CPU) per frame, by kind (convolution, matrix product, attention, ...) and the largest")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="on CUDA: cuDNN times its algorithms for each convolution shape at the warm-up and keeps "
                             "the fastest (torch.backends.cudnn.benchmark), to compare with its heuristics' choice")
    parser.add_argument("--channels-last", action="store_true",
                        help="eager backend: the UNet's and VAE's weights in channels_last (NHWC), as the compiled "
                             "backend has them on CUDA")
    parser.add_argument("--fuse-math", action=argparse.BooleanOptionalAction, default=None,
                        help="compiled backend: the arithmetic between the modules (noising, guidance, LCM, the "
                             "bad-output check, the pixel conversions) compiled too, a few fused kernels a frame "
                             "(default: on CUDA yes, except with --cuda-graphs modules; elsewhere no)")
    parser.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=None,
                        help="eager and compiled backends: each self-attention layer's query, key and value from one "
                             "projection (one larger matrix product instead of three; default: compiled on CUDA "
                             "without --fp8 yes, elsewhere no)")
    parser.add_argument("--overlap-decode", action="store_true",
                        help="decode each frame's result during the next frame's step (on CUDA on a side stream, "
                             "a parallel branch of the step graph): one frame more latency")
    parser.add_argument("--overlap-encode", action="store_true",
                        help="encode each frame during the previous frame's UNet, which the next step denoises (on "
                             "CUDA the same way): one frame more latency")
    parser.add_argument("--step-graph-replay", choices=("eager",),
                        help="for a CPU dry run of a GPU script: where no CUDA step graph is captured, replay the "
                             "step graph's body on the CPU, so the run takes the step graph's path")
    parser.add_argument("--sdpa", choices=SDPA_KERNELS, default="auto",
                        help="the attention kernels: torch's choice (auto), or one family only, with the math "
                             "fallback for shapes it does not take (compiled graphs are compiled with it)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--time-limit", type=float, default=0.0, help="stop measuring a configuration after this many seconds")
    parser.add_argument("--json", type=Path, help="write the results here (a JSON list of objects)")
    parser.set_defaults(handler=run)


def _inductor_option(text: str) -> tuple[str, object]:
    """NAME=VALUE -> (name, value) with true/false as booleans and numbers as numbers."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return name.strip(), lowered == "true"
    for kind in (int, float):
        try:
            return name.strip(), kind(value)
        except ValueError:
            pass
    return name.strip(), value


def run(args: argparse.Namespace) -> int:
    from ..benchmarking import BenchSettings, run_benchmark

    from ..settings import parse_size

    if args.frames < 1 or min(args.warmup, args.prompt_changes, args.size_changes, args.lora_changes,
                              args.profile) < 0:
        raise UserError(f"--frames must be >= 1, --warmup, --prompt-changes, --size-changes, --lora-changes and "
                        f"--profile >= 0 (got {args.frames}, {args.warmup}, {args.prompt_changes}, "
                        f"{args.size_changes}, {args.lora_changes}, {args.profile})")
    if args.lora_changes and (args.backend == "tensorrt" or args.fp8):
        raise UserError("--lora-changes: live LoRAs need --backend eager or compiled without --fp8")
    if not args.time_limit >= 0:  # (nan too: it would never stop)
        raise UserError(f"--time-limit: {args.time_limit!r} must be a number of seconds >= 0 (0: no limit)")
    if args.fuse_math and args.backend != "compiled":
        raise UserError(f"--fuse-math needs --backend compiled (it compiles the step's arithmetic), not {args.backend!r}")
    if args.fuse_qkv and args.backend not in ("eager", "compiled"):
        raise UserError(f"--fuse-qkv is for --backend eager or compiled (the tensorrt backend runs its built engines), "
                        f"not {args.backend!r}")
    if args.fuse_qkv and args.fp8:
        raise UserError("--fuse-qkv and --fp8 cannot be combined (fp8 scales each projection on its own); choose one")
    if args.channels_last and args.backend != "eager":
        raise UserError(f"--channels-last is for --backend eager (compiled uses channels_last on CUDA always), "
                        f"not {args.backend!r}")
    try:
        other_size = parse_size(args.other_size, "--other-size") if args.other_size else (args.width + 128, args.height)
        input_size = parse_size(args.input_size, "--input-size") if args.input_size else None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.json:  # before any measuring: a path that cannot be written is found in a second, not after the run
        _check_writable(args.json)
    command = "sdbridge " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "sdbridge bench"
    commit = _commit()
    results = []

    def checkpoint(runs: list[dict]) -> None:
        """Each row written as soon as it is measured (and again with each figure added to it):
        a script's `timeout` that kills a later measurement keeps what came before."""
        for result in runs:
            result.update(commit=commit, command=command)
        if args.json:
            _write(args.json, results + runs)

    for arch, steps, cfg_type in itertools.product(args.arch, args.steps, args.cfg):
        settings = BenchSettings(
            arch=arch, steps=steps, cfg_type=cfg_type, guidance_scale=args.guidance, strength=args.strength,
            width=args.width, height=args.height, frame_buffer_size=args.frame_buffer_size, frames=args.frames,
            warmup=args.warmup, backend=args.backend, cuda_graphs=args.cuda_graphs, device=args.device, dtype=args.dtype,
            similarity_filter=args.similarity_filter, kv_cache=not args.no_kv_cache,
            text_encoder_graph=not args.no_text_encoder_graph, time_limit=args.time_limit,
            pipelined=args.pipelined, inductor=tuple(args.inductor), fp8=args.fp8, fp8_scaling=args.fp8_scaling,
            profile_frames=args.profile,
            cudnn_benchmark=args.cudnn_benchmark, sdpa=args.sdpa, channels_last=args.channels_last,
            fuse_math=args.fuse_math, fuse_qkv=args.fuse_qkv, overlap_decode=args.overlap_decode,
            overlap_encode=args.overlap_encode, step_graph_replay=args.step_graph_replay,
            prompt_transition=args.prompt_transition, input_size=input_size, input_fit=args.input_fit,
        )
        try:
            runs = run_benchmark(settings, sequential=args.sequential, runtime=args.runtime,
                                 prompt_changes=args.prompt_changes, size_changes=args.size_changes,
                                 other_size=other_size, lora_changes=args.lora_changes, checkpoint=checkpoint)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        checkpoint(runs)
        results.extend(runs)
    print(format_table(results))
    return 0


def _check_writable(path: Path) -> None:
    """UserError unless `path` can be written (its folder made); changes nothing that was there."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8"):
            pass
        if not existed:
            path.unlink()
    except OSError as exc:
        raise UserError(f"--json {path}: {exc.strerror or exc}") from None


def _write(path: Path, results: list[dict]) -> None:
    """`results` as JSON at `path`, replaced in one step: a kill mid-write leaves the last whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _backend_column(r: dict) -> str:
    """A result's backend column: the backend, its CUDA graphs, and what else it ran with."""
    backend = r["backend"] + ("+" + r["cuda_graphs_used"] if r.get("cuda_graphs_used") not in (None, "off") else "")
    backend += ("/fp8" + ("-tensor" if r.get("fp8_scaling") == "tensor" else "")) if r.get("fp8") else ""
    backend += "/cudnn-bm" if r.get("cudnn_benchmark") else ""
    backend += "/nhwc" if r.get("channels_last") else ""
    backend += "/fmath" if r.get("fuse_math") else ""
    backend += "/qkv" if r.get("fuse_qkv") else ""
    backend += "/overlap-dec" if r.get("overlap_decode") else ""
    backend += "/overlap-enc" if r.get("overlap_encode") else ""
    backend += f"/sdpa-{r['sdpa']}" if r.get("sdpa", "auto") != "auto" else ""
    backend += "".join(f"/{name}={value}" for name, value in r.get("inductor") or ())  # --inductor NAME=VALUE
    if r.get("input_size"):  # frames of another size fed in, fitted
        backend += f"/in{r['input_size'][0]}x{r['input_size'][1]}-{r.get('input_fit', 'crop')}"
    backend += "/pipe" if r.get("pipelined") else ""
    return backend


def format_table(results: list[dict]) -> str:
    labels = [_backend_column(r) for r in results]
    width = max([16, *map(len, labels)])  # the backend column: as wide as its longest label
    header = (f"{'arch':<9} {'backend':<{width}} {'steps':>5} {'cfg':<10} {'batch':<5} {'size':<9} {'fps':>7} "
              f"{'median':>8} {'p95':>8} {'p99':>8} {'mem GiB':>8}")
    lines = [header, "-" * len(header)]
    for r, backend in zip(results, labels):
        mode = "yes" if r["use_denoising_batch"] else "seq"
        lines.append(
            f"{r['arch']:<9} {backend:<{width}} {r['steps']:>5} {r['cfg_type']:<10} {mode:<5} "
            f"{r['width']}x{r['height']:<5} {r['fps']:>7.1f} {r['ms_median']:>8.2f} {r['ms_p95']:>8.2f} "
            f"{r['ms_p99']:>8.2f} {r['peak_mem_gib']:>8.2f}"
        )
        if r.get("frames_per_call", 1) > 1:
            lines.append(f"{'':<9} (the ms figures are per call of {r['frames_per_call']} frames)")
        if r.get("time_limited"):
            lines.append(f"{'':<9} cut short by --time-limit: {r['frames_measured']} of "
                         f"{r['frames'] * r.get('frame_buffer_size', 1)} frames measured")
        if "runtime_overhead" in r:
            o = r["runtime_overhead"]
            lines.append(
                f"{'':<9} through the runtime: {o['runtime_frame_ms']:.2f} ms/frame vs {o['engine_ms']:.2f} alone "
                f"(overhead {o['overhead_ms']:+.2f} ms over {o['rounds']} alternating rounds)"
            )
            if o.get("between_calls_ms") is not None:
                lines.append(
                    f"{'':<9} engine call inside the runtime {o['runtime_inference_ms']:.2f} ms, "
                    f"the inference loop between calls {o['between_calls_ms']:+.2f} ms"
                )
            lines.append(_latency_line("capture to publish at", o) + " (engine time for the frame + one input period)")
            if o.get("latency_steady"):
                lines.append(_latency_line("at a steady", o["latency_steady"]))
            if o.get("thread_cpu_ms_per_frame"):
                cpu = ", ".join(f"{name} {ms:.2f}" for name, ms in o["thread_cpu_ms_per_frame"].items())
                lines.append(f"{'':<9} CPU ms per processed frame by thread: {cpu}")
        if "prompt_changes" in r:
            c = r["prompt_changes"]
            fading = f" (each fading in over {r['prompt_transition']:g} s)" if r.get("prompt_transition") else ""
            lines.append(_changes_line(c, "prompt changes" + fading, "prompt", c["last_prompt_applied"]))
        if "lora_changes" in r:
            c = r["lora_changes"]
            lines.append(_changes_line(c, "live LoRA strength changes", "strength", c["last_applied"]))
            lines.append(f"{'':<9} one change alone: {c['set_ms_median']:.2f} ms median ({c['layers']} layers, "
                         f"{c['kept_mib']:.1f} MiB kept for them)")
        if "size_changes" in r:
            c = r["size_changes"]
            lines.append(_changes_line(c, f"size changes ({' <-> '.join(c['sizes'][:2])})", "size", c["last_applied"]))
        if "profile" in r:
            lines.append(profile_line(r["profile"]))
        if "speedup_vs_sequential" in r:
            lines.append(f"{'':<9} stream batch / sequential throughput: {r['speedup_vs_sequential']:.2f}x")
    if results:
        lines.append(f"device: {results[0]['device']}  torch {results[0]['torch']}  commit {results[0]['commit']}")
    return "\n".join(lines)


def _changes_line(c: dict, what: str, value: str, applied: bool) -> str:
    """One line for measure_changes' figures: `c['changes']` `what` ..., the last `value` applied."""
    after = "-" if c["gap_ms_max_after_change"] is None else f"{c['gap_ms_max_after_change']:.1f}"
    return (f"{'':<9} {c['changes']} {what} at {c['output_fps']:.0f} fps: largest gap after a change {after} ms, "
            f"anywhere {c['gap_ms_max']:.1f} ms; {c['gaps_over_two_periods']} over {c['two_periods_ms']:.1f} ms; "
            f"last {value} applied: {'yes' if applied else 'NO'}; graphs compiled: {c['graphs_compiled']}"
            + _gap_parts_text(c.get("largest_gap"), c.get("encode_ms_max")))


def _gap_parts_text(parts: dict | None, encode_ms: float | None) -> str:
    """`; largest: call X + before it Y ms, Z ms after a change; encode up to W ms` (what is known)."""
    text = ""
    if parts:
        text = f"; largest: call {parts['call_ms']:.1f} + before it {parts['before_call_ms']:.1f} ms"
        if parts["since_change_ms"] is not None:
            text += f", {parts['since_change_ms']:.0f} ms after a change"
    if encode_ms is not None:
        text += f"; prompt encode up to {encode_ms:.1f} ms"
    return text


def _latency_line(label: str, figures: dict) -> str:
    """`latency <label> N fps input: median/p95 ms, budget ...` from a runtime-bench dict."""
    median, p95 = figures["latency_ms_median"], figures["latency_ms_p95"]
    latency = "-" if median is None else f"{median:.1f}/{p95:.1f}"
    return (f"{'':<9} latency {label} {figures['source_fps']:.0f} fps input: {latency} ms (median/p95), "
            f"budget {figures['latency_budget_ms']:.1f}/{figures['latency_budget_p95_ms']:.1f} ms")
