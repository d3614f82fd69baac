"""sdbridge's diffusion engine: StreamDiffusion's stream-batch pipeline as a small library.

    from pipeline import StreamConfig, StreamDiffusion, random_components
    engine = StreamDiffusion(random_components("tiny"), StreamConfig(width=256, height=256))
    engine.set_prompt("a watercolor city at night")
    out = engine(frame)  # numpy uint8 (H, W, 3) RGB in, the same kind out
"""

from .config import CFG_TYPES, MODES, StreamConfig, t_index_list_from_strength
from .errors import BackendUnavailable, ModelLoadError, UnsafeWeightsError
from .models import ARCHS, Components, random_components
from .schedule import NoiseSchedule
from .stream import RUNTIME_SETTINGS, StreamDiffusion, StreamStats


def load_components(model_id_or_path: str, **options) -> Components:
    """Load a hub id, a diffusers folder or a single-file checkpoint (see pipeline.loading)."""
    from .loading import load_components as _load

    return _load(model_id_or_path, **options)


__all__ = [
    "ARCHS",
    "CFG_TYPES",
    "MODES",
    "RUNTIME_SETTINGS",
    "Components",
    "BackendUnavailable",
    "ModelLoadError",
    "NoiseSchedule",
    "StreamConfig",
    "StreamDiffusion",
    "StreamStats",
    "UnsafeWeightsError",
    "load_components",
    "random_components",
    "t_index_list_from_strength",
]
