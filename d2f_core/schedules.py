"""Discrete variance-preserving (VP) noise schedules, as ``alphas_cumprod`` tables.

A schedule is the table ``alphas_cumprod[tau]`` for integer diffusion timesteps
``tau = 0 .. T-1`` (float64, strictly decreasing). In VP form a noisy sample is
``x_tau = sqrt(alphas_cumprod[tau]) * x0 + sqrt(1 - alphas_cumprod[tau]) * eps``
(``docs/MATH.md`` section 2). :class:`d2f_core.Diff2Flow` maps such a table onto the
flow-matching convention (sigma = 1 is noise).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "scaled_linear",
    "linear",
    "cosine",
    "rescale_zero_terminal_snr",
    "alphas_cumprod_from_discrete_sigmas",
    "SCHEDULES",
]


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")


def _alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0)


def scaled_linear(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's schedule (SD1.x, SD2.x, SDXL): betas linear in sqrt(beta).

    ``betas = linspace(sqrt(beta_start), sqrt(beta_end), steps) ** 2`` (ComfyUI calls this
    beta schedule "linear"). Returns ``alphas_cumprod`` as a float64 tensor of length ``steps``.
    """
    _check_steps(steps)
    betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), steps, dtype=torch.float64) ** 2
    return _alphas_cumprod_from_betas(betas)


def linear(steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear beta schedule (Ho et al. 2020). Returns float64 ``alphas_cumprod``."""
    _check_steps(steps)
    betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    return _alphas_cumprod_from_betas(betas)


def cosine(steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule of Nichol & Dhariwal (2021), betas clipped at ``max_beta``.

    Returns float64 ``alphas_cumprod``; the clipping keeps the terminal SNR above zero.
    """
    _check_steps(steps)
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return _alphas_cumprod_from_betas(betas)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Rescale a schedule to zero terminal SNR (Lin et al., WACV 2024, Algorithm 1).

    ``sqrt(alphas_cumprod)`` is shifted and scaled so its first value is kept and its last
    value becomes exactly 0; the last timestep is then pure noise and, after
    :class:`~d2f_core.Diff2Flow` alignment, ``sigma_max == 1``. Only v-prediction models can
    use such a schedule (an eps network cannot express the velocity at pure noise).
    Returns float64.
    """
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    sqrt_ac = ac.sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    if not first > last:
        raise ValueError("alphas_cumprod must decrease from its first to its last entry to be rescaled")
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    return sqrt_ac**2


def alphas_cumprod_from_discrete_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Invert the VE "sigma" table ``k = sqrt((1 - ac) / ac)`` that ComfyUI stores.

    ``alphas_cumprod = 1 / (1 + k**2)``, in float64 (``k = inf`` gives exactly 0).
    """
    k = torch.as_tensor(sigmas, dtype=torch.float64)
    return 1.0 / (1.0 + k**2)


SCHEDULES = {"scaled_linear": scaled_linear, "linear": linear, "cosine": cosine}
