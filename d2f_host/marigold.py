"""Zero-shot conversion of Marigold-layout depth diffusion models (docs/MATH.md section 13).

A Marigold-layout checkpoint is an SD2 UNet (v-prediction, ComfyUI's discrete 1000-step schedule)
whose first convolution takes 8 channels: the clean image latent and the noisy depth latent, in that
order (Marigold's ``torch.cat([rgb_latent, depth_latent], dim=1)``). It usually comes as the diffusers
file ``unet/diffusion_pytorch_model.safetensors``; a file with ComfyUI / LDM keys
(``input_blocks.0.0.weight``, with or without ``model.diffusion_model.``) is read as well.

The conversion goes through ComfyUI's own loading and the project's depth mechanism:

1. diffusers keys are renamed to ComfyUI's with ComfyUI's own map (``comfy.utils.unet_to_diffusers``)
   for a UNet configuration read off the file's keys and shapes (:func:`diffusers_unet_config`);
2. the first convolution is cut to its 4 depth-latent channels, so that ComfyUI's detection
   (``comfy.sd.load_diffusion_model_state_dict``) builds an ordinary 4-channel SD2 model;
3. its model sampling is set to v-prediction on the model's own schedule, as ComfyUI's
   ModelSamplingDiscrete node does (an object patch; ComfyUI's SD2 detection guesses the
   prediction type from one bias's spread, which a fine-tune need not keep);
4. :func:`d2f_host.depth.widen_model` puts the full 8-channel convolution back, its input channels
   reordered to ComfyUI's ``[noisy latent, c_concat]`` (``BaseModel._apply_model`` appends
   ``c_concat`` after the noisy latent), and the image arrives as ``concat_latent_image``;
5. the Diff2Flow patch makes it a flow model: FM Euler in 1-4 steps, every stock sampler works.

Time convention after step 5: FM sigma in [0, 1], sigma = 1 is noise.
"""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import comfy.model_base
import comfy.model_detection
import comfy.sd
import comfy.utils
import torch

from d2f_core.depth_settings import DEFAULT_DEPTH_STEPS

from .checkpoints import SAMPLING_ATTACHMENT, RecommendedSampling
from .depth import INPUT_CONV, widen_model
from .errors import HostError
from .model_sampling import patch_model

__all__ = [
    "MARIGOLD_STEPS",
    "diffusers_unet_config",
    "marigold_unet_state_dict",
    "split_marigold_input_conv",
    "load_marigold",
    "load_marigold_file",
]

MARIGOLD_STEPS = (
    DEFAULT_DEPTH_STEPS  # recommended FM Euler steps of a converted model: the same as a Diff2Flow depth model
)
SD2_HEAD_CHANNELS = 64  # SD2's attention head width (not stored in the weights; ComfyUI's SD20 config says 64)
LDM_CONV = f"{INPUT_CONV}.weight"
LDM_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
log = logging.getLogger("diff2flow")


def _count(sd: Mapping[str, Any], pattern: str) -> int:
    """How many consecutive indices ``i`` have keys starting with ``pattern.format(i)``."""
    n = 0
    while any(k.startswith(pattern.format(n)) for k in sd):
        n += 1
    return n


