"""The compiled backend: the eager backend's UNet and VAE calls run through torch.compile.

Nothing recompiles while a show runs, because nothing a graph was traced with changes:
- shapes: dynamic=False, one graph per UNet batch size (and resolution). `warmup` compiles every
  batch the stream's cfg type and step count can reach, guidance on and off, before frames flow;
  a step-count, cfg-type or size change warms the new batches up (a compilation, logged), on
  another thread beside the running frames where `warms_beside_frames` (`StreamDiffusion.ready`:
  the UNet is then warmed on a prompt of its own, its K/V active for that thread only);
- the prompt: the UNet graph reads the embeddings and the cross-attention K/V from static buffers
  owned by this backend, one set per batch size, refreshed in place (copy_) when `denoise` is given
  a Conditioning other than the one copied last. A new prompt or negative prompt, or guidance
  crossing 1 (another batch size, another set), changes tensor values, never the tensors;
- timesteps are a tensor input: strength and t_index_list change their values, not their shape.
  Guidance scale, delta and seed live in the stream's eager arithmetic, outside the compiled calls;
  the only Python numbers inside are fixed per model (the VAE's latent scale).

With `fuse_math=True` the stream's arithmetic between these calls (pipeline/step_math.py) is
compiled too, function by function, each into a kernel or two; the stream runs every readied
configuration's step once before frames flow (the step graph's capture, or a dry run), so those
compile then. The default on CUDA, with `fuse_qkv` (one projection for each self-attention layer's
q, k and v): together they took sd-turbo's step graph from 169.7 to 175.7 fps on an H200.

fullgraph=True: the diffusers UNet of the tiny, sd15 and sd-turbo architectures, TAESD, and the K/V
cache processors (pipeline/attention.py) trace as one graph each; a model that does not is refused
at warm-up with one line (pass fullgraph=False in backend_options to allow graph breaks).

On CUDA only: channels_last weights and CUDA graphs, chosen by `cuda_graphs`:
- "step" (the default): the modules are compiled in inductor's default mode and the stream captures
  its whole per-frame step, these calls and the arithmetic between them, in one CUDA graph
  (pipeline/step_graph.py): one launch per frame. `prepare` copies a new prompt into the static
  buffers before a replay; inside the graph the UNet reads them where they are.
- "modules": each module through cudagraph trees (mode="reduce-overhead"), the arithmetic between
  them eager. Measured on an H100 (sd-turbo, 1 step, 512x512): 107.6 fps, against the step graph's
  figure in bench/results/. It follows torch's documented API:
  torch._dynamo.mark_static_address(guard=True) on the static buffers (the graph reads them where
  they are, no copy per call; a new buffer would be a visible recompilation, not a silent re-record),
torch.compiler.cudagraph_mark_step_begin before each call (each call a step of its own), outputs
cloned out of the graph pool (the next replay overwrites it), and three warm-up calls per graph
(cudagraph trees run a function eagerly once, record it on the next call, then replay). Cudagraph
trees are kept per thread (torch/_inductor/cudagraph_trees.py): the first call from another thread
(the runtime's inference thread, after construction in the main thread) records every warmed graph
again in that thread before it runs, so no recording waits for, say, guidance crossing 1 mid-show.
- "off": compiled modules, no graphs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from .. import step_math
from ..errors import BackendUnavailable, innermost_line
from ..models import Components
from .eager import Conditioning, EagerBackend, conditioning_tensors

log = logging.getLogger(__name__)

CUDA_GRAPH_MODES = ("step", "modules", "off")
CUDA_GRAPH_WARMUP_CALLS = 3  # cudagraph trees: an eager warm-up run, the recording, a first replay
FUSED_MATH_GRAPHS = 64  # graphs allowed per fused function (dynamo's default limit is 8)
WARMUP_TIMESTEP = 999  # any valid timestep: warm-up only needs the dtype and shape of the real ones


def inductor_cache_dir() -> Path:
    """Where inductor keeps compiled graphs between starts: TORCHINDUCTOR_CACHE_DIR when the user
    (or torch) set it, else sdbridge's folder in the user's cache ($XDG_CACHE_HOME or ~/.cache)."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, "sdbridge", "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_unavailable_reason() -> str | None:
    """Why torch.compile cannot run in this interpreter (e.g. an unsupported Python), or None."""
    try:
        from torch._dynamo import eval_frame

        eval_frame.check_if_dynamo_supported()
    except (ImportError, RuntimeError) as exc:
        return str(exc) or type(exc).__name__
    return None


