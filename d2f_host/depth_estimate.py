"""Image to depth with a depth MODEL through ComfyUI's own sampling (the Depth Estimate node and
``python -m training depth``; docs/MATH.md section 13).

For each image: resize to the processing resolution, encode with the VAE, then for each ensemble
member sample the depth latent with FM Euler on the FM sigma grid (``comfy.sample.sample_custom``,
cfg 1; the conditioning is the empty prompt with the image latent as ``concat_latent_image``, Marigold's
condition), decode it, take the channel mean (``d2f_core.depth.image_as_depth``); align the members to
each other and take their median (``d2f_core.depth.ensemble_depth``, Marigold's ensemble), resize
back to the image's size and scale to [0, 1] again (the resize moves the extremes: bilinear, averaged
when shrinking).

Output: affine-invariant depth in [0, 1] per image, Marigold's convention: 0 = near, 1 = far (the
model's output is only known up to scale and shift, so each image's result spans [0, 1]: its nearest
pixel is 0 and its farthest 1; a flat map, which has no depth order, is 0 everywhere).
Time convention: FM sigma in [0, 1], sigma = 1 is noise; the model is Diff2Flow-patched here if it
is not a flow model yet.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable
from typing import Any

import comfy.sample
import comfy.sd
import torch
import torch.nn.functional as F

from d2f_core.depth import ensemble_depth, image_as_depth
from d2f_core.depth_settings import DEFAULT_DEPTH_STEPS, LATENT_SCALE, DepthSettings, processing_size

from .checkpoints import load_checkpoint, recommended_sampling_of
from .depth import latent_channels, load_depth_model, require_image_conditioned
from .errors import HostError
from .marigold import load_marigold_file
from .model_sampling import is_flow_model, patch_model
from .sampling import flow_sigmas, fm_sampler

__all__ = [
    "DepthSettings",
    "depth_steps",
    "empty_prompt",
    "check_depth_inputs",
    "estimate_depth",
    "load_depth_pipeline",
]


def depth_steps(model: Any, steps: int) -> tuple[int, str]:
    """``(steps, where from)``: ``steps`` if given (> 0), else the model's recommended steps (a depth file's
    metadata, a Marigold conversion), else :data:`DEFAULT_DEPTH_STEPS`."""
    if steps > 0:
        return steps, "given"
    rec = recommended_sampling_of(model)
    if rec is not None:
        return rec.steps, f"recommended by {rec.source}"
    return DEFAULT_DEPTH_STEPS, "default (the model recommends none)"


def empty_prompt(clip: Any) -> list:
    """The empty prompt encoded with ``clip`` (Marigold's text condition) as a CONDITIONING."""
    if clip is None:
        raise HostError(
            "the depth estimate needs the checkpoint's text encoder (CLIP) to encode the empty prompt: "
            "connect the CLIP output of the checkpoint loader"
        )
    return clip.encode_from_tokens_scheduled(clip.tokenize(""))


def check_depth_inputs(model: Any, vae: Any, images: torch.Tensor, settings: DepthSettings) -> None:
    """Every check that can fail before compute (``HostError`` / ``ValueError`` naming the input and the fix)."""
    require_image_conditioned(model, "the MODEL")
    if vae is None:
        raise HostError("the depth estimate needs a VAE (the checkpoint's) to encode the images and decode the depth")
    vae_channels = getattr(vae, "latent_channels", None)
    if vae_channels is not None and vae_channels != latent_channels(model):
        raise HostError(
            f"the VAE makes {vae_channels}-channel latents but the MODEL takes {latent_channels(model)}: "
            "connect the VAE of the depth model's own checkpoint"
        )
    if (
        not isinstance(images, torch.Tensor)
        or images.ndim != 4
        or images.shape[-1] not in (3, 4)
        or images.shape[0] < 1
    ):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"image must be an IMAGE batch [B, H, W, 3] (RGB or RGBA), got {shape}")
    if min(images.shape[1:3]) < LATENT_SCALE:
        raise ValueError(
            f"image is {images.shape[2]}x{images.shape[1]} pixels: both sides must be at least {LATENT_SCALE}"
        )
    settings.validate()
    if settings.steps == 0:
        raise ValueError(
            "steps 0 (the model's recommended) must be resolved with depth_steps(model, 0) before the estimate"
        )