def diffusers_unet_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ComfyUI (LDM) UNet configuration of a diffusers ``UNet2DConditionModel`` state dict, read
    off its keys and shapes: levels, res blocks, transformer depths, widths, context width, linear or
    convolutional transformer projections. Only the SD1.x / SD2.x layout (no class or added
    embeddings) is read; anything else raises ``HostError``."""
    if "conv_in.weight" not in sd:
        raise HostError("not a diffusers UNet state dict (no conv_in.weight)")
    if any(k.startswith(("class_embedding.", "add_embedding.")) for k in sd):
        raise HostError(
            "this diffusers UNet has class / added embeddings (SDXL or unCLIP): a Marigold-layout model "
            "is an SD2 UNet without them"
        )
    conv_in = sd["conv_in.weight"]
    model_channels = int(conv_in.shape[0])
    levels = _count(sd, "down_blocks.{}.")
    if levels == 0 or "conv_out.weight" not in sd or not any(k.startswith("mid_block.attentions.0.") for k in sd):
        raise HostError("this diffusers UNet lacks down blocks, conv_out or a mid-block attention: not an SD UNet")
    num_res_blocks, channel_mult, depth, depth_output = [], [], [], []
    context_dim, linear = None, None
    for i in range(levels):
        res = _count(sd, f"down_blocks.{i}.resnets.{{}}.")
        num_res_blocks.append(res)
        channel_mult.append(int(sd[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0]) // model_channels)
        for j in range(res):
            depth.append(_count(sd, f"down_blocks.{i}.attentions.{j}.transformer_blocks.{{}}."))
    for i in range(levels):
        for j in range(num_res_blocks[levels - 1 - i] + 1):
            depth_output.append(_count(sd, f"up_blocks.{i}.attentions.{j}.transformer_blocks.{{}}."))
    for k, v in sd.items():
        if k.endswith("attn2.to_k.weight") and context_dim is None:
            context_dim = int(v.shape[1])
        if k.endswith(".proj_in.weight") and linear is None:
            linear = v.ndim == 2
    if context_dim is None:
        raise HostError("this diffusers UNet has no cross-attention (attn2.to_k): not a text-conditioned SD UNet")
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(sd["conv_out.weight"].shape[0]),
        "model_channels": model_channels,
        "num_res_blocks": num_res_blocks,
        "channel_mult": channel_mult,
        "transformer_depth": depth,
        # UNetModel and unet_to_diffusers pop this list from the end: the last entry is up_blocks.0's first block
        "transformer_depth_output": list(reversed(depth_output)),
        "transformer_depth_middle": _count(sd, "mid_block.attentions.0.transformer_blocks.{}."),
        "context_dim": context_dim,
        "use_linear_in_transformer": bool(linear),
        "num_heads": -1,
        "num_head_channels": SD2_HEAD_CHANNELS,
        "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }


def marigold_unet_state_dict(sd: Mapping[str, torch.Tensor], name: str = "the file") -> dict[str, torch.Tensor]:
    """The UNet of a Marigold-layout file with ComfyUI (LDM) keys and no prefix: diffusers keys are
    renamed with ComfyUI's ``unet_to_diffusers`` map; LDM keys lose ``model.diffusion_model.``."""
    if "conv_in.weight" in sd:
        config = diffusers_unet_config(sd)
        names = comfy.utils.unet_to_diffusers(config)
        unknown = sorted(k for k in sd if k not in names)
        if unknown:  # ComfyUI's own diffusers loading skips them too; a missing weight is caught in load_marigold
            log.warning(
                "%s: %d tensors have no place in an SD UNet and are ignored (e.g. %s)", name, len(unknown), unknown[:3]
            )
        return {names[k]: v for k, v in sd.items() if k in names}
    for prefix in LDM_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    if LDM_CONV not in sd:
        raise HostError(
            f"{name} holds no UNet: expected a diffusers UNet (conv_in.weight, Marigold's "
            "unet/diffusion_pytorch_model.safetensors) or ComfyUI / LDM keys (input_blocks.0.0.weight)"
        )
    return dict(sd)


