"""Building TensorRT engines from the ONNX exports (TensorRT 10 and 11 Python API), into an EngineCache.

Only where `tensorrt` imports (Linux/Windows with an NVIDIA GPU); nothing here runs at show
time. The layouts a stream needs are built ahead: one UNet engine per batch size the
configured cfg type can use (guidance on and off), one encoder and one decoder per resolution.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..config import StreamConfig
from ..guidance import unet_batches
from ..models import Components
from .engine_cache import EngineCache, EngineKey, model_weights_hash
from .onnx_export import ExportShapes, export_onnx

log = logging.getLogger(__name__)


PRECISION_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing; the message is one line a user can act on."""


def tensorrt_identity() -> tuple[str, str]:
    """(TensorRT version, compute capability of the current CUDA device), or TensorRTUnavailable."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable("TensorRT is not installed: pip install 'sdbridge[tensorrt]' (NVIDIA GPUs only)") from None
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines need a CUDA GPU, and torch sees none")
    major, minor = torch.cuda.get_device_capability()
    return tensorrt.__version__, f"{major}.{minor}"


def _strongly_typed_flag(trt):
    """TensorRT's STRONGLY_TYPED network creation flag, or None where it has none (before 9)."""
    flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    return getattr(flags, "STRONGLY_TYPED", None)


def build_serialized(onnx_path: Path, *, precision: str) -> bytes:
    """One engine from one ONNX file with static shapes (TensorRT 10 and 11: builder, parser, config).

    The network is strongly typed: each layer computes in the types the ONNX graph gives it, and
    the graph is exported in `precision` (`export_onnx` traces the model in its own dtype). This
    is what TensorRT 11 always does, and removed the FP16/BF16 builder flags it replaces (weak
    typing was deprecated in 10.12). Only a TensorRT without strong typing gets the flag instead."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = _strongly_typed_flag(trt)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if strongly_typed is None and precision in ("fp16", "bf16"):
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    return bytes(serialized)


def build_engines(components: Components, config: StreamConfig, cache: EngineCache, *, work_folder: Path,
                  precision: str = "fp16", onnx_only: bool = False, force: bool = False) -> list[Path]:
    """Export and build every engine `config` needs that `cache` does not hold yet; their paths."""
    identity = ("none", "none") if onnx_only else tensorrt_identity()
    dtype = next(components.unet.parameters()).dtype
    if not onnx_only and PRECISION_DTYPES.get(precision) != dtype:  # the graph's types are the engine's
        raise ValueError(f"precision {precision!r} needs the model loaded in {PRECISION_DTYPES.get(precision)}, "
                         f"not {dtype}")
    started = time.perf_counter()
    log.info("hashing the model's weights ...")
    model_hash = model_weights_hash(components.unet, components.vae)
    built = []
    for batch in unet_batches(config):
        shapes = ExportShapes(width=config.width, height=config.height, frames=config.frame_buffer_size, unet_batch=batch)
        folder = Path(work_folder) / f"{config.width}x{config.height}-b{batch}"
        paths = export_onnx(components, folder, shapes)
        if onnx_only:
            built.extend(paths.values())
            continue
        for component, onnx_path in paths.items():
            rows = batch if component == "unet" else config.frame_buffer_size
            key = EngineKey(component=component, model_hash=model_hash, width=config.width, height=config.height,
                            batch=rows, precision=precision, tensorrt_version=identity[0], compute_capability=identity[1])
            if cache.has(key) and not force:
                log.info("%s: already built", key.filename)
                continue
            log.info("building %s (this takes minutes) ...", key.filename)
            built.append(cache.store(key, build_serialized(onnx_path, precision=precision)))
    log.info("done in %.1f s", time.perf_counter() - started)
    return built
