"""The pieces the demo and the paper-comparison benchmark share: fine-tuning data, adapters,
velocity functions, samplers and metrics for the tiny UNet.

Time convention (docs/MATH.md section 1): FM sigma in [0, 1], sigma = 1 is noise,
``x_sigma = (1 - sigma) x0 + sigma noise``, velocity ``v = noise - x0``; diffusion timesteps
``tau`` in 0..999 on SD's scaled-linear schedule appear only inside ``d2f_core.Diff2Flow``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

import d2f_core
from d2f_core.lora import WeightAdapter, attach_parametrizations, make_adapter, select_target_modules
from training import TrainingData

from .classifier import DigitClassifier, predict
from .data import split_halves
from .fid import frechet_distance
from .model import NULL_CLASS, ClassEncoder, TinyUNet

VelocityFn = Callable[..., torch.Tensor]
ADAPTER_KINDS = ("lora", "full")


def attach_adapters(
    unet: TinyUNet, kind: str, rank: int = 8, targets: str = "all", seed: int = 0
) -> dict[str, WeightAdapter]:
    """Attach fresh adapters to ``unet`` (in place; its own weights are frozen): ``"lora"`` of
    ``rank`` (alpha = rank, so the LoRA scale is 1) or ``"full"`` (``d2f_core.lora.FullAdapter``: a zero-initialised
    dense delta, so ``training.Trainer`` trains every weight of the targeted layers with the same loop, data draws
    and objectives as it trains LoRA)."""
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"adapter kind {kind!r} is unknown: choose one of {', '.join(ADAPTER_KINDS)}")
    unet.requires_grad_(False)
    modules = select_target_modules(unet, targets)
    gen = torch.Generator().manual_seed(seed)
    if kind == "lora":
        adapters = {name: make_adapter("LoRA", m.weight.shape, rank, float(rank), gen) for name, m in modules.items()}
    else:
        adapters = {name: make_adapter("Full", m.weight.shape, 1, 1.0) for name, m in modules.items()}
    attach_parametrizations(modules, adapters)
    return adapters


def fresh_copy(unet: TinyUNet) -> TinyUNet:
    """A deep copy to attach adapters to (the loaded base model stays untouched)."""
    return copy.deepcopy(unet)


def contexts(encoder: ClassEncoder, labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder(torch.as_tensor(labels, dtype=torch.long))


def training_data(images: torch.Tensor, labels: torch.Tensor, encoder: ClassEncoder) -> TrainingData:
    """``training.TrainingData``: one [1, 16, 16] latent per image with its class tokens
    (batch dimension 1), and the null class as the caption-dropout conditioning."""
    ctx = contexts(encoder, labels)
    return TrainingData(
        latents=[img for img in images],
        conds=[{"context": c[None]} for c in ctx],
        uncond={"context": contexts(encoder, [NULL_CLASS])},
    )


def velocity_model(objective: str, unet: nn.Module, d2f: d2f_core.Diff2Flow) -> VelocityFn:
    """The model as an FM velocity function ``fn(x_sigma, sigma, context)``: naive-FM models take
    their raw output as the velocity; diffusion and Diff2Flow models are converted in closed form."""
    return d2f_core.get_objective(objective).velocity_fn(unet, d2f)


@torch.no_grad()
def sample(
    velocity: VelocityFn,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    cfg_scale: float = 1.0,
    batch: int = 500,
) -> torch.Tensor:
    """FM Euler from ``sigmas[0] * noise`` (the noise end of the FM interpolant, less the
    ``(1 - sigma_max) x0`` the sampler cannot know) with classifier-free guidance."""
    out = []
    for c, n in zip(cond.split(batch), noise.split(batch)):
        guided = d2f_core.cfg_velocity(velocity, c, uncond.expand_as(c), cfg_scale)
        out.append(d2f_core.sample_euler(guided, float(sigmas[0]) * n, sigmas))
    return torch.cat(out)


@dataclass
class Evaluation:
    """Sample metrics against the real images of the evaluated classes."""

    fd: float
    accuracy: float  # fraction of samples the classifier labels as the requested digit


def evaluate_samples(
    samples: torch.Tensor, labels: torch.Tensor, real_features: torch.Tensor, classifier: DigitClassifier
) -> Evaluation:
    predicted, feats = predict(classifier, samples)
    return Evaluation(frechet_distance(feats, real_features), float((predicted == labels).float().mean()))


def validation_loss(velocity: VelocityFn, images: torch.Tensor, ctx: torch.Tensor, seed: int = 0) -> float:
    """``d2f_core.fm_validation_loss``: FM velocity MSE at 8 fixed sigmas with fixed noise, the
    comparable loss of every objective (docs/MATH.md section 6)."""
    value = d2f_core.fm_validation_loss(velocity, images, ctx, seed=seed)["mean"]
    if not math.isfinite(value):
        raise FloatingPointError("the FM validation loss is not finite")
    return value


def balanced_labels(classes: Sequence[int], n: int) -> torch.Tensor:
    """``n`` labels cycling through ``classes`` (equal counts up to one)."""
    return torch.as_tensor(list(classes), dtype=torch.long).repeat(math.ceil(n / len(classes)))[:n]


def fixed_noise(n: int, seed: int, shape: Sequence[int] = (1, 16, 16)) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def data_floor(real_features: torch.Tensor, seed: int = 0) -> float:
    """FD between two disjoint random halves of the real data: what "as good as data" scores
    at this sample size (the FD estimator is biased upwards for small samples)."""
    return frechet_distance(*split_halves(real_features, seed))
