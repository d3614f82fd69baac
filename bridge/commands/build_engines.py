"""`sdbridge build-engines`: TensorRT engines built ahead of the show, into a cache folder."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32", "bf16")  # pipeline.backends.tensorrt_build.PRECISION_DTYPES (kept here: --help without torch)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "build-engines", help="export ONNX and build TensorRT engines ahead of the show",
        description="Export the UNet and the VAE to ONNX and build one TensorRT engine per resolution and batch "
        "the stream needs, into --cache (keyed by model, resolution, batch, precision, TensorRT version and GPU). "
        "`sdbridge run --backend tensorrt --engines FOLDER` runs them; --onnx-only works anywhere. "
        "--config SHOW.toml builds what that show needs: its model (with its VAE and LoRAs), its size and "
        "--sizes, its step counts and --compile-steps, its cfg, dtype and engines folder; flags override it.",
    )
    parser.add_argument("--config", help="the show's TOML file (as `sdbridge run --config` takes it)")
    parser.add_argument("--model", help="hub id, folder, .safetensors file or random:tiny|sd15|sd-turbo")
    parser.add_argument("--vae", help="VAE, as `sdbridge run --vae` loads it: taesd-default (the default), model, "
                        "or a folder/hub id (engines are built for this model's weights with this VAE)")
    parser.add_argument("--lcm-lora", dest="lcm_lora",
                        help="LCM-LoRA weights fused into the UNet, as `sdbridge run --lcm-lora` fuses them")
    parser.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                        help="style LoRAs fused at their scales, as `sdbridge run --lora` fuses them")
    parser.add_argument("--single-file-config", dest="single_file_config",
                        help="a single-file checkpoint's configs: a diffusers folder or hub id")
    parser.add_argument("--width", type=int, action="append",
                        help="width(s) to build for (default 512, or the config's width and sizes)")
    parser.add_argument("--height", type=int, action="append", help="height(s), one per --width")
    parser.add_argument("--t-index-list", dest="t_index_list", help="denoising steps, e.g. 32,45 (sets the batch)")
    parser.add_argument("--steps", type=int, help="number of denoising steps (instead of --t-index-list)")
    parser.add_argument("--compile-steps", dest="compile_steps",
                        help="other step counts the show switches to, e.g. 1,2,4: their UNet batches are built too")
    parser.add_argument("--cfg", choices=("none", "full", "self", "initialize"), help="guidance type (default self)")
    parser.add_argument("--frame-buffer-size", type=int, default=1)
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="default fp16, or the config's dtype")
    parser.add_argument("--cache", type=Path, help="engine cache folder (default ./engines, or the config's engines)")
    parser.add_argument("--onnx-only", action="store_true", help="only export ONNX (no TensorRT needed)")
    parser.add_argument("--force", action="store_true", help="rebuild engines the cache already holds")
    parser.add_argument("--allow-pickle", dest="allow_pickle", action="store_const", const=True,
                        help="also load pickle-based weights (.ckpt/.bin): they can run code; only files you trust")
    parser.set_defaults(handler=handle)


@dataclass(frozen=True)
class BuildPlan:
    """What one build-engines run builds: the model as `run` loads it, and one StreamConfig per
    size and step count the show can reach."""

    model: str
    model_options: dict  # bridge.engine.MODEL_FLAGS -> value (None: not given)
    allow_pickle: bool
    configs: tuple  # StreamConfig, one per size and step count
    precision: str
    cache: Path


def plan(args: argparse.Namespace) -> BuildPlan:
    """The plan from the flags and, given --config, the show's file (flags win); ValueError naming
    what is wrong."""
    from ..engine import MODEL_FLAGS, stream_config
    from ..settings import FIELDS, merge, parse_size, read_config_file

    widths, heights = args.width or [], args.height or []
    if len(widths) != len(heights):
        raise ValueError(f"--width and --height: give one height per width (got {len(widths)} and {len(heights)})")
    file_values = read_config_file(args.config) if args.config else {}
    if not args.model and "model" not in file_values:
        raise ValueError("--model: none given; name the model (or a show's --config that does)")
    flags = {name: getattr(args, name) for name in FIELDS if hasattr(args, name) and name not in ("width", "height")}
    flags["cfg"] = args.cfg
    flags["lora"] = tuple(args.lora) if args.lora else None
    flags["t_index_list"] = _index_list(args.t_index_list, "--t-index-list") if args.t_index_list else None
    flags["compile_steps"] = _index_list(args.compile_steps, "--compile-steps") if args.compile_steps else None
    if widths:  # the sizes given replace the file's size and sizes
        flags.update(width=widths[0], height=heights[0], sizes=tuple(f"{w}x{h}" for w, h in zip(widths, heights)))
    show = merge(file_values, flags, sink=("null",))  # validated as `run` validates it; sinks are not opened
    if args.config and "tensorrt" not in (show.backend, show.backend_fallback):
        log.warning("%s runs on backend %r: these engines serve `sdbridge run --backend tensorrt`", args.config,
                    show.backend)
    from pipeline.backends.tensorrt_build import PRECISION_DTYPES

    precision = args.precision or _show_precision(show.dtype)
    device, dtype = ("cpu", "float32") if args.onnx_only else (
        _cuda_device(show.device), str(PRECISION_DTYPES[precision]).removeprefix("torch."))
    # the show's engine settings on the device that builds (the show's own may not exist here)
    base = stream_config(dataclasses.replace(show, device=device, dtype=dtype)).replace(
        frame_buffer_size=args.frame_buffer_size)
    sizes = [(show.width, show.height)] + [parse_size(size) for size in show.sizes]
    configs = []
    for width, height in dict.fromkeys(sizes):
        sized = base.replace(width=width, height=height)
        configs.append(sized)
        for count in sorted(set(show.compile_steps) - {sized.denoising_steps}):
            configs.append(sized.replace(t_index_list=tuple(range(count))))  # the batch needs the count only
    if show.live_lora:
        raise ValueError("live_lora: TensorRT engines hold fixed weights, so their strengths cannot change at run "
                         "time; fuse those LoRAs with --lora for engines (or run them live on --backend compiled)")
    cache = args.cache or Path(show.engines)
    return BuildPlan(model=show.model, model_options={name: getattr(show, name) for name in MODEL_FLAGS},
                     allow_pickle=show.allow_pickle, configs=tuple(configs), precision=precision, cache=cache)


def _show_precision(dtype: str) -> str:
    """The engine precision of a show's dtype as `run` resolves it on a GPU ("auto": fp16; "fp32",
    "half", "BFloat16" ... as the engine spells them)."""
    import torch
    from pipeline.backends.tensorrt import PRECISIONS as ENGINE_PRECISIONS  # torch dtype -> its name here
    from pipeline.config import resolve_dtype

    return ENGINE_PRECISIONS[resolve_dtype(dtype, torch.device("cuda"))]  # (only the device's kind is read)


def _cuda_device(device: str) -> str:
    """The show's device where it names a CUDA one (cuda:1), else the current CUDA device."""
    return device if device.startswith("cuda") else "cuda"


