"""Backends: anything with `denoise(x_t, t, cond)`, `encode(images)`, `decode(latents)` and `condition(embeds)`,
plus `warmup(...)` (called before frames flow: the compiled backend compiles there).

Chosen at construction by name; nothing is patched in later.
"""

from __future__ import annotations

import inspect

from ..models import Components
from .compiled import CompiledBackend
from .eager import Conditioning, EagerBackend
from .tensorrt import TensorRTBackend

BACKENDS = {"eager": EagerBackend, "compiled": CompiledBackend, "tensorrt": TensorRTBackend}
# Backends designed but not built yet, with what exists of them so far.
PLANNED: dict[str, str] = {}


def make_backend(name: str, components: Components, *, kv_cache: bool, **options):
    """The backend registered as `name`, built with its keyword `options`, or ValueError naming what is wrong."""
    if name in PLANNED:
        raise ValueError(f"backend: {name!r} is not built yet ({PLANNED[name]}); use 'eager' or 'compiled'")
    if name not in BACKENDS:
        raise ValueError(f"backend: {name!r} is not available; choose one of {', '.join(sorted(BACKENDS))}")
    backend_class = BACKENDS[name]
    accepted = sorted(
        parameter.name for parameter in inspect.signature(backend_class).parameters.values()
        if parameter.kind is parameter.KEYWORD_ONLY and parameter.name != "kv_cache"
    )
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"backend_options: {name!r} has no option {', '.join(map(repr, unknown))} "
            f"(its options: {', '.join(accepted) or 'none'})"
        )
    return backend_class(components, kv_cache=kv_cache, **options)


__all__ = ["BACKENDS", "CompiledBackend", "Conditioning", "EagerBackend", "TensorRTBackend", "make_backend"]
