"""The tensorrt backend: the UNet and the VAE encoder and decoder run as TensorRT engines built
ahead of the show by `sdbridge build-engines` (pipeline/backends/tensorrt_build.py).

Engines are only ever loaded from the engine cache, under the exact key of this model (weights
hash), resolution, batch, precision, TensorRT version and GPU compute capability, after their
sha256 matched the manifest (engine_cache.py); nothing is built at show time. `warmup` loads
every engine the stream can call (each UNet batch, guidance on and off, and the VAE), so a
missing or mismatched engine is one clear line at start, naming the command that builds it,
never a failure mid-show.

TensorRT 10's and 11's name-based API: each engine's inputs and outputs are found by name and mode,
their addresses set on the execution context before `execute_async_v3` on the current CUDA
stream; outputs are fresh tensors. The UNet engine takes the prompt embeddings (TensorRT fuses
the cross-attention projections itself), so the K/V cache is not used here.

`cuda_graphs="step"` (opt-in) captures the stream's whole step, the engines' enqueues and the
arithmetic between them, in one CUDA graph (pipeline/step_graph.py; TensorRT documents capturing
enqueueV3 once shapes are fixed and the engine has run once, which the capture's warm-up run
does). The prompt embeddings then go through static buffers refreshed in place (StaticPrompt).

Not yet done: running on a GPU at all: this project has had no TensorRT installation to run it
on, so the step graph with TensorRT is opt-in until it has been. The CPU tests run this code
against a stand-in with the TensorRT API backed by onnxruntime (tests/tensorrt_standin.py).
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path

import torch

from ..models import Components
from . import tensorrt_build
from ..errors import BackendUnavailable
from .eager import EAGER_CUDA_GRAPH_MODES, Conditioning, StaticPrompt
from .engine_cache import EngineCache, EngineCacheError, EngineKey, model_weights_hash

log = logging.getLogger(__name__)

PRECISIONS = {dtype: name for name, dtype in tensorrt_build.PRECISION_DTYPES.items()}  # torch dtype -> engine key
TORCH_TYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
               "INT64": torch.int64}


class _Engine:
    """One deserialized engine and its execution context: named tensors in, its one output out."""

    def __init__(self, runtime, data: bytes, device: torch.device, what: str, rebuild_hint: str) -> None:
        import tensorrt as trt

        self.what, self.device = what, device
        with tensorrt_build.on_device(device):  # an engine lives on the device current at its loading
            self._engine = runtime.deserialize_cuda_engine(data)
            if self._engine is None:
                raise EngineCacheError(f"TensorRT could not load the {what}; rebuild it with: {rebuild_hint}")
            self._context = self._engine.create_execution_context()
        # TensorRT's documentation: enqueuing on the default stream costs extra device-wide
        # synchronisations; a caller on the default stream has its engines run on this one
        self._own_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.inputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.outputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for index in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(index)
            shape = tuple(int(size) for size in self._engine.get_tensor_shape(name))
            dtype = TORCH_TYPES[self._engine.get_tensor_dtype(name).name]
            mode = self._engine.get_tensor_mode(name)
            (self.inputs if mode == trt.TensorIOMode.INPUT else self.outputs)[name] = (shape, dtype)
        if len(self.outputs) != 1:
            raise EngineCacheError(f"the {what} has {len(self.outputs)} outputs, expected 1; rebuild it with: {rebuild_hint}")

    def __call__(self, **tensors: torch.Tensor) -> torch.Tensor:
        with tensorrt_build.on_device(self.device):
            return self._run(tensors)

    def _run(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        held = []  # the inputs, alive until the engine has read them
        for name, (shape, dtype) in self.inputs.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"tensorrt: the {self.what} takes {name} of shape {shape}, got {tuple(tensor.shape)}")
            tensor = tensor.to(device=self.device, dtype=dtype).contiguous()
            held.append(tensor)
            self._context.set_tensor_address(name, tensor.data_ptr())
        (name, (shape, dtype)), = self.outputs.items()
        output = torch.empty(shape, dtype=dtype, device=self.device)
        self._context.set_tensor_address(name, output.data_ptr())
        if self.device.type != "cuda":
            if not self._context.execute_async_v3(0):
                raise RuntimeError(f"tensorrt: the {self.what} failed to run (see TensorRT's log above)")
            return output
        current = torch.cuda.current_stream(self.device)
        capturing = torch.cuda.is_current_stream_capturing()
        stream = self._own_stream if current.cuda_stream == 0 and not capturing else current
        if stream is not current:
            stream.wait_stream(current)  # the inputs and the output's memory are the current stream's
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"tensorrt: the {self.what} failed to run (see TensorRT's log above)")
        if stream is not current:
            current.wait_stream(stream)  # the caller reads the output after the engine wrote it
        if not capturing:
            for tensor in held:  # the caching allocator must not reuse them before the engine read them
                tensor.record_stream(current)
        return output


class TensorRTBackend(StaticPrompt):
    """`denoise`, `encode`, `decode` through prebuilt TensorRT engines; see the module docstring."""

    name = "tensorrt"

    def __init__(self, components: Components, *, kv_cache: bool = True, engines: str | Path = "engines",
                 model: str = "MODEL", cuda_graphs: str = "off") -> None:
        """`engines`: the engine cache folder `sdbridge build-engines --cache` wrote; `model`: how the
        user named the model, with the flags that change its weights (`--lcm-lora X`, `--vae Y`;
        shell-quoted), for the rebuild command in messages; `cuda_graphs`: "off" or "step"
        (CUDA only, see the module docstring). `kv_cache` is ignored."""
        if cuda_graphs not in EAGER_CUDA_GRAPH_MODES:
            raise ValueError(f"backend_options: cuda_graphs {cuda_graphs!r} must be one of "
                             f"{', '.join(EAGER_CUDA_GRAPH_MODES)} for the tensorrt backend")
        try:
            self._identity = tensorrt_build.tensorrt_identity(next(components.unet.parameters()).device)
        except tensorrt_build.TensorRTUnavailable as exc:
            raise BackendUnavailable(f"backend: 'tensorrt' cannot run here: {exc}; use 'compiled' or 'eager'") from None
        import tensorrt as trt

        parameter = next(components.unet.parameters())
        self.device, dtype = parameter.device, parameter.dtype
        if dtype not in PRECISIONS:
            raise ValueError(f"backend: 'tensorrt' has no engines for {dtype}; use float16, float32 or bfloat16")
        self.precision = PRECISIONS[dtype]
        self.vae_scale_factor = components.vae_scale_factor
        self.rebuild_hint = (f"sdbridge build-engines --model {model} --cache {shlex.quote(str(engines))} "
                             f"--precision {self.precision} (with the same width, height, steps and cfg)")
        self._cache = EngineCache(engines, rebuild_hint=self.rebuild_hint)
        started = time.perf_counter()
        log.info("hashing the model's weights to find its engines ...")
        self._model_hash = model_weights_hash(components.unet, components.vae)
        log.info("hashed in %.1f s", time.perf_counter() - started)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engines: dict[EngineKey, _Engine] = {}
        self.cuda_graphs = cuda_graphs if self.device.type == "cuda" else "off"
        self.step_graphs = "cuda" if self.cuda_graphs == "step" else None
        self._static: dict[int, Conditioning] = {}  # UNet batch size -> the embeddings a graph reads
        self._copied_from: dict[int, Conditioning] = {}

    # ------------------------------------------------------------------ the interface

    def condition(self, embeds: torch.Tensor) -> Conditioning:
        return Conditioning(embeds, None)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if self._static_prompt:
            cond = self._static_conditioning(cond)
        engine = self._engine("unet", x_t.shape[0], *self._pixels(x_t))
        return engine(sample=x_t, timestep=t, encoder_hidden_states=cond.embeds)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        return self._engine("vae_encoder", images.shape[0], width, height)(images=images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._engine("vae_decoder", latents.shape[0], *self._pixels(latents))(latents=latents)

    def warmup(self, unet_batches, *, latents: torch.Tensor, embeds: torch.Tensor, images: torch.Tensor | None) -> None:
        """Load (verify and deserialize) every engine these batches need, or one ValueError naming
        the first missing one and the command that builds it."""
        width, height = self._pixels(latents)
        wanted = [("unet", rows) for rows in sorted(set(unet_batches))] + [("vae_decoder", latents.shape[0])]
        if images is not None:
            wanted.append(("vae_encoder", images.shape[0]))
        for component, batch in wanted:
            self._engine(component, batch, width, height)

    # ------------------------------------------------------------------ engines

    def _pixels(self, latents: torch.Tensor) -> tuple[int, int]:
        """(width, height) in pixels of latents (..., h, w)."""
        return latents.shape[-1] * self.vae_scale_factor, latents.shape[-2] * self.vae_scale_factor

    def _engine(self, component: str, batch: int, width: int, height: int) -> _Engine:
        key = EngineKey(component=component, model_hash=self._model_hash, width=int(width), height=int(height),
                        batch=int(batch), precision=self.precision, tensorrt_version=self._identity.version,
                        compute_capability=self._identity.capability, gpu=self._identity.gpu)
        engine = self._engines.get(key)
        if engine is None:
            what = f"{component} engine for {width}x{height} batch {batch} {self.precision}"
            try:
                log.info("loading the %s ...", what)
                engine = _Engine(self._runtime, self._cache.load(key), self.device, what, self.rebuild_hint)
            except EngineCacheError as exc:
                raise BackendUnavailable(f"backend: 'tensorrt': {exc}") from None
            self._engines[key] = engine
        return engine
