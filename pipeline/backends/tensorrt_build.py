"""Building TensorRT engines from the ONNX exports (TensorRT 10 and 11 Python API), into an EngineCache.

Only where `tensorrt` imports (Linux/Windows with an NVIDIA GPU); nothing here runs at show
time. The layouts a stream needs are built ahead: one UNet engine per batch size the
configured cfg type can use (guidance on and off), one encoder and one decoder per resolution.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import NamedTuple

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


def on_device(device: torch.device):
    """`device` as the current CUDA device within (what TensorRT builds, loads and runs on); no
    change for another kind of device (the CPU tests' stand-in)."""
    return torch.cuda.device(device) if torch.device(device).type == "cuda" else contextlib.nullcontext()


MINIMUM_MAJOR = 10  # the named-tensor API with strong typing (pyproject's tensorrt>=10)


class TensorRTIdentity(NamedTuple):
    """What an engine is built for, besides the model and its shapes (see EngineKey)."""

    version: str  # TensorRT's, e.g. "10.7.0"
    capability: str  # the GPU's compute capability, e.g. "8.9"
    gpu: str  # the GPU's name, e.g. "NVIDIA GeForce RTX 4090"


def tensorrt_identity(device: torch.device | str | None = None) -> TensorRTIdentity:
    """TensorRT's version and the GPU of `device` (default the current CUDA device), or
    TensorRTUnavailable."""
    try:
        import tensorrt
    except ImportError:
        raise TensorRTUnavailable("TensorRT is not installed: pip install 'sdbridge[tensorrt]' (NVIDIA GPUs only)") from None
    version = str(getattr(tensorrt, "__version__", "0"))
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < MINIMUM_MAJOR:
        raise TensorRTUnavailable(f"TensorRT {version} is too old: sdbridge needs TensorRT {MINIMUM_MAJOR} or later "
                                  "(pip install 'sdbridge[tensorrt]')")
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT engines need a CUDA GPU, and torch sees none")
    major, minor = torch.cuda.get_device_capability(device)
    return TensorRTIdentity(version, f"{major}.{minor}", torch.cuda.get_device_name(device))


def _strongly_typed_flag(trt) -> int:
    """The network creation flags for a strongly typed network: TensorRT 10's STRONGLY_TYPED bit
    (11 deprecated it, and is always strongly typed; 0 where a later one removed it)."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_serialized(onnx_path: Path, *, precision: str) -> bytes:
    """One engine from one ONNX file with static shapes (TensorRT 10 and 11: builder, parser, config).

    The network is strongly typed: each layer computes in the types the ONNX graph gives it, and
    the graph is exported in `precision` (`export_onnx` traces the model in its own dtype). This
    is what TensorRT 11 always does; it removed the FP16/BF16 builder flags of weak typing, which
    10.12 deprecated. Built on the current CUDA device (`build_engines` makes it the model's)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_strongly_typed_flag(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    return bytes(serialized)


def build_engines(components: Components, config: StreamConfig, cache: EngineCache, *, work_folder: Path,
                  precision: str = "fp16", onnx_only: bool = False, force: bool = False) -> list[Path]:
    """Export and build every engine `config` needs that `cache` does not hold yet; their paths."""
    parameter = next(components.unet.parameters())
    identity = TensorRTIdentity("none", "none", "none") if onnx_only else tensorrt_identity(parameter.device)
    dtype = parameter.dtype
    if not onnx_only and PRECISION_DTYPES.get(precision) != dtype:  # the graph's types are the engine's
        raise ValueError(f"precision {precision!r} needs the model loaded in {PRECISION_DTYPES.get(precision)}, "
                         f"not {dtype}")
    started = time.perf_counter()
    if not onnx_only:
        log.info("engines for %s (compute capability %s) with TensorRT %s; they run only there",
                 identity.gpu, identity.capability, identity.version)
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
                            batch=rows, precision=precision, tensorrt_version=identity.version,
                            compute_capability=identity.capability, gpu=identity.gpu)
            if cache.has(key) and not force:
                log.info("%s: already built", key.filename)
                continue
            log.info("building %s (this takes minutes) ...", key.filename)
            with on_device(parameter.device):  # TensorRT builds for the current CUDA device
                torch.cuda.empty_cache()  # the builder's workspace may take what the export left cached
                built.append(cache.store(key, build_serialized(onnx_path, precision=precision)))
    log.info("done in %.1f s", time.perf_counter() - started)
    return built
