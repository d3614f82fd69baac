"""Turn RunSettings into a StreamConfig and a running engine, with progress messages."""

from __future__ import annotations

import logging
import time
from typing import Callable

from .errors import UserError
from .settings import RunSettings

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"


def stream_config(settings: RunSettings):
    """The engine's StreamConfig (validated there: a bad value raises ValueError naming it)."""
    from pipeline import StreamConfig, t_index_list_from_strength

    values = {"width": settings.width, "height": settings.height, "device": settings.device, "dtype": settings.dtype}
    optional = {
        "cfg_type": settings.cfg, "guidance_scale": settings.guidance, "delta": settings.delta, "seed": settings.seed,
        "similarity_filter": settings.similarity_filter, "similarity_threshold": settings.similarity_threshold,
        "t_index_list": settings.t_index_list,
    }
    values.update({name: value for name, value in optional.items() if value is not None})
    if settings.steps is not None or settings.strength is not None:
        steps = settings.steps if settings.steps is not None else len(StreamConfig.t_index_list)
        strength = settings.strength if settings.strength is not None else 0.5
        values["t_index_list"] = t_index_list_from_strength(strength, steps, StreamConfig.num_inference_steps)
    return StreamConfig(**values)


def _options(settings: RunSettings) -> dict | None:
    """The backend's keyword options from the settings."""
    if settings.backend == "compiled":
        return {"cuda_graphs": settings.cuda_graphs}
    if settings.backend == "tensorrt":
        return {"engines": settings.engines, "model": settings.model}
    return None


def build_engine(settings: RunSettings, config, progress: Callable[[str], None] = log.info):
    """Load or build the model named by `settings.model` and wrap it in a StreamDiffusion.

    Raises UserError (one line) when the model cannot be loaded.
    """
    from pipeline import ModelLoadError, StreamDiffusion, random_components

    started = time.perf_counter()
    model = settings.model
    try:
        if model.startswith(RANDOM_PREFIX):
            arch = model[len(RANDOM_PREFIX):]
            progress(f"building random-weight model {arch!r} on {config.device} ...")
            components = random_components(arch, dtype=config.dtype, device=config.device, seed=0)
            progress(f"model ready in {time.perf_counter() - started:.1f} s; preparing the stream ...")
            engine = StreamDiffusion(components, config, backend=settings.backend, backend_options=_options(settings))
        else:
            progress(f"loading model {model} on {config.device} (first use may take minutes) ...")
            options = {"allow_pickle": settings.allow_pickle, "lcm_lora": settings.lcm_lora}
            if settings.vae is not None:
                options["vae"] = settings.vae
            engine = StreamDiffusion.from_pretrained(model, config, backend=settings.backend,
                                                     backend_options=_options(settings), **options)
    except ModelLoadError as exc:
        raise UserError(f"model: {exc}") from None
    except ValueError as exc:  # a bad arch, backend or a size the model cannot take
        raise UserError(str(exc)) from None
    if settings.prompt or settings.negative_prompt:
        engine.set_prompt(settings.prompt, negative_prompt=settings.negative_prompt)
    if settings.compile_steps:
        if settings.backend != "compiled":
            log.warning("--compile-steps has no effect with the %s backend", settings.backend)
        else:
            progress(f"compiling for {', '.join(map(str, settings.compile_steps))} step(s) as well ...")
            try:
                engine.warm_up(step_counts=settings.compile_steps)
            except ValueError as exc:
                raise UserError(str(exc)) from None
    progress(f"engine ready in {time.perf_counter() - started:.1f} s")
    return engine
