"""Turn RunSettings into a StreamConfig and a running engine, with progress messages."""

from __future__ import annotations

import logging
import shlex
import time
from typing import Callable

from .errors import UserError
from .settings import RANDOM_PREFIX, RunSettings, parse_lora, parse_size

log = logging.getLogger(__name__)

MODEL_FLAGS = {"vae": "--vae", "lcm_lora": "--lcm-lora", "lora": "--lora",  # the loader's options: they change the
               "single_file_config": "--single-file-config"}  # weights, so build-engines must be given them too


def stream_config(settings: RunSettings):
    """The engine's StreamConfig (validated there: a bad value raises ValueError naming it)."""
    from pipeline import StreamConfig, t_index_list_from_strength

    values = {"width": settings.width, "height": settings.height, "mode": settings.mode,
              "device": settings.device, "dtype": settings.dtype,
              "overlap_decode": settings.overlap_decode, "overlap_encode": settings.overlap_encode}
    optional = {
        "cfg_type": settings.cfg, "guidance_scale": settings.guidance, "delta": settings.delta, "seed": settings.seed,
        "similarity_filter": settings.similarity_filter, "similarity_threshold": settings.similarity_threshold,
        "t_index_list": settings.t_index_list, "prompt_transition": settings.prompt_transition,
        "txt2img_noise": settings.txt2img_noise, "input_fit": settings.input_fit,
    }
    values.update({name: value for name, value in optional.items() if value is not None})
    if settings.steps is not None or settings.strength is not None:
        steps = settings.steps if settings.steps is not None else len(StreamConfig.t_index_list)
        strength = settings.strength if settings.strength is not None else 0.5
        values["t_index_list"] = t_index_list_from_strength(strength, steps, StreamConfig.num_inference_steps)
    return StreamConfig(**values)


def _options(settings: RunSettings, backend: str) -> dict | None:
    """The keyword options of `backend` from the settings."""
    if backend in ("eager", "compiled"):
        options = {"fp8": True} if settings.fp8 else {}
        if settings.fuse_qkv is not None:  # None: the backend's default
            options["fuse_qkv"] = settings.fuse_qkv
        if settings.fuse_math is not None and backend == "compiled":  # eager as a fallback has no such option
            options["fuse_math"] = settings.fuse_math
        if settings.cuda_graphs is not None and (backend == "compiled" or settings.cuda_graphs != "modules"):
            options["cuda_graphs"] = settings.cuda_graphs  # modules: compiled only (eager as a fallback ignores it)
        return options or None
    if backend == "tensorrt":
        options = {"engines": settings.engines, "model": model_arguments(
            settings.model, **{name: getattr(settings, name) for name in MODEL_FLAGS})}
        if settings.cuda_graphs in ("step", "off"):  # modules: compiled only (tensorrt as a fallback ignores it)
            options["cuda_graphs"] = settings.cuda_graphs
        return options
    return None  # pragma: no cover (every engine backend is named above)


def _stream(components, config, settings: RunSettings):
    """The StreamDiffusion on the chosen backend; when that backend cannot start here and the
    user named a --backend-fallback, on that one instead, said loudly (a warning naming why)."""
    from pipeline import BackendUnavailable, StreamDiffusion

    try:
        return StreamDiffusion(components, config, backend=settings.backend,
                               backend_options=_options(settings, settings.backend))
    except BackendUnavailable as exc:
        if not settings.backend_fallback:
            raise
        reason = str(exc)
    warning = (f"BACKEND FALLBACK: {reason}; running on {settings.backend_fallback!r} instead, "
               f"as --backend-fallback allows")
    log.warning("%s", warning)
    engine = StreamDiffusion(components, config, backend=settings.backend_fallback,
                             backend_options=_options(settings, settings.backend_fallback))
    engine.fallback_from = (settings.backend, reason)
    return engine


def backend_label(engine) -> str:
    """What runs the frames, for the status: e.g. "compiled+step graph+fp8", "eager (fallback from tensorrt)"."""
    backend = getattr(engine, "backend", None)
    label = getattr(backend, "name", "")
    graphs = getattr(backend, "cuda_graphs", None)
    step_graphs = getattr(engine, "_graphs", None)
    if graphs == "step":
        failure_for = getattr(step_graphs, "failure_for", None)  # (pipeline.step_graph.StepGraphs)
        failure = failure_for(engine.config) if failure_for else getattr(step_graphs, "failed", None)
        if failure is None:
            label += "+step graph"
        else:
            label += " (step graph failed)" if step_graphs.failed else " (no step graph for these settings: out of memory)"
    elif graphs == "modules":
        label += "+module graphs"
    if getattr(backend, "fp8_layers", 0):
        label += "+fp8"
    if getattr(backend, "fused_qkv_layers", 0):
        label += "+fused qkv"
    if getattr(getattr(backend, "step_math", None), "fused", False):
        label += "+fused math"
    config = getattr(engine, "config", None)
    if getattr(config, "overlap_decode", False):
        label += "+overlap decode"
    if getattr(config, "overlap_encode", False):
        label += "+overlap encode"
    fallback = getattr(engine, "fallback_from", None)
    if fallback:
        label += f" (fallback from {fallback[0]})"
    return label


