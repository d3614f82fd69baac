"""Errors the engine raises on purpose; each message names what was wrong."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded: missing path, unreachable hub, wrong format, bad weights."""


class BackendUnavailable(ValueError):
    """The chosen backend cannot start here (TensorRT or its engines missing, torch.compile
    unavailable or failing); another backend may. The message is one line naming why."""


class UnsafeWeightsError(ModelLoadError):
    """Pickle-based weights (.ckpt, .pt, .pth, .bin) refused without an explicit opt-in."""
