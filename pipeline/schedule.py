"""Noise schedule and LCM step math as pure functions of tensors.

References: DDPM (Ho et al. 2020) eq. 4 for noising; LCM (Luo et al. 2023) eq. 9 for the
boundary-condition scalings c_skip/c_out; StreamDiffusion (Kodaira et al. 2023) sec. 3.2
for stream batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule of a model (from its scheduler config)."""

    beta_start: float = 0.00085  # first beta of the training schedule
    beta_end: float = 0.012  # last beta of the training schedule
    beta_schedule: str = "scaled_linear"  # "scaled_linear" (SD) or "linear"
    num_train_timesteps: int = 1000  # T
    prediction_type: str = "epsilon"  # what the UNet predicts: "epsilon" or "v_prediction"

    def __post_init__(self) -> None:
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(f"beta_schedule: {self.beta_schedule!r} must be 'scaled_linear' or 'linear'")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: {self.prediction_type!r} must be one of {PREDICTION_TYPES}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(f"beta_start/beta_end: {self.beta_start}/{self.beta_end} must satisfy 0 < start < end < 1")

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "NoiseSchedule":
        """Read the fields a diffusers scheduler_config.json carries; others are ignored."""
        return cls(
            beta_start=float(config.get("beta_start", cls.beta_start)),
            beta_end=float(config.get("beta_end", cls.beta_end)),
            beta_schedule=str(config.get("beta_schedule", cls.beta_schedule)),
            num_train_timesteps=int(config.get("num_train_timesteps", cls.num_train_timesteps)),
            prediction_type=str(config.get("prediction_type", cls.prediction_type)),
        )

    def to_scheduler_config(self) -> dict:
        """A diffusers LCMScheduler config with this schedule."""
        return {
            "_class_name": "LCMScheduler",
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule,
            "num_train_timesteps": self.num_train_timesteps,
            "prediction_type": self.prediction_type,
            "steps_offset": 1,
        }


def alphas_cumprod(schedule: NoiseSchedule) -> torch.Tensor:
    """alpha-bar_t = prod_{s<=t} (1 - beta_s) (DDPM eq. 4), float64, shape (T,)."""
    steps = schedule.num_train_timesteps
    if schedule.beta_schedule == "scaled_linear":
        betas = torch.linspace(schedule.beta_start**0.5, schedule.beta_end**0.5, steps, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(schedule.beta_start, schedule.beta_end, steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def lcm_timesteps(num_inference_steps: int, original_steps: int = 50, num_train_timesteps: int = 1000) -> list[int]:
    """LCM's schedule: `num_inference_steps` evenly spaced picks of the `original_steps` grid, noisiest first."""
    k = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]  # (original_steps,) 999, 979, ..., 19
    picks = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in origin[picks]]


def lcm_boundary_scalings(
    timesteps: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of LCM's consistency boundary condition (LCM eq. 9)."""
    scaled = timesteps.double() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


@dataclass(frozen=True)
class StepCoefficients:
    """Per-denoising-step scalars, each of shape (n,), float32 on the engine's device."""

    timesteps: torch.Tensor  # t_i, int64
    alpha_sqrt: torch.Tensor  # sqrt(alpha-bar_{t_i})
    beta_sqrt: torch.Tensor  # sqrt(1 - alpha-bar_{t_i})
    c_skip: torch.Tensor  # LCM boundary scaling of x_t
    c_out: torch.Tensor  # LCM boundary scaling of the x0 estimate

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def __getitem__(self, rows: slice) -> "StepCoefficients":
        """The coefficients of a slice of rows."""
        return StepCoefficients(*(v[rows] for v in self.as_tuple()))

    def repeat_per_frame(self, frames: int) -> "StepCoefficients":
        """Each step's values repeated for `frames` frames: shape (n * frames,), step-major."""
        return StepCoefficients(*(v.repeat_interleave(frames) for v in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return (self.timesteps, self.alpha_sqrt, self.beta_sqrt, self.c_skip, self.c_out)


def step_coefficients(
    schedule: NoiseSchedule,
    t_index_list: tuple[int, ...],
    num_inference_steps: int,
    original_steps: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> StepCoefficients:
    """Everything the per-frame math needs about the chosen steps, computed once per configuration
    (in float64, stored in the engine's dtype so the per-frame math does no conversions)."""
    all_timesteps = lcm_timesteps(num_inference_steps, original_steps, schedule.num_train_timesteps)
    timesteps = torch.tensor([all_timesteps[i] for i in t_index_list], dtype=torch.int64)
    alpha_bar = alphas_cumprod(schedule)[timesteps]  # (n,)
    c_skip, c_out = lcm_boundary_scalings(timesteps)
    values = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt(), c_skip, c_out)
    return StepCoefficients(timesteps.to(device), *(v.to(device=device, dtype=dtype) for v in values))


def _per_sample(scalars: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) in the dtype of `like`, for broadcasting over latents."""
    return scalars.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_sqrt: torch.Tensor, beta_sqrt: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha-bar_t) x0 + sqrt(1 - alpha-bar_t) eps (DDPM eq. 4). Scalars are (B,)."""
    return _per_sample(alpha_sqrt, x0) * x0 + _per_sample(beta_sqrt, x0) * noise  # (B, 4, h, w)


def to_epsilon(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_sqrt: torch.Tensor, beta_sqrt: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The noise prediction eps from the UNet's output (v-prediction: eps = sqrt(a) v + sqrt(1-a) x_t)."""
    if prediction_type == "epsilon":
        return model_output
    return _per_sample(alpha_sqrt, x_t) * model_output + _per_sample(beta_sqrt, x_t) * x_t


def lcm_denoise(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    alpha_sqrt: torch.Tensor,
    beta_sqrt: torch.Tensor,
    c_skip: torch.Tensor,
    c_out: torch.Tensor,
) -> torch.Tensor:
    """LCM's consistency function: c_skip x_t + c_out (x_t - sqrt(1-a) eps) / sqrt(a) (LCM eq. 9)."""
    f_theta = (x_t - _per_sample(beta_sqrt, x_t) * eps) / _per_sample(alpha_sqrt, x_t)  # (B, 4, h, w)
    return _per_sample(c_out, x_t) * f_theta + _per_sample(c_skip, x_t) * x_t
