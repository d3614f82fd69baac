"""The stream's noise: one seed's, or a blend of several seeds' that keeps the noise's statistics.

A blend is what lets a fader morph between two noise patterns: with weights (1 - t, t), t going
from 0 to 1 carries the picture's grain and composition from one seed's to the other's through
pictures in between, where changing the seed itself jumps.
"""

from __future__ import annotations

import math

import torch

MAX_SEEDS = 8  # pairs in one blend


def seeded_noise(shape: tuple[int, ...], seed: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of `shape`, the same for the same seed, shape, device and dtype."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def blend_weights(weights: list[float]) -> list[float]:
    """The factors of a variance-preserving blend: `weights` divided by their Euclidean norm.

    Independent standard normal noises n_i summed as sum(w_i * n_i) have variance sum(w_i^2);
    scaled by 1 / sqrt(sum(w_i^2)) the blend is standard normal again, whatever the weights (a
    plain weighted mean of two seeds at 0.5 each would have variance 0.5: a washed-out picture
    halfway through a morph). Only the ratios of the weights matter."""
    if not weights or any(not math.isfinite(w) or w < 0.0 for w in weights) or not any(w > 0.0 for w in weights):
        raise ValueError(f"seed_blend: weights {list(weights)} must be finite, non-negative and not all zero")
    norm = math.sqrt(sum(w * w for w in weights))
    return [w / norm for w in weights]


def blended_noise(shape: tuple[int, ...], pairs, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """sum(f_i * noise(seed_i)) with f = blend_weights(weights), for `pairs` of (seed, weight).

    Each seed's noise is exactly `seeded_noise`'s, so a blend of one seed (or with every other
    weight 0) is that seed's noise; summed in float32, returned in `dtype`."""
    factors = blend_weights([float(weight) for _, weight in pairs])
    total = torch.zeros(shape, device=device, dtype=torch.float32)
    for (seed, _), factor in zip(pairs, factors):
        if factor > 0.0:
            total += seeded_noise(shape, seed, device=device, dtype=dtype).float() * factor
    return total.to(dtype)