def split_marigold_input_conv(
    unet_sd: dict[str, torch.Tensor], name: str = "the file"
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``(4-channel state dict, widened weight)``: the first convolution ``[O, 8, k, k]`` in Marigold's
    input order ``[image latent, depth latent]`` becomes the weight in ComfyUI's order ``[depth latent,
    image latent]``, and the state dict keeps only the depth-latent half, so ComfyUI builds an
    ordinary 4-channel model around it."""
    weight = unet_sd[LDM_CONV]
    out_channels = int(unet_sd["out.2.weight"].shape[0]) if "out.2.weight" in unet_sd else weight.shape[1] // 2
    if weight.ndim != 4 or weight.shape[1] != 2 * out_channels:
        raise HostError(
            f"{name}: the first convolution takes {weight.shape[1]} channels, but a Marigold-layout depth "
            f"model takes {2 * out_channels} (image latent + depth latent of {out_channels} channels each); "
            "load an ordinary SD model with a checkpoint loader instead"
        )
    image, depth = weight[:, :out_channels], weight[:, out_channels:]
    four = dict(unet_sd)
    four[LDM_CONV] = depth.contiguous()
    return four, torch.cat([depth, image], dim=1).contiguous()


def load_marigold(
    sd: Mapping[str, torch.Tensor],
    name: str = "the file",
    zero_terminal_snr: bool = False,
    prediction: str = "v",
    dtype: torch.dtype | None = None,
) -> Any:
    """A Marigold-layout UNet state dict as a Diff2Flow depth MODEL (module docstring): widened, the
    image through ``concat_latent_image``, v-prediction (``prediction``), Diff2Flow-patched, with
    :data:`MARIGOLD_STEPS` attached as its recommended steps."""
    if prediction not in ("v", "eps"):
        raise HostError(f"prediction must be 'v' (Marigold) or 'eps', got {prediction!r}")
    unet = marigold_unet_state_dict(sd, name)
    four, weight = split_marigold_input_conv(unet, name)
    bias = four.get(f"{INPUT_CONV}.bias")
    given = set(four)  # ComfyUI's loader pops the tensors it loads
    try:
        model = comfy.sd.load_diffusion_model_state_dict(
            four, model_options={"dtype": dtype} if dtype is not None else {}
        )
    except (KeyError, RuntimeError, ValueError) as exc:  # ComfyUI's detection reads fixed keys of an SD UNet
        raise HostError(
            f"{name}: ComfyUI could not build an SD UNet from it ({type(exc).__name__}: {exc}): the file is "
            "incomplete or not a Marigold-layout UNet"
        ) from exc
    if model is None:
        raise HostError(
            f"{name}: ComfyUI does not recognise this UNet (once cut to 4 input channels) as an SD model: "
            "a Marigold-layout checkpoint is an SD2 UNet with 8 input channels"
        )
    missing = sorted(set(model.model.diffusion_model.state_dict()) - given)
    if missing:  # ComfyUI would leave them uninitialised with only a log line
        raise HostError(
            f"{name}: {len(missing)} weights of the SD UNet it describes are missing (e.g. {missing[:3]}): "
            "the file is incomplete or not a Marigold-layout UNet"
        )
    if model.model.model_config.unet_config.get("adm_in_channels") is not None:
        raise HostError(f"{name}: this UNet takes an extra embedding (SDXL / unCLIP); a Marigold-layout model is SD2")
    model_type = comfy.model_base.ModelType.V_PREDICTION if prediction == "v" else comfy.model_base.ModelType.EPS
    # as ComfyUI's ModelSamplingDiscrete node: the model's own schedule with the prediction type set
    model.add_object_patch("model_sampling", comfy.model_base.model_sampling(model.model.model_config, model_type))
    flow = patch_model(widen_model(model, weight=weight, bias=bias), zero_terminal_snr)
    flow.set_attachments(
        SAMPLING_ATTACHMENT, RecommendedSampling("euler", MARIGOLD_STEPS, 1.0, f"Marigold conversion of {name}")
    )
    return flow


def load_marigold_file(
    path: str | os.PathLike, zero_terminal_snr: bool = False, prediction: str = "v", dtype: torch.dtype | None = None
) -> Any:
    """:func:`load_marigold` of a ``.safetensors`` / ``.ckpt`` file (read by ComfyUI's loader)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise HostError(
            f"Marigold model {path} does not exist: pass Marigold's unet/diffusion_pytorch_model.safetensors "
            "(or a renamed copy in models/diffusion_models)"
        )
    try:
        sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    except Exception as exc:  # safetensors / pickle errors for files that are not model weights
        raise HostError(f"Marigold model {path} could not be read ({exc})") from exc
    return load_marigold(sd, path.name, zero_terminal_snr, prediction, dtype)
