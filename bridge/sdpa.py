"""The attention kernels a benchmark may use (`sdbridge bench --sdpa`): torch's own choice, or one
family only. Importing this module does not import torch (the CLI reads its choices)."""

from __future__ import annotations

import contextlib

SDPA_KERNELS = ("auto", "flash", "efficient", "cudnn", "math")


def sdpa_choice(name: str):
    """The context in which scaled_dot_product_attention may use only kernel family `name` (and
    the plain math fallback, for a shape that family does not take); "auto" changes nothing.
    Compilation happens inside it too, so compiled graphs bake the same choice in."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name not in SDPA_KERNELS:
        raise ValueError(f"sdpa: {name!r} must be one of {', '.join(SDPA_KERNELS)}")
    if name == "auto":
        return contextlib.nullcontext()
    family = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([family] if family == SDPBackend.MATH else [family, SDPBackend.MATH])
