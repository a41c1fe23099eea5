"""Flow-matching sampling through ComfyUI's own sampling: the FM sigma grid of a flow model and the FM
samplers of ``d2f_core.SAMPLERS`` as ComfyUI SAMPLERs (used by the sampling nodes and the depth estimate).

Convention: FM sigma in [0, 1], sigma = 1 is noise, ``x_sigma = (1 - sigma) x0 + sigma eps``, ``v = eps - x0``
(docs/MATH.md section 4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import comfy.samplers
import torch

import d2f_core

from .model_sampling import flow_sigma_max

__all__ = ["flow_sigmas", "sample_flow_matching", "fm_sampler"]


def flow_sigmas(model, steps: int, shift: float, denoise: float, start: str = "sigma_max") -> torch.Tensor:
    """The uniform FM sigma grid of d2f_core for a flow model, as float32 SIGMAS (``start``: one of
    ``d2f_core.START_RULES``, docs/MATH.md section 10)."""
    return d2f_core.fm_sigmas(steps, sigma_max=flow_sigma_max(model), shift=shift, denoise=denoise, start=start).float()


def sample_flow_matching(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callable[[dict], Any] | None = None,
    disable: bool | None = None,
    sampler: str = "euler",
) -> torch.Tensor:
    """k-diffusion-style sampler function: the FM sampler ``sampler`` of ``d2f_core.SAMPLERS`` on a
    flow model.

    ComfyUI's wrapped model returns the data estimate; on a flow model (CONST: sigma = 1 is noise)
    the velocity is ``(x - denoised) / sigma``. The sigmas are never 0 where the model is called.
    """
    extra_args = {} if extra_args is None else extra_args

    def velocity(x_: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        denoised = model(x_, sigma.to(x_.dtype), **extra_args)
        return (x_ - denoised) / sigma.reshape(-1, *([1] * (x_.ndim - 1))).to(x_.dtype)

    def report(info: dict) -> None:
        if callback is not None:
            i = info["i"]
            callback({"x": info["x"], "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": info["denoised"]})

    return d2f_core.get_sampler(sampler)(velocity, x, sigmas, callback=report)


def fm_sampler(name: str = "euler") -> comfy.samplers.KSAMPLER:
    """The FM sampler ``name`` as a SAMPLER for SamplerCustom / SamplerCustomAdvanced."""
    d2f_core.get_sampler(name)  # an unknown name fails here, naming the choices
    return comfy.samplers.KSAMPLER(sample_flow_matching, extra_options={"sampler": name})