def load_model(model: str, *, dtype, device, allow_pickle: bool = False, vae: str | None = None,
               lcm_lora: str | None = None, lora: tuple[str, ...] = (), single_file_config: str | None = None,
               live_lora: tuple[str, ...] = (), progress: Callable[[str], None] = log.info):
    """The Components of `model`: built with random weights for "random:ARCH", else loaded
    (pipeline.load_components; `vae` None: its default, TAESD). Raises what the loader raises."""
    from pipeline import load_components, random_components

    if model.startswith(RANDOM_PREFIX):
        arch = model[len(RANDOM_PREFIX):]
        progress(f"building random-weight model {arch!r} on {device} ...")
        return random_components(arch, dtype=dtype, device=device, seed=0)
    progress(f"loading model {model} on {device} (first use may take minutes) ...")
    options = {"vae": vae} if vae is not None else {}
    return load_components(model, dtype=dtype, device=device, allow_pickle=allow_pickle, lcm_lora=lcm_lora,
                           loras=[parse_lora(text) for text in lora], single_file_config=single_file_config,
                           live_loras=[parse_lora(text, name="live_lora") for text in live_lora],
                           **options)


def model_arguments(model: str, **options: str | None) -> str:
    """`model` and its `MODEL_FLAGS` options as command-line arguments (after `--model`, quoted
    for a shell): what a `sdbridge build-engines` must be given to build engines for the same
    weights (an LCM-LoRA fused in, another VAE: their hash differs)."""
    words = [model]
    for name, value in options.items():
        for item in value if isinstance(value, tuple) else () if value is None else (value,):
            words += [MODEL_FLAGS[name], item]  # (a repeatable flag once per value)
    return shlex.join(words)


def build_engine(settings: RunSettings, config, progress: Callable[[str], None] = log.info):
    """Load or build the model named by `settings.model` and wrap it in a StreamDiffusion.

    Raises UserError (one line) when the model cannot be loaded.
    """
    from pipeline import ModelLoadError

    started = time.perf_counter()
    try:
        components = load_model(settings.model, dtype=config.dtype, device=config.device,
                                allow_pickle=settings.allow_pickle, progress=progress, live_lora=settings.live_lora,
                                **{name: getattr(settings, name) for name in MODEL_FLAGS})
        progress(f"model ready in {time.perf_counter() - started:.1f} s; preparing the {settings.backend} backend ...")
        engine = _stream(components, config, settings)
    except ModelLoadError as exc:
        raise UserError(f"model: {exc}") from None
    except ValueError as exc:  # a bad arch, backend or a size the model cannot take
        raise UserError(str(exc)) from None
    if settings.prompt or settings.negative_prompt:
        engine.set_prompt(settings.prompt, negative_prompt=settings.negative_prompt)
    step_counts = settings.compile_steps if readies_step_counts(engine) else ()
    if settings.compile_steps and not step_counts:
        log.warning("--compile-steps has no effect with the %s backend here (nothing to compile or capture)",
                    engine.backend.name)
    elif step_counts:
        verb = {"compiled": "compiling", "tensorrt": "loading the engines"}.get(engine.backend.name,
                                                                               "capturing the step graph")
        progress(f"{verb} for {', '.join(map(str, step_counts))} step(s) as well ...")
        try:
            engine.warm_up(step_counts=step_counts)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    if settings.sizes:
        sizes = [parse_size(size) for size in settings.sizes]
        progress(f"readying {', '.join(settings.sizes)} as well (for /sd/resolution) ...")
        try:
            engine.warm_up(step_counts=step_counts, sizes=sizes)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    hint = speed_hint(engine)
    if hint:
        log.info(hint)
    progress(f"engine ready in {time.perf_counter() - started:.1f} s")
    return engine


def readies_step_counts(engine) -> bool:
    """Whether readying other step counts at start (--compile-steps) does anything for `engine`:
    the compiled backend compiles them, the tensorrt backend loads their UNet engines (a count
    never built is refused at start, not mid-show), and a backend with step graphs (eager's
    default on CUDA) captures theirs; otherwise a new step count costs nothing to switch to."""
    backend = engine.backend
    return getattr(backend, "name", None) in ("compiled", "tensorrt") or getattr(backend, "step_graphs", None) is not None


def speed_hint(engine) -> str | None:
    """A line for a user of plain eager on a CUDA GPU (`--cuda-graphs off`: not the default there),
    where every frame waits on the CPU launching the model's kernels one by one; None elsewhere."""
    backend = getattr(engine, "backend", None)
    device = getattr(getattr(engine, "config", None), "device", None)
    if getattr(backend, "name", None) != "eager" or getattr(backend, "cuda_graphs", "off") != "off":
        return None
    if getattr(device, "type", None) != "cuda":
        return None
    return ("eager on a GPU waits on the CPU launching the model's kernels one by one; --cuda-graphs step "
            "(one graph per frame, no compile) or --backend compiled run the same model faster")
