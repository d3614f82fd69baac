"""Classifier-free guidance and StreamDiffusion's residual CFG, one small rule per cfg type.

Every rule answers two questions: how many rows of the UNet batch are predicted with the
negative prompt (they are placed first, copies of the first rows of the latents), and what
the negative noise prediction is. RCFG (StreamDiffusion sec. 3.3) replaces the negative
prediction with the "virtual residual noise" carried with each frame (`stock`), so `self`
costs no extra UNet rows and `initialize` costs one row per frame, at its first step only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .schedule import lcm_denoise, to_epsilon

if TYPE_CHECKING:
    from .config import StreamConfig


@dataclass(frozen=True)
class GuidanceRule:
    """How one cfg type builds the UNet batch and its negative prediction."""

    name: str
    uses_stock: bool  # carries the virtual residual noise with each frame

    def uncond_rows(self, rows: int, first_step_rows: int) -> int:
        """Rows of the batch to predict with the negative prompt when guidance is on."""
        return 0

    def negative(self, raw_uncond: torch.Tensor, stock: torch.Tensor | None, delta: float):
        """(negative eps for every row, the stock noise as used) from the raw negative rows."""
        raise NotImplementedError


class _NoGuidance(GuidanceRule):
    def negative(self, raw_uncond, stock, delta):
        raise AssertionError("cfg_type 'none' has no negative prediction")


class _FullCFG(GuidanceRule):
    """Standard CFG (Ho & Salimans 2022): the whole batch again with the negative prompt."""

    def uncond_rows(self, rows, first_step_rows):
        return rows

    def negative(self, raw_uncond, stock, delta):
        return raw_uncond, stock


class _SelfNegative(GuidanceRule):
    """RCFG self-negative: eps_neg = delta * virtual residual noise (StreamDiffusion eq. 9)."""

    def negative(self, raw_uncond, stock, delta):
        return delta * stock, stock


class _OnetimeNegative(GuidanceRule):
    """RCFG onetime-negative: the true negative at each frame's first step, carried after it."""

    def uncond_rows(self, rows, first_step_rows):
        return first_step_rows

    def negative(self, raw_uncond, stock, delta):
        stock = torch.cat([raw_uncond, stock[raw_uncond.shape[0]:]], dim=0)  # (rows, 4, h, w)
        return delta * stock, stock


RULES: dict[str, GuidanceRule] = {
    "none": _NoGuidance("none", uses_stock=False),
    "full": _FullCFG("full", uses_stock=False),
    "self": _SelfNegative("self", uses_stock=True),
    "initialize": _OnetimeNegative("initialize", uses_stock=True),
}


def combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """eps = eps_neg + w (eps_cond - eps_neg) (Ho & Salimans 2022, eq. 6)."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def guided_x0(
    raw: torch.Tensor,
    x_in: torch.Tensor,
    alpha_sqrt_in: torch.Tensor,
    beta_sqrt_in: torch.Tensor,
    x_t: torch.Tensor,
    alpha_sqrt: torch.Tensor,
    beta_sqrt: torch.Tensor,
    c_skip: torch.Tensor,
    c_out: torch.Tensor,
    stock: torch.Tensor | None,
    delta: torch.Tensor,
    guidance_scale: torch.Tensor,
    *,
    uncond: int,
    guided: bool,
    cfg_type: str,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Everything after one UNet call: (x0, guided eps, stock as used).

    `raw` (uncond + rows, 4, h, w) is the UNet's output for `x_in`, the latents `x_t` (rows, ...)
    with their first `uncond` rows in front again for the negative prompt (0: guidance off, or a
    rule without negative rows); `*_in` are x_in's coefficients, the others x_t's, all (rows,).
    `guided`: guidance is on (the cfg type's negative and the guidance scale apply). A pure
    function of tensors and constants, so the compiled backend can fuse it (pipeline/step_math.py)."""
    eps_all = to_epsilon(raw, x_in, alpha_sqrt_in, beta_sqrt_in, prediction_type)
    eps = eps_all[uncond:]
    if guided:
        eps_negative, stock = RULES[cfg_type].negative(eps_all[:uncond], stock, delta)
        eps = combine(eps_negative, eps, guidance_scale)
    x0 = lcm_denoise(eps, x_t, alpha_sqrt, beta_sqrt, c_skip, c_out)
    return x0, eps, stock


def next_stock_noise(
    eps: torch.Tensor,
    stock: torch.Tensor,
    next_noise: torch.Tensor,
    alpha_sqrt: torch.Tensor,
    beta_sqrt: torch.Tensor,
    c_skip: torch.Tensor,
    c_out: torch.Tensor,
    alpha_sqrt_next: torch.Tensor,
    beta_sqrt_next: torch.Tensor,
) -> torch.Tensor:
    """The virtual residual noise of x_{t_{i+1}} after step i (StreamDiffusion eq. 7-8).

    The consistency function applied to the noise part sqrt(1-a_i) * stock gives how far the
    prediction moved; rescaled to step i+1 and added to the noise that re-noises the frame.
    All scalars are (rows,).
    """
    beta = beta_sqrt.view(-1, 1, 1, 1)
    delta_x = lcm_denoise(eps, beta * stock, alpha_sqrt, beta_sqrt, c_skip, c_out)  # (rows, 4, h, w)
    scale = (alpha_sqrt_next / beta_sqrt_next).view(-1, 1, 1, 1)
    return next_noise + scale * delta_x


def unet_calls(config: StreamConfig) -> list[tuple[int, int]]:
    """(rows, first-step rows) of each UNet call of one frame, before guidance rows are added."""
    b, n = config.frame_buffer_size, config.denoising_steps
    return [(n * b, b)] if config.use_denoising_batch else [(b, b)] + [(b, 0)] * (n - 1)


def unet_batches(config: StreamConfig) -> tuple[int, ...]:
    """Every UNet batch size these settings can reach, guidance on or off (as `_guided_step` builds them)."""
    rule = RULES[config.cfg_type]
    calls = unet_calls(config)
    sizes = {rows for rows, _ in calls}  # guidance off
    if config.cfg_type != "none":
        sizes |= {rows + rule.uncond_rows(rows, first) for rows, first in calls}
    return tuple(sorted(sizes))
