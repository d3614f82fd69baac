"""Backends: anything with `denoise(x_t, t, cond)`, `encode(images)`, `decode(latents)` and `condition(embeds)`.

Chosen at construction by name; nothing is patched in later.
"""

from __future__ import annotations

from ..models import Components
from .eager import Conditioning, EagerBackend

BACKENDS = {"eager": EagerBackend}
# Backends designed but not built yet, with what exists of them so far.
PLANNED = {
    "compiled": "torch.compile + CUDA graphs",
    "tensorrt": "engines can be built with `sdbridge build-engines`; running them is not implemented",
}


def make_backend(name: str, components: Components, *, kv_cache: bool):
    """The backend registered as `name`, or ValueError listing the known ones."""
    if name in PLANNED:
        raise ValueError(f"backend: {name!r} is not built yet ({PLANNED[name]}); use 'eager'")
    if name not in BACKENDS:
        raise ValueError(f"backend: {name!r} is not available; choose one of {', '.join(sorted(BACKENDS))}")
    return BACKENDS[name](components, kv_cache=kv_cache)


__all__ = ["BACKENDS", "Conditioning", "EagerBackend", "make_backend"]
