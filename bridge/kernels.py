"""The kernel choices a benchmark may make (`sdbridge bench --sdpa`, `--cudnn-benchmark`), to
compare with torch's own. Importing this module does not import torch (the CLI reads
SDPA_KERNELS for its choices)."""

from __future__ import annotations

import contextlib

SDPA_KERNELS = ("auto", "flash", "efficient", "cudnn", "math")


@contextlib.contextmanager
def kernel_choices(*, cudnn_benchmark: bool = False, sdpa: str = "auto"):
    """Inside: with `cudnn_benchmark`, cuDNN times its algorithms for each convolution shape at
    the first call and keeps the fastest; scaled_dot_product_attention may use only the kernel
    family `sdpa` (and the plain math fallback, for a shape that family does not take; "auto"
    leaves torch's choice). Compilation inside bakes the same choices in. Both are process-wide
    flags of torch, put back as they were on leaving."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if sdpa not in SDPA_KERNELS:
        raise ValueError(f"sdpa: {sdpa!r} must be one of {', '.join(SDPA_KERNELS)}")
    family = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}.get(sdpa)
    attention = contextlib.nullcontext() if family is None else sdpa_kernel(
        [family] if family == SDPBackend.MATH else [family, SDPBackend.MATH])
    benchmark_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark_before or cudnn_benchmark
    try:
        with attention:
            yield
    finally:
        torch.backends.cudnn.benchmark = benchmark_before