def _resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, C, H, W] resized (bilinear, antialiased when shrinking, as Marigold's resize)."""
    if tuple(images.shape[-2:]) == (height, width):
        return images
    return F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def _unit_range(depth: torch.Tensor) -> torch.Tensor:
    """``depth`` ``[B, H, W]`` scaled to [0, 1] per image (min -> 0, max -> 1), float32; a flat map -> 0
    (the same guard as ``ensemble_depth``'s scaling)."""
    flat = depth.double().flatten(1)
    low, high = flat.min(dim=1).values.view(-1, 1, 1), flat.max(dim=1).values.view(-1, 1, 1)
    return ((depth.double() - low) / (high - low).clamp_min(1e-12)).float()


def estimate_depth(
    model: Any,
    vae: Any,
    positive: list,
    images: torch.Tensor,
    settings: DepthSettings,
    on_member: Callable[[int, int], None] | None = None,
    check_cancel: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Depth ``[B, H, W]`` float32, each image spanning [0, 1] (0 = near), of ``images`` (IMAGE ``[B, H, W, C]`` in [0, 1]) with
    the depth ``model`` (module docstring). ``positive``: the empty prompt's CONDITIONING (:func:`empty_prompt`).

    ``on_member(done, total)`` is called after each member of each image (``total = B * ensemble_size``);
    ``check_cancel()`` before each (it raises to stop). Member ``m`` of every image starts from the noise of
    ``seed + m``, so a larger ensemble keeps the smaller one's members.
    """
    check_depth_inputs(model, vae, images, settings)
    with torch.no_grad():
        return _estimate(model, vae, positive, images, settings, on_member, check_cancel)


def _estimate(
    model: Any,
    vae: Any,
    positive: list,
    images: torch.Tensor,
    settings: DepthSettings,
    on_member: Callable[[int, int], None] | None,
    check_cancel: Callable[[], None] | None,
) -> torch.Tensor:
    flow = model if is_flow_model(model) else patch_model(model)
    sigmas = flow_sigmas(flow, settings.steps, 1.0, 1.0)
    sampler = fm_sampler("euler")
    batch, height, width = images.shape[0], images.shape[1], images.shape[2]
    size = processing_size(height, width, settings.resolution)
    total, done = batch * settings.ensemble_size, 0
    out = []
    for b in range(batch):
        pixels = _resize(images[b : b + 1, ..., :3].movedim(-1, 1).float(), *size).movedim(1, -1).clamp(0, 1)
        if check_cancel is not None:
            check_cancel()
        latent = vae.encode(pixels).float()
        cond = [[tensor, {**extras, "concat_latent_image": latent}] for tensor, extras in positive]
        empty = torch.zeros_like(latent)
        members = []
        for m in range(settings.ensemble_size):
            if check_cancel is not None:
                check_cancel()
            seed = settings.seed + m
            noise = comfy.sample.prepare_noise(empty, seed)
            # cfg 1: ComfyUI evaluates the conditional branch only, so the negative is never used
            samples = comfy.sample.sample_custom(
                flow, noise, 1.0, sampler, sigmas, cond, cond, empty, disable_pbar=True, seed=seed
            )
            decoded = vae.decode(samples)[..., :3].float().cpu()
            members.append(image_as_depth(decoded.movedim(-1, 1)))
            done += 1
            if on_member is not None:
                on_member(done, total)
        depth = ensemble_depth(torch.stack(members))  # [1, 1, h, w] spanning [0, 1]
        out.append(_unit_range(_resize(depth, height, width)[:, 0]))  # the resize moves the extremes: [0, 1] again
    return torch.cat(out)


def load_depth_pipeline(
    checkpoint: str | os.PathLike,
    depth_model: str | os.PathLike | None = None,
    marigold: str | os.PathLike | None = None,
    strength: float = 1.0,
    zero_terminal_snr: bool = False,
) -> tuple[Any, Any, Any, str]:
    """``(depth MODEL, CLIP, VAE, description)`` for headless use: ``checkpoint`` (SD1.x / SD2.x / SDXL with
    its text encoder and VAE) with the trained ``depth_model`` file on it, or ``marigold`` (a Marigold-layout
    UNet) with ``checkpoint``'s text encoder and VAE (its UNet is not loaded)."""
    if (depth_model is None) == (marigold is None):
        raise HostError("pass exactly one of a depth model file (trained on the checkpoint) or a Marigold UNet file")
    if marigold is not None:
        path = pathlib.Path(checkpoint)
        if not path.is_file():
            raise HostError(
                f"checkpoint {path} does not exist: pass the SD2 checkpoint whose text encoder and VAE the "
                "Marigold model uses"
            )
        try:
            _, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_model=False)[:3]
        except Exception as exc:  # ComfyUI's own errors for unreadable files
            raise HostError(f"checkpoint {path} could not be loaded ({exc}): pass an SD2 checkpoint") from exc
        if clip is None or vae is None:
            raise HostError(
                f"checkpoint {path} has no text encoder or VAE: the Marigold model needs both (an SD2 checkpoint)"
            )
        return (
            load_marigold_file(marigold, zero_terminal_snr),
            clip,
            vae,
            f"Marigold model {pathlib.Path(marigold).name}",
        )
    model, clip, vae = load_checkpoint(checkpoint)
    flow, metadata = load_depth_model(model, depth_model, strength)
    return flow, clip, vae, f"depth model {pathlib.Path(depth_model).name} (objective {metadata.objective})"
