"""The bad-output check: an output with NaN or inf, or all black from a picture that is not,
is caught on the device (no host synchronisation on a GPU) and replaced by the last good one."""

from __future__ import annotations

import torch

# Outputs at or below this in every channel are black once converted to 8 bits ([-1, 1] scale).
BLACK_LEVEL = -1.0 + 2.0 / 255.0


def output_faults(output: torch.Tensor, source: torch.Tensor | None, *, branch: bool | None = None) -> torch.Tensor:
    """(non-finite, black) flags of an output in [-1, 1] as a (2,) int64 tensor, from one reduction:
    NaN and +-inf show in the minimum or maximum; "black" means every value is black in 8 bits
    while the source (when given) is not, since a black scene may stay black. `branch`: look at
    the source only when the output is black (a host synchronisation); by default on a CPU only."""
    low, high = torch.aminmax(output)
    finite = torch.isfinite(low) & torch.isfinite(high)
    black = finite & (high <= BLACK_LEVEL)
    if branch is None:
        branch = output.device.type == "cpu"
    if source is not None and (not branch or bool(black)):
        black = black & (source.amax() > BLACK_LEVEL)
    return torch.stack([~finite, black]).to(torch.int64)


def keep_good(output: torch.Tensor, previous: torch.Tensor, source: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, or `previous` when it is bad; its fault flags), chosen on the device without a
    branch (no host synchronisation; what a GPU and a fused step run)."""
    faults = output_faults(output, source, branch=False)
    return torch.where(faults.any(), previous, output), faults