def _allow_graphs(count: int, why: str = "one graph per UNet batch size") -> None:
    """dynamo keeps at most `recompile_limit` graphs per function and backend, then silently runs
    eagerly; this backend wants one per UNet batch size, so raise the limit when a show needs more."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    if getattr(config, name) < count:
        log.info("raising torch._dynamo.config.%s to %d (%s)", name, count, why)
        setattr(config, name, count)


def fusions(*, on_cuda: bool, fp8: bool, cuda_graphs: str, fuse_qkv: bool | None,
            fuse_math: bool | None) -> tuple[bool, bool]:
    """(fuse_qkv, fuse_math) as asked, None filled in with the default: on for a UNet on CUDA, where
    they were measured to pay (fuse_qkv not with fp8, which scales each projection on its own;
    fuse_math not beside cudagraph trees, `cuda_graphs="modules"`, a mix never run on a GPU), off
    elsewhere (on a CPU they add compile time and are unmeasured)."""
    default_qkv, default_math = on_cuda and not fp8, on_cuda and cuda_graphs != "modules"
    return default_qkv if fuse_qkv is None else fuse_qkv, default_math if fuse_math is None else fuse_math


class CompiledBackend(EagerBackend):
    """The eager backend's calls through torch.compile (plus CUDA graphs on a GPU); see the module docstring."""

    name = "compiled"

    def __init__(
        self,
        components: Components,
        *,
        kv_cache: bool = True,
        compile_backend: str | Callable = "inductor",
        fullgraph: bool = True,
        cuda_graphs: str = "step",
        inductor_options: dict | None = None,
        fp8: bool = False,
        fp8_scaling: str = "row",
        fuse_math: bool | None = None,
        fuse_qkv: bool | None = None,
    ) -> None:
        """`compile_backend`: torch.compile's backend ("inductor", or a callable such as a
        compilation counter in tests); `fullgraph`: refuse graph breaks; `cuda_graphs`: "step",
        "modules" or "off" (CUDA only; see the module docstring); `inductor_options`: inductor
        settings for these compilations (torch.compile's `options`, e.g. {"conv_1x1_as_mm": True}),
        part of the compile cache's key; `fp8`, `fp8_scaling`: as for the eager backend; `fuse_math`: the stream's
        arithmetic between the modules compiled too, a few fused kernels instead of dozens of small
        ones (pipeline/step_math.py); `fuse_qkv`: as for the eager backend. None (the default) for
        either: on for a UNet on CUDA (fuse_qkv: unless fp8; fuse_math: unless cuda_graphs is
        "modules"), off elsewhere. Measured on an H200
        (bench/results/h200_*_qkv*.json, *_fused.json): sd-turbo 1 step 169.7 -> 175.7 fps with both;
        on a CPU they only add compile time (inductor's C++ kernels), and are unmeasured."""
        if cuda_graphs not in CUDA_GRAPH_MODES:
            raise ValueError(f"backend_options: cuda_graphs {cuda_graphs!r} must be one of {', '.join(CUDA_GRAPH_MODES)}")
        reason = compile_unavailable_reason()
        if reason is not None:
            raise BackendUnavailable(
                f"backend: 'compiled' cannot run here: torch.compile is unavailable ({reason}); use 'eager'"
            )
        on_cuda = next(components.unet.parameters()).device.type == "cuda"
        fuse_qkv, fuse_math = fusions(on_cuda=on_cuda, fp8=fp8, cuda_graphs=cuda_graphs, fuse_qkv=fuse_qkv,
                                      fuse_math=fuse_math)
        super().__init__(components, kv_cache=kv_cache, cuda_graphs="off", fp8=fp8,  # its own graphs below
                         fp8_scaling=fp8_scaling, fuse_qkv=fuse_qkv)
        device = next(self.unet.parameters()).device
        self._inductor = compile_backend == "inductor"
        graphs = cuda_graphs if device.type == "cuda" and self._inductor else "off"  # CUDA graphs need both
        self._cuda_graphs = graphs == "modules"  # cudagraph trees around each module
        self.step_graphs = "cuda" if graphs == "step" else None  # the stream captures its whole step
        self.cuda_graphs = graphs
        options = {"backend": compile_backend, "dynamic": False, "fullgraph": fullgraph}
        self.cache_dir = inductor_cache_dir() if self._inductor else None  # inductor's FX graph cache
        inductor_options = dict(inductor_options or {})
        if inductor_options and not self._inductor:
            raise ValueError("backend_options: inductor_options need compile_backend 'inductor'")
        if device.type == "cuda":
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
            if self._cuda_graphs and inductor_options:  # what mode="reduce-overhead" sets (torch.compile takes one)
                inductor_options["triton.cudagraphs"] = True
            elif self._cuda_graphs:
                options["mode"] = "reduce-overhead"  # CUDA graphs through cudagraph trees
        if inductor_options:
            options["options"] = inductor_options
        self.inductor_options = inductor_options
        try:
            compile_call = functools.partial(torch.compile, **options)
            compile_call(_identity)  # torch.compile checks the options here, before any model is traced
        except RuntimeError as exc:
            raise ValueError(f"backend_options: inductor_options: {innermost_line(exc, 160)}") from None
        # the eager backend's own calls, compiled (the methods below route through them)
        self._compiled_unet = compile_call(super()._unet_forward)
        self._compiled_encode = compile_call(super()._vae_encode)
        self._compiled_decode = compile_call(super()._vae_decode)
        # the same graphs without compiling (a miss runs eagerly): what other threads call while one
        # compiles beside them, since dynamo's compiler is one lock a miss would wait on for minutes
        self._cached_only = {graph: torch._dynamo.run(graph)
                             for graph in (self._compiled_unet, self._compiled_encode, self._compiled_decode)}
        self._compiling_in: threading.Thread | None = None  # the thread warming up beside the frames, if any
        if fuse_math:  # one graph per function and shape: every step count, size and guidance side
            _allow_graphs(FUSED_MATH_GRAPHS, "the fused step math: one graph per shape")
            self.step_math = step_math.fused(functools.partial(
                torch.compile, backend=compile_backend, dynamic=False, fullgraph=fullgraph), self._compiling_elsewhere)
        self._warm: dict[tuple, Callable[[], object]] = {}  # graphs compiled by `warmup`, with the call that did it
        self._recorded_in = threading.current_thread()  # the thread whose cudagraph trees hold the recordings

    # ------------------------------------------------------------------ the interface

    def warmup(
        self, unet_batches: Iterable[int], *, latents: torch.Tensor, embeds: torch.Tensor, images: torch.Tensor | None,
        beside_frames: bool = False,
    ) -> None:
        """Compile (and on CUDA record) every graph not compiled yet: the UNet for each batch size in
        `unet_batches`, the VAE decoder for `latents` (b, 4, h, w) and, given `images` (b, 3, H, W),
        the encoder. `embeds` (1, tokens, D) is a prompt embedding of the real shape.

        `beside_frames`: called on another thread while frames run (see `warms_beside_frames`):
        the UNet is warmed on a prompt of its own, not through the static buffers the frames' graphs
        read, and its K/V are active for this thread only."""
        if not beside_frames:
            self._warm_all(unet_batches, latents, embeds, images, unet=self.denoise)
            return
        with self.compiling_beside_frames():
            self._warm_all(unet_batches, latents, embeds, images, unet=self._unet_with)

    @contextlib.contextmanager
    def compiling_beside_frames(self):
        """Within: this thread compiles while another runs frames, whose calls (modules and fused
        math) then use the graphs compiled so far only: a miss runs eagerly at once rather than
        wait on dynamo's compile lock. Re-entrant."""
        if not self.warms_beside_frames:
            raise ValueError("backend: compiled with cuda_graphs 'modules' cannot compile beside running frames")
        previous, self._compiling_in = self._compiling_in, threading.current_thread()
        try:
            yield
        finally:
            self._compiling_in = previous

    def _compiling_elsewhere(self) -> bool:
        """Whether another thread than this one is compiling beside the frames."""
        compiling_in = self._compiling_in
        return compiling_in is not None and compiling_in is not threading.current_thread()

    def _warm_all(self, unet_batches: Iterable[int], latents: torch.Tensor, embeds: torch.Tensor,
                  images: torch.Tensor | None, *, unet: Callable) -> None:
        """`warmup`'s compilations; `unet(x_t, t, cond)` is the UNet call it warms up through."""
        latent_shape = tuple(latents.shape[1:])
        unet_keys = [("unet", rows, latent_shape) for rows in sorted(set(unet_batches))]
        _allow_graphs(len({key for key in self._warm if key[0] == "unet"} | set(unet_keys)))
        for key in unet_keys:
            rows = key[1]
            x_t = latents[:1].expand(rows, -1, -1, -1).contiguous()  # (rows, 4, h, w)
            t = torch.full((rows,), WARMUP_TIMESTEP, dtype=torch.int64, device=latents.device)  # as step_coefficients
            cond = self.condition(embeds.expand(rows, -1, -1).contiguous())  # (rows, tokens, D)
            self._warm_up(key, f"the UNet for batch {rows}", functools.partial(unet, x_t, t, cond))
        self._warm_up(("decode", tuple(latents.shape)), f"the VAE decoder for batch {latents.shape[0]}",
                      functools.partial(self.decode, latents))
        if images is not None:
            self._warm_up(("encode", tuple(images.shape)), f"the VAE encoder for batch {images.shape[0]}",
                          functools.partial(self.encode, images))

    @property
    def warms_beside_frames(self) -> bool:
        """Whether `warmup(..., beside_frames=True)` may compile on another thread while frames
        run: yes, except with cudagraph trees ("modules"), which are kept per thread and guard the
        static buffers' addresses (the frames' graphs there read a prompt a warm-up must not write)."""
        return not self._cuda_graphs

    def warmed(self, unet_batches: Iterable[int], *, latents: tuple, images: tuple | None) -> bool:
        """Whether `warmup` with these shapes would compile nothing: the UNet for each batch size,
        the VAE decoder for latents of shape `latents` (b, 4, h, w), the encoder for `images`."""
        keys = [("unet", rows, tuple(latents[1:])) for rows in set(unet_batches)] + [("decode", tuple(latents))]
        if images is not None:
            keys.append(("encode", tuple(images)))
        return all(key in self._warm for key in keys)

    @property
    def _static_prompt(self) -> bool:
        return True  # the compiled UNet reads the prompt where it is, with or without a step graph

    # ------------------------------------------------------------------ the compiled calls

    def _unet_forward(self, x_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self._run(self._compiled_unet, x_t, t, embeds)

    def _vae_encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(self._compiled_encode, images)

    def _vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run(self._compiled_decode, latents)

    def _run(self, graph: Callable, *inputs: torch.Tensor) -> torch.Tensor:
        inputs = tuple(map(_graph_input, inputs))
        if self._compiling_elsewhere():
            graph = self._cached_only[graph]  # another thread compiles: never wait for it
        if not self._cuda_graphs:
            return graph(*inputs)
        if self._recorded_in is not threading.current_thread():
            self._record_in_this_thread()
        torch.compiler.cudagraph_mark_step_begin()  # each call a step of its own
        return graph(*inputs).clone()  # out of the graph's memory pool, which the next replay overwrites

    def _record_in_this_thread(self) -> None:
        """Cudagraph trees are per thread: record every warmed graph in this one too (no compilation)."""
        self._recorded_in = threading.current_thread()
        log.info("recording %d CUDA graph(s) in thread %r", len(self._warm), self._recorded_in.name)
        for call in self._warm.values():
            for _ in range(CUDA_GRAPH_WARMUP_CALLS):
                call()

    def _warm_up(self, key: tuple, what: str, call: Callable[[], object]) -> None:
        if key in self._warm:
            return
        hint = ""
        if self._inductor:
            hint = f" (first start: a minute or more; later starts reuse the cache in {self.cache_dir})"
        log.info("compiling %s%s", what, hint)
        started = time.perf_counter()
        try:
            for _ in range(CUDA_GRAPH_WARMUP_CALLS if self._cuda_graphs else 1):
                call()
        except Exception as exc:  # a compiler's error is long: one line for the user, all of it with -v
            log.debug("compiling %s failed", what, exc_info=exc)
            raise BackendUnavailable(f"backend: 'compiled' could not compile {what}: {innermost_line(exc)}") from exc
        log.info("compiled %s in %.1f s", what, time.perf_counter() - started)
        self._warm[key] = call

    # ------------------------------------------------------------------ static prompt buffers

    def _new_buffers(self, cond: Conditioning) -> Conditioning:
        static = super()._new_buffers(cond)
        if self._cuda_graphs:  # the graph reads them in place instead of copying them into its inputs
            for tensor in conditioning_tensors(static):
                torch._dynamo.mark_static_address(tensor, guard=True)
        return static


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _graph_input(tensor: torch.Tensor) -> torch.Tensor:
    """Contiguous inference tensors, every call: strides and dispatch keys (which tell inference
    tensors from others, e.g. the stream's timesteps computed outside inference mode) are guarded."""
    if not tensor.is_inference():
        return tensor.clone(memory_format=torch.contiguous_format)  # called in inference mode: one
    return tensor.contiguous()

