"""Encoding through the checkpoint's own VAE and text encoder, and the UNet's keyword arguments.

A conditioning entry is ComfyUI's ``(cross-attention tensor, extras)``; the UNet receives
``context`` and, for SDXL-type models, ``y`` (pooled text embedding + size embeddings built by the
model's own ``encode_adm``). Sizes follow stock sampling: the width / height a conditioning
carries (``CLIPTextEncodeSDXL``) win, the sample's own latent size is the default.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import comfy.model_base
import torch

from .checkpoints import file_fingerprint

__all__ = ["CheckpointEncoders", "cond_kwargs", "text_cond_kwargs", "latent_decoder"]


class CheckpointEncoders:
    """The checkpoint's VAE and text encoder behind :class:`training.cache.Encoder`."""

    def __init__(self, clip: Any, vae: Any, checkpoint: str | os.PathLike) -> None:
        self.clip, self.vae = clip, vae
        self.fingerprint = file_fingerprint(checkpoint)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels).float().cpu()

    def encode_text(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        out = []
        for caption in captions:
            (tensor, extras), *_ = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(caption))
            entry = {"context": tensor.float().cpu()}
            if extras.get("pooled_output") is not None:
                entry["pooled_output"] = extras["pooled_output"].float().cpu()
            out.append(entry)
        return out

    def image_fingerprint(self) -> str:
        return "vae:" + self.fingerprint

    def text_fingerprint(self) -> str:
        return "text:" + self.fingerprint


def _needs_pooled_output(model: Any) -> bool:
    return isinstance(model.model, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner))


def cond_kwargs(model: Any, entry: tuple[torch.Tensor, dict], latent: torch.Tensor) -> dict[str, torch.Tensor]:
    """UNet keyword arguments of one sample: ``context`` and, for SDXL-type models, ``y`` built at
    this sample's size (``latent`` is its [C, h, w] latent) unless the conditioning sets sizes."""
    tensor, extras = entry
    kwargs = {"context": tensor.float().cpu()}
    if getattr(model.model, "adm_channels", 0):
        if _needs_pooled_output(model) and extras.get("pooled_output") is None:
            raise ValueError(
                f"this {type(model.model).__name__} model needs the pooled text embedding in its conditioning, and this "
                "conditioning has no pooled_output: encode the captions with this checkpoint's own CLIP "
                "(CLIP Text Encode / CLIPTextEncodeSDXL)"
            )
        height, width = latent.shape[-2] * 8, latent.shape[-1] * 8
        # as stock sampling (comfy.samplers.encode_model_conds): the conditioning's own sizes win
        params = {
            "width": width,
            "height": height,
            **{k: v for k, v in extras.items() if v is not None},
            "device": torch.device("cpu"),
        }
        adm = model.model.encode_adm(**params)
        if adm is not None:
            kwargs["y"] = adm.float().cpu()
    return kwargs


def text_cond_kwargs(model: Any, text: dict[str, torch.Tensor], latent: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`cond_kwargs` of an encoded caption as ``CheckpointEncoders.encode_text`` (and the
    latent cache) hold it: ``{"context", optional "pooled_output"}``."""
    return cond_kwargs(model, (text["context"], {"pooled_output": text.get("pooled_output")}), latent)


def latent_decoder(
    model: Any, vae: Any, training_unet: torch.nn.Module | None = None, device: torch.device | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``decode(latents) -> images``: latents [B, C, h, w] in ``model``'s scale (what its UNet samples)
    through ``vae`` into ComfyUI IMAGEs [B, H, W, 3] in [0, 1] (CPU float32); training previews.

    With ``training_unet`` (the UNet being trained, on ``device``) a decode that made ComfyUI move
    any of its weights off ``device`` to find memory for the VAE raises a ``RuntimeError`` that says
    what to do, instead of the next training step failing on tensors of two devices.
    """
    if vae is None:
        raise ValueError("previews need a VAE to decode the sampled latents")

    def decode(latents: torch.Tensor) -> torch.Tensor:
        images = vae.decode(model.model.process_latent_out(latents.float().cpu()))
        if training_unet is not None and device is not None:
            moved = any(p.device.type != device.type for p in training_unet.parameters())
            if moved:
                raise RuntimeError(
                    "decoding a training preview needed the memory of the model being trained (ComfyUI offloaded "
                    "it): lower preview_width / preview_height, or set preview_every 0 (previews off)"
                )
        return images.float().cpu().clamp(0, 1)

    return decode