def handle(args: argparse.Namespace) -> int:
    from pipeline.errors import ModelLoadError
    from pipeline.backends.engine_cache import EngineCache
    from pipeline.backends.tensorrt_build import TensorRTUnavailable, build_engines, tensorrt_identity

    from ..engine import load_model, model_arguments

    try:
        if not args.onnx_only:
            tensorrt_identity()  # before anything else: TensorRT and a GPU are there
        build = plan(args)
    except TensorRTUnavailable as exc:
        raise UserError(f"{exc} (--onnx-only exports the ONNX files without it)") from None
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None
    first = build.configs[0]
    try:
        build.cache.mkdir(parents=True, exist_ok=True)  # and the cache can be written
        components = load_model(build.model, dtype=first.dtype, device=first.device, allow_pickle=build.allow_pickle,
                                **build.model_options)
        cache = EngineCache(build.cache, rebuild_hint=f"sdbridge build-engines --model "
                            f"{model_arguments(build.model, **build.model_options)} "
                            f"--cache {shlex.quote(str(build.cache))}")
        built = []
        for config in build.configs:
            built += build_engines(components, config, cache, work_folder=build.cache / "onnx",
                                   precision=build.precision, onnx_only=args.onnx_only, force=args.force)
    except (ValueError, ModelLoadError) as exc:  # (UnsafeWeightsError too: build from .safetensors weights)
        raise UserError(str(exc)) from None
    except OSError as exc:  # the cache folder cannot be written
        raise UserError(f"--cache {build.cache}: {exc.strerror or exc}") from None
    for path in built:
        print(path)
    return 0


def _index_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.replace(",", " ").split())
    except ValueError:
        example = "32,45" if flag == "--t-index-list" else "1,2,4"
        raise ValueError(f"{flag}: {text!r} must be integers separated by commas, as in {example}") from None
