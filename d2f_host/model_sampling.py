"""A model's sampling as ComfyUI holds it: classification, the alignment, and the flow patches.

The Diff2Flow model sampling is a ComfyUI ``CONST`` (flow) model sampling backed by
:class:`d2f_core.Diff2Flow`, patched onto a clone with ``ModelPatcher.add_object_patch`` (the
pattern of ComfyUI's own ModelSamplingDiscrete node). It makes the diffusion UNet a flow-matching
model in ComfyUI's flow convention (sigma = 1 is noise, ``denoised = x - sigma * v``):

- ``calculate_input``: ``x_sigma / n(sigma)``, the VP state the UNet was trained on;
- ``timestep``: the exact inverse of ComfyUI's log-sigma interpolation (fractional timesteps);
- ``calculate_denoised``: the closed-form data estimate from the raw eps / v output;
- ``sigmas`` buffer: the FM sigma of every integer timestep, so every stock scheduler works;
- ``noise_scaling`` / ``inverse_noise_scaling`` come from ``CONST``.

Stock ``euler`` on such a model is FM Euler, since ``(x - denoised) / sigma = v``
(docs/MATH.md section 4).
"""

from __future__ import annotations

from typing import Any

import comfy.model_sampling as cms
import torch

from d2f_core import Diff2Flow, get_objective
from d2f_core.schedules import alphas_cumprod_from_discrete_sigmas

__all__ = [
    "Diff2FlowModelSampling",
    "prediction_of",
    "schedule_of",
    "alignment_of",
    "patch_model",
    "naive_flow_sampling",
    "flow_model_for",
    "is_patched",
    "is_flow_model",
    "flow_sigma_max",
]


# ---------------------------------------------------------------------- classification
def _is_plain_discrete_vp(ms: object) -> bool:
    """ModelSamplingDiscrete with its own log-sigma table (not EDM, LCM-distilled or Cascade)."""
    if not isinstance(ms, cms.ModelSamplingDiscrete):
        return False
    refused = [cms.ModelSamplingDiscreteEDM, cms.StableCascadeSampling]
    # ComfyUI's LCM model sampling lives in comfy_extras; refuse it by its base's name
    if any(isinstance(ms, cls) for cls in refused) or any(
        c.__name__ == "ModelSamplingDiscreteDistilled" for c in type(ms).__mro__
    ):
        return False
    return type(ms).sigma is cms.ModelSamplingDiscrete.sigma


def prediction_of(ms: object) -> str:
    """``"eps"`` or ``"v"`` for a convertible model sampling; ``ValueError`` saying why not otherwise."""
    name = type(ms).__name__
    if isinstance(ms, cms.CONST):
        raise ValueError(
            f"this model is already a flow model ({name}: SD3, Flux, AuraFlow and the like sample as flow "
            "models natively); Diff2Flow converts diffusion models (SD1.x, SD2.x, SDXL). Sample it directly "
            "with the FM scheduler and sampler."
        )
    if not isinstance(ms, cms.EPS):
        raise ValueError(
            f"cannot convert a model with {name} model sampling: Diff2Flow needs a discrete eps- or "
            "v-prediction diffusion model (SD1.x, SD2.x, SDXL)."
        )
    continuous = (cms.ModelSamplingContinuousEDM, cms.ModelSamplingDiscreteEDM)
    if isinstance(ms, cms.EDM) or isinstance(ms, continuous):
        raise ValueError(
            f"cannot convert a model with {name} model sampling: EDM / continuous-time models are not "
            "supported; Diff2Flow needs ComfyUI's discrete 1000-step VP schedule (SD1.x, SD2.x, SDXL)."
        )
    if isinstance(ms, cms.X0) or any(c.__name__ == "LCM" for c in type(ms).__mro__):
        raise ValueError(
            f"cannot convert a model with {name} model sampling: x0 / LCM / img2img prediction is not "
            "supported, only eps and v. Remove the ModelSamplingDiscrete patch that set it."
        )
    if not _is_plain_discrete_vp(ms):
        raise ValueError(
            f"cannot convert a model with {name} model sampling: Diff2Flow needs ComfyUI's discrete "
            "1000-step VP schedule (ModelSamplingDiscrete)."
        )
    return "v" if isinstance(ms, cms.V_PREDICTION) else "eps"


