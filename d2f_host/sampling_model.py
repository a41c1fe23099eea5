"""A checkpoint (+ LoRA) ready for FM sampling outside a graph: what the headless ``sample`` and
``pairs`` commands sample with."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import d2f_core
from d2f_core import Diff2Flow, Objective
from d2f_core.lora_metadata import LoraMetadata, SamplingDefaults, read_lora_metadata

from .checkpoints import apply_lora, base_model_hash, load_checkpoint
from .conditioning import CheckpointEncoders
from .errors import OptionError
from .model_sampling import alignment_of
from .unet import inference_network


@dataclass
class SamplingModel:
    """The velocity function of the objective the model was trained with, its alignment, encoders,
    the device it runs on, the LoRA's Diff2Flow metadata (``None`` without one) and the base UNet's
    fingerprint."""

    model: Any
    vae: Any
    encoders: CheckpointEncoders
    d2f: Diff2Flow
    velocity: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]  # (x_sigma, sigma, cond kwargs) -> v
    device: torch.device
    objective: Objective  # the objective the model samples as
    metadata: LoraMetadata | None
    base_hash: str

    def sampling_defaults(self) -> SamplingDefaults:
        """Sampler, steps and cfg when none are given: the LoRA's recorded ones, else its objective's."""
        if self.metadata is not None:
            return self.metadata.sampling_defaults()
        return SamplingDefaults(self.objective.sampler, self.objective.steps, self.objective.cfg)


def load_sampling_model(
    checkpoint: str | os.PathLike,
    lora: str | None = None,
    lora_strength: float = 1.0,
    zero_terminal_snr: bool | None = None,
) -> SamplingModel:
    """``checkpoint`` with ``lora`` applied (its metadata sets the objective and, unless
    ``zero_terminal_snr`` says otherwise, zero terminal SNR). An :class:`OptionError` names ``lora``
    or ``zero_terminal_snr`` when they cannot be used."""
    model, clip, vae = load_checkpoint(checkpoint)
    base_hash = base_model_hash(model)  # before a LoRA is merged into the weights
    metadata = None
    if lora:
        if getattr(read_lora_metadata(lora), "task", "image") == "depth":
            raise OptionError(
                "lora",
                f"{lora} is an image-to-depth model: it draws depth maps of images, not images "
                "from prompts: pass a text-to-image LoRA, or none",
            )
        try:
            model, clip, metadata = apply_lora(model, clip, lora, lora_strength, lora_strength)
        except ValueError as exc:
            raise OptionError("lora", f"{lora}: {exc}") from exc
    zsnr = zero_terminal_snr if zero_terminal_snr is not None else bool(metadata and metadata.zero_terminal_snr)
    try:
        d2f = alignment_of(model, zsnr)
    except ValueError as exc:
        raise OptionError("zero_terminal_snr", str(exc)) from exc
    network, device = inference_network(model)
    objective = d2f_core.get_objective(metadata.objective if metadata else "diff2flow")
    velocity = objective.velocity_fn(lambda x, t, c: network(x, t, **c), d2f)
    return SamplingModel(
        model, vae, CheckpointEncoders(clip, vae, checkpoint), d2f, velocity, device, objective, metadata, base_hash
    )
