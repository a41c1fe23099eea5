"""Independent re-implementations used as test oracles (written from docs/MATH.md and ComfyUI's
documented behaviour, not from d2f_core): ComfyUI's log-sigma interpolation, its EPS and
V_PREDICTION denoisers, and a DDIM step in VP coordinates."""

from __future__ import annotations

import torch


def comfy_log_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ComfyUI ``ModelSamplingDiscrete``: ``sigmas = ((1 - ac) / ac) ** 0.5``, stored as logs."""
    ac = alphas_cumprod.to(torch.float64)
    return (((1 - ac) / ac) ** 0.5).log()


def comfy_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ComfyUI ``ModelSamplingDiscrete.sigma(timestep)``: VE k, log-linear between integers."""
    log_sigmas = comfy_log_sigmas(alphas_cumprod)
    t = torch.clamp(t.to(torch.float64), 0, len(log_sigmas) - 1)
    low = t.floor().long()
    high = t.ceil().long()
    w = t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def fm_to_ve(sigma: torch.Tensor) -> torch.Tensor:
    """k = sigma / (1 - sigma)."""
    return sigma / (1 - sigma)


def comfy_denoised(prediction: str, out: torch.Tensor, x_ve: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """ComfyUI's unpatched ``calculate_denoised`` (sigma_data = 1) on the VE state ``x_ve``."""
    k = k.reshape(-1, *([1] * (x_ve.ndim - 1)))
    if prediction == "eps":
        return x_ve - out * k
    return x_ve / (k**2 + 1) - out * k / (k**2 + 1) ** 0.5


def ddim_step(
    prediction: str, out: torch.Tensor, x_tau: torch.Tensor, ac: torch.Tensor, ac_next: torch.Tensor
) -> torch.Tensor:
    """One deterministic DDIM (eta = 0) step in VP coordinates from alpha-bar ``ac`` to ``ac_next``."""
    shape = (-1,) + (1,) * (x_tau.ndim - 1)
    a, s = ac.sqrt().reshape(shape), (1 - ac).sqrt().reshape(shape)
    a2, s2 = ac_next.sqrt().reshape(shape), (1 - ac_next).sqrt().reshape(shape)
    if prediction == "eps":
        eps = out
        x0 = (x_tau - s * eps) / a
    else:
        x0 = a * x_tau - s * out
        eps = s * x_tau + a * out
    return a2 * x0 + s2 * eps


def oracle_sigma_fm(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """FM sigma of fractional timestep ``t`` by the documented convention: ComfyUI's log-k
    interpolation, and linear in FM sigma in a segment whose end has k = 0 or inf."""
    ac = alphas_cumprod.to(torch.float64)
    a, s = ac.sqrt(), (1 - ac).sqrt()
    table = s / (a + s)
    t = torch.clamp(t.to(torch.float64), 0, len(ac) - 1)
    low = t.floor().long().clamp(max=len(ac) - 2)
    w = t - low
    log_k = comfy_log_sigmas(ac)
    finite = torch.isfinite(log_k[low]) & torch.isfinite(log_k[low + 1])
    k = ((1 - w) * log_k[low].nan_to_num(0, 0, 0) + w * log_k[low + 1].nan_to_num(0, 0, 0)).exp()
    return torch.where(finite, k / (1 + k), (1 - w) * table[low] + w * table[low + 1])
