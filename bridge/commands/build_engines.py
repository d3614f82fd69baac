"""`sdbridge build-engines`: TensorRT engines built ahead of the show, into a cache folder."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ..errors import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "build-engines", help="export ONNX and build TensorRT engines ahead of the show",
        description="Export the UNet and the VAE to ONNX and build one TensorRT engine per resolution and batch "
        "the stream needs, into --cache (keyed by model, resolution, batch, precision, TensorRT version and GPU). "
        "`sdbridge run --backend tensorrt --engines FOLDER` runs them; --onnx-only works anywhere.",
    )
    parser.add_argument("--model", required=True, help="hub id, folder, .safetensors file or random:tiny|sd15|sd-turbo")
    parser.add_argument("--vae", help="VAE, as `sdbridge run --vae` loads it: taesd-default (the default), model, "
                        "or a folder/hub id (engines are built for this model's weights with this VAE)")
    parser.add_argument("--lcm-lora", dest="lcm_lora",
                        help="LCM-LoRA weights fused into the UNet, as `sdbridge run --lcm-lora` fuses them")
    parser.add_argument("--single-file-config", dest="single_file_config",
                        help="a single-file checkpoint's configs: a diffusers folder or hub id")
    parser.add_argument("--width", type=int, action="append", help="width(s) to build for (default 512)")
    parser.add_argument("--height", type=int, action="append", help="height(s), one per --width (default 512)")
    parser.add_argument("--t-index-list", dest="t_index_list", default="32,45", help="denoising steps (sets the batch)")
    parser.add_argument("--cfg", default="self", choices=("none", "full", "self", "initialize"))
    parser.add_argument("--frame-buffer-size", type=int, default=1)
    parser.add_argument("--precision", default="fp16", choices=("fp16", "fp32", "bf16"))
    parser.add_argument("--cache", type=Path, default=Path("engines"), help="engine cache folder (default ./engines)")
    parser.add_argument("--onnx-only", action="store_true", help="only export ONNX (no TensorRT needed)")
    parser.add_argument("--force", action="store_true", help="rebuild engines the cache already holds")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also load pickle-based weights (.ckpt/.bin): they can run code; only files you trust")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from pipeline import StreamConfig
    from pipeline.errors import ModelLoadError
    from pipeline.backends.engine_cache import EngineCache
    from pipeline.backends.tensorrt_build import TensorRTUnavailable, build_engines, tensorrt_identity

    from ..engine import MODEL_FLAGS, load_model, model_arguments
    from ..settings import random_model_refuses

    widths, heights = args.width or [512], args.height or [512]
    if len(widths) != len(heights):
        raise UserError(f"--width and --height: give one height per width (got {len(widths)} and {len(heights)})")
    model_options = {name: getattr(args, name) for name in MODEL_FLAGS}
    refused = random_model_refuses(args.model, **{MODEL_FLAGS[name]: value for name, value in model_options.items()})
    if refused:
        raise UserError(refused)
    device, dtype = ("cpu", "float32") if args.onnx_only else ("cuda", args.precision.replace("fp", "float"))
    try:
        if not args.onnx_only:
            tensorrt_identity()  # before loading anything: TensorRT and a GPU are there
        args.cache.mkdir(parents=True, exist_ok=True)  # and the cache can be written
        t_index_list = _index_list(args.t_index_list)
        configs = [StreamConfig(width=w, height=h, device=device, dtype=dtype, cfg_type=args.cfg,
                                t_index_list=t_index_list, frame_buffer_size=args.frame_buffer_size)
                   for w, h in zip(widths, heights)]
        components = load_model(args.model, dtype=configs[0].dtype, device=configs[0].device,
                                allow_pickle=args.allow_pickle, **model_options)
        cache = EngineCache(args.cache, rebuild_hint=f"sdbridge build-engines --model "
                            f"{model_arguments(args.model, **model_options)} --cache {shlex.quote(str(args.cache))}")
        built = []
        for config in configs:
            built += build_engines(components, config, cache, work_folder=args.cache / "onnx", precision=args.precision,
                                   onnx_only=args.onnx_only, force=args.force)
    except TensorRTUnavailable as exc:
        raise UserError(f"{exc} (--onnx-only exports the ONNX files without it)") from None
    except (ValueError, ModelLoadError) as exc:  # (UnsafeWeightsError too: build from .safetensors weights)
        raise UserError(str(exc)) from None
    except OSError as exc:  # the cache folder cannot be written
        raise UserError(f"--cache {args.cache}: {exc.strerror or exc}") from None
    for path in built:
        print(path)
    return 0


def _index_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.split(","))
    except ValueError:
        raise ValueError(f"--t-index-list: {text!r} must be integers separated by commas, as in 32,45") from None