def schedule_of(ms: object) -> tuple[torch.Tensor, str]:
    """(alphas_cumprod in float64, prediction) of a diffusion model sampling, or of the model a
    Diff2Flow patch was made from (its source schedule)."""
    if isinstance(ms, Diff2FlowModelSampling):
        return ms.source_alphas_cumprod, ms.prediction
    prediction = prediction_of(ms)
    return alphas_cumprod_from_discrete_sigmas(ms.sigmas.detach().cpu()), prediction


def alignment_of(model: Any, zero_terminal_snr: bool = False) -> Diff2Flow:
    """The alignment of a ComfyUI model (``Diff2Flow.for_model`` of its source schedule); a
    ``ValueError`` names the reason when it cannot be converted."""
    ac, prediction = schedule_of(model.get_model_object("model_sampling"))
    return Diff2Flow.for_model(ac, prediction, zero_terminal_snr)


# ---------------------------------------------------------------------- the patches
class Diff2FlowModelSampling(cms.CONST, torch.nn.Module):
    """CONST-type model sampling implementing the Diff2Flow alignment (see module docstring).

    Args:
        alphas_cumprod: the diffusion schedule as read from the incoming model sampling.
        prediction: ``"eps"`` or ``"v"``.
        zero_terminal_snr: zero terminal SNR (v-prediction only; see ``Diff2Flow.for_model``).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str, zero_terminal_snr: bool = False) -> None:
        torch.nn.Module.__init__(self)
        self.source_alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        self.d2f = Diff2Flow.for_model(self.source_alphas_cumprod, prediction, zero_terminal_snr)
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

    def calculate_denoised(
        self, sigma: torch.Tensor, model_output: torch.Tensor, model_input: torch.Tensor
    ) -> torch.Tensor:
        return self.d2f.denoised(model_output, model_input, sigma)

    def extra_repr(self) -> str:
        return repr(self.d2f)


def patch_model(model: Any, zero_terminal_snr: bool = False) -> Any:
    """A clone of ``model`` (a ComfyUI ModelPatcher) with the Diff2Flow model sampling patched in.

    The input model is left untouched; patching twice equals patching once (an already patched
    model is rebuilt from its source schedule with the options given now). Raises ``ValueError``
    for models that cannot be converted.
    """
    ac, prediction = schedule_of(model.get_model_object("model_sampling"))
    patched = model.clone()
    patched.add_object_patch("model_sampling", Diff2FlowModelSampling(ac, prediction, zero_terminal_snr))
    return patched


def naive_flow_sampling(num_timesteps: int = 1000) -> Any:
    """Model sampling of a naive-FM fine-tune: input x_sigma as is, timestep T * sigma, output v."""

    class NaiveFlowSampling(cms.ModelSamplingDiscreteFlow, cms.CONST):
        pass

    ms = NaiveFlowSampling()
    ms.set_parameters(shift=1.0, timesteps=num_timesteps, multiplier=num_timesteps)
    return ms


def flow_model_for(model: Any, objective: str, zero_terminal_snr: bool = False) -> Any:
    """``model`` as the flow model that a fine-tune under ``objective`` samples as (the registry's
    ``Objective.flow_model``): the Diff2Flow patch, or the naive-flow model sampling."""
    if get_objective(objective).flow_model == "naive":
        flow = model.clone()
        flow.add_object_patch("model_sampling", naive_flow_sampling())
        return flow
    return patch_model(model, zero_terminal_snr)


def is_patched(model: Any) -> bool:
    return isinstance(model.get_model_object("model_sampling"), Diff2FlowModelSampling)


def is_flow_model(model: Any) -> bool:
    """A flow model already: Diff2Flow-patched, naive-flow, or a native flow model (SD3, Flux)."""
    return isinstance(model.get_model_object("model_sampling"), cms.CONST)


def flow_sigma_max(model: Any) -> float:
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
