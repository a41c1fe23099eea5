"""The Diff2Flow model sampling: a ComfyUI ``CONST`` (flow) model sampling backed by d2f_core.

Patched onto a clone of an SD model with ``ModelPatcher.add_object_patch("model_sampling", ...)``
(the pattern of ComfyUI's own ModelSamplingDiscrete node), it makes the diffusion UNet a
flow-matching model in ComfyUI's flow convention (sigma = 1 is noise, ``denoised = x - sigma * v``):

- ``calculate_input``: ``x_sigma / n(sigma)``, the VP state the UNet was trained on;
- ``timestep``: the exact inverse of ComfyUI's log-sigma interpolation (fractional timesteps);
- ``calculate_denoised``: the closed-form data estimate from the raw eps / v output;
- ``sigmas`` buffer: the FM sigma of every integer timestep, so every stock scheduler works;
- ``noise_scaling`` / ``inverse_noise_scaling`` come from ``CONST``.

Stock ``euler`` on such a model is FM Euler, since ``(x - denoised) / sigma = v``.
"""
from __future__ import annotations

from typing import Optional

import torch

import comfy.model_sampling as cms

from d2f_core import Diff2Flow, rescale_zero_terminal_snr

from ..training.host import prediction_of, schedule_of

__all__ = ["Diff2FlowModelSampling", "diff2flow_sampling_for", "patch_model", "is_patched", "flow_sigma_max", "prediction_of"]


class Diff2FlowModelSampling(cms.CONST, torch.nn.Module):
    """CONST-type model sampling implementing the Diff2Flow alignment (see module docstring).

    Args:
        alphas_cumprod: the diffusion schedule as read from the incoming model sampling.
        prediction: ``"eps"`` or ``"v"``.
        zero_terminal_snr: rescale the schedule to zero terminal SNR (v-prediction only).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str, zero_terminal_snr: bool = False) -> None:
        torch.nn.Module.__init__(self)
        self.source_alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        self.requested_zero_terminal_snr = bool(zero_terminal_snr)
        ac = self.source_alphas_cumprod
        if zero_terminal_snr:
            if prediction != "v":
                raise ValueError(
                    "zero_terminal_snr is only valid for v-prediction models: this model predicts eps. "
                    "Turn zero_terminal_snr off (eps models sample from sigma_max = 0.936 instead)."
                )
            ac = rescale_zero_terminal_snr(ac)
        self.d2f = Diff2Flow(ac, prediction)
        self.prediction = self.d2f.prediction
        self.sigma_data = 1.0
        self.num_timesteps = self.d2f.num_timesteps
        self.register_buffer("sigmas", self.d2f.sigma_table.float())

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.d2f.timestep(sigma)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return self.d2f.sigma(timestep)

    def percent_to_sigma(self, percent: float) -> float:
        # the same noise level ModelSamplingDiscrete gives that percentage, in FM sigma, so
        # ControlNet / conditioning ranges act at the same points of the trajectory
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(self.d2f.sigma(torch.tensor((1.0 - percent) * (self.num_timesteps - 1), dtype=torch.float64)))

    def calculate_input(self, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.d2f.model_input(noise, sigma)

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, model_input: torch.Tensor) -> torch.Tensor:
        return self.d2f.denoised(model_output, model_input, sigma)

    def extra_repr(self) -> str:
        return repr(self.d2f)


def diff2flow_sampling_for(ms: object, zero_terminal_snr: bool = False) -> Diff2FlowModelSampling:
    """The Diff2Flow model sampling for the model sampling ``ms`` currently on a model.

    Patching twice equals patching once: an already patched model is rebuilt from its original
    schedule with the options given now.
    """
    if isinstance(ms, Diff2FlowModelSampling):
        return Diff2FlowModelSampling(ms.source_alphas_cumprod, ms.prediction, zero_terminal_snr)
    ac, prediction = schedule_of(ms)
    return Diff2FlowModelSampling(ac, prediction, zero_terminal_snr)


def patch_model(model, zero_terminal_snr: bool = False):
    """A clone of ``model`` (a ComfyUI ModelPatcher) with the Diff2Flow model sampling patched in.

    The input model is left untouched. Raises ``ValueError`` for models that cannot be converted.
    """
    ms = diff2flow_sampling_for(model.get_model_object("model_sampling"), zero_terminal_snr)
    patched = model.clone()
    patched.add_object_patch("model_sampling", ms)
    return patched


def is_patched(model) -> bool:
    return isinstance(model.get_model_object("model_sampling"), Diff2FlowModelSampling)


def flow_sigma_max(model) -> float:
    """The noisiest FM sigma a flow model (patched or native CONST) can be sampled from.

    Values within 1e-6 of 1 count as 1. Raises ``ValueError`` for a diffusion model that was not
    converted, naming the node to add.
    """
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, cms.CONST):
        raise ValueError(
            f"the model is not a flow model ({type(ms).__name__}): connect it through 'Diff2Flow Model Patch' "
            "(or load it with 'Diff2Flow Checkpoint Loader') before the FM scheduler."
        )
    sigma_max = float(ms.sigma_max)
    return 1.0 if sigma_max >= 1.0 - 1e-6 else sigma_max


def zero_terminal_snr_of(model) -> Optional[bool]:
    ms = model.get_model_object("model_sampling")
    return ms.d2f.zero_terminal_snr if isinstance(ms, Diff2FlowModelSampling) else None
