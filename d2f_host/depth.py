"""Image-conditioned (depth) models in ComfyUI: the widened first convolution and the image latent
through ComfyUI's own concat conditioning (docs/MATH.md section 13).

A depth model is an SD1.x / SD2.x / SDXL UNet whose first convolution takes the noisy depth latent
and the clean image latent side by side (8 input channels for a 4-channel latent). It is made on a
clone with two object patches, the mechanism ComfyUI's own model nodes use, so the shared model is
never modified:

- ``diffusion_model.input_blocks.0.0``: the widened convolution (:func:`d2f_core.depth.widen_input_conv`,
  Marigold's initialisation: the new channels copy the old weights and both halves are halved, so the
  widened model equals the base one on duplicated input), or a given 8-channel weight (a trained or
  converted depth model);
- ``concat_keys = ("concat_image",)``: ``BaseModel.concat_cond`` then turns the conditioning's
  ``concat_latent_image`` (set by stock ``InstructPixToPixConditioning`` or by the Depth Estimate node)
  into ``c_concat``, which ``BaseModel._apply_model`` appends after the noisy latent.

Latent convention: the image latent enters in the model's latent scale (``process_latent_in`` of the
VAE's latent, which ``concat_cond`` applies; Marigold's convention), the same scale as the depth latent
the model denoises. Training passes it as the per-sample tensor ``"concat"`` (``d2f_host.unet.unet_network``
appends it after the input the same way).

A trained depth model is saved as an adapter file whose first-convolution delta has the widened shape
(``FullAdapter``'s ``<key>.diff``); it loads onto a model widened by :func:`widen_model` (stock LoRA
loaders cannot widen a layer). Its metadata says ``task = depth``.

Time plays no part here; the sampling convention is the project's (FM sigma in [0, 1], sigma = 1 is noise).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from d2f_core.depth import widen_input_conv

from .bootstrap import HostError

__all__ = ["INPUT_CONV", "CONCAT_KEYS", "input_conv", "latent_channels", "is_image_conditioned", "widen_model",
           "widened_input_shape"]

INPUT_CONV = "input_blocks.0.0"  # the UNet's first convolution (LDM / ComfyUI module path)
CONCAT_KEYS = ("concat_image",)  # BaseModel.concat_cond: c_concat from the conditioning's concat_latent_image


def input_conv(model: Any) -> torch.nn.Module:
    """The first convolution ``model`` samples with (the widened one on a depth model)."""
    return model.get_model_object(f"diffusion_model.{INPUT_CONV}")


def latent_channels(model: Any) -> int:
    return int(model.model.latent_format.latent_channels)


def is_image_conditioned(model: Any) -> bool:
    """Whether ``model``'s first convolution takes more channels than its latent has (a depth or other
    image-conditioned model) and it receives them through ``c_concat``."""
    return int(input_conv(model).weight.shape[1]) > latent_channels(model) and tuple(model.get_model_object("concat_keys")) == CONCAT_KEYS


def widened_input_shape(model: Any) -> tuple[int, ...]:
    """The shape of the first convolution's weight once widened to take the image latent."""
    conv = input_conv(model)
    out, _, *kernel = conv.weight.shape
    return (int(out), 2 * latent_channels(model), *(int(k) for k in kernel))


def widen_model(model: Any, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> Any:
    """A clone of ``model`` that takes the image latent through ``concat_latent_image`` (module docstring).

    ``weight`` (and ``bias``): the widened first convolution's own tensors (a converted depth
    checkpoint); by default Marigold's initialisation from ``model``'s convolution. A model that is
    already image-conditioned is refused (its convolution would be widened twice).
    """
    if is_image_conditioned(model):
        raise HostError("this MODEL already takes an image latent (its first convolution is widened): connect the "
                        "base model, or use it as it is")
    conv = input_conv(model)
    channels = latent_channels(model)
    if int(conv.weight.shape[1]) != channels:
        raise HostError(f"this MODEL's first convolution takes {conv.weight.shape[1]} channels, not its latent's "
                        f"{channels} (an inpainting or other image-conditioned model): depth needs a base text-to-image model")
    shape = widened_input_shape(model)
    if weight is None:
        weight = widen_input_conv(conv.weight.detach().float())
    elif tuple(weight.shape) != shape:
        raise HostError(f"the depth model's first convolution has shape {tuple(weight.shape)}, but this MODEL needs "
                        f"{shape}: load it onto the base model it was trained from (same family)")
    if bias is None:
        bias = conv.bias.detach() if conv.bias is not None else None
    widened = type(conv)(shape[1], shape[0], tuple(shape[2:]), stride=conv.stride, padding=conv.padding,
                         bias=bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    # plain tensors copied out of any inference mode: the trainer wraps and differentiates through them
    with torch.inference_mode(False):
        widened.weight = torch.nn.Parameter(weight.detach().clone().to(conv.weight), requires_grad=False)
        if bias is not None:
            widened.bias = torch.nn.Parameter(bias.detach().clone().to(conv.weight), requires_grad=False)
    clone = model.clone()
    clone.add_object_patch(f"diffusion_model.{INPUT_CONV}", widened)
    clone.add_object_patch("concat_keys", CONCAT_KEYS)
    return clone
