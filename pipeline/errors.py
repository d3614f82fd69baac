"""Errors the engine raises on purpose; each message names what was wrong."""


class ModelLoadError(RuntimeError):
    """A model could not be loaded: missing path, unreachable hub, wrong format, bad weights."""


class BackendUnavailable(ValueError):
    """The chosen backend cannot start here (TensorRT or its engines missing, torch.compile
    unavailable or failing); another backend may. The message is one line naming why."""


class UnsafeWeightsError(ModelLoadError):
    """Pickle-based weights (.ckpt, .pt, .pth, .bin) refused without an explicit opt-in."""


def innermost_line(exc: BaseException, limit: int = 300) -> str:
    """The innermost error's type and first line (dynamo wraps a compiler's error in its own)."""
    while (inner := getattr(exc, "inner_exception", None) or exc.__cause__) is not None and inner is not exc:
        exc = inner
    lines = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a device running out of memory (torch.OutOfMemoryError, or an
    allocator's error that says so)."""
    return "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower()


def release_cached_memory() -> None:
    """Hand the blocks torch's CUDA allocator keeps cached back to the device (after an
    out-of-memory error); nothing where CUDA was never used. Imports nothing itself."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
