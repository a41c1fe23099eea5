"""Checkpoint files with random weights that ComfyUI 0.8.0 detects as each SD model family.

``comfy.sd.load_checkpoint_guess_config`` reads a UNet's configuration from the state dict's keys
and shapes (``comfy.model_detection.detect_unet_config``) and takes the first class of
``comfy.supported_models.models`` whose ``unet_config`` entries all equal the detected ones. Only
those entries are pinned; the rest (how many levels, which output blocks have attention, the
middle block) is free. Each family below keeps the pinned entries and shrinks everything else:
one resolution level (``channel_mult [1]``, so any latent size works), no attention in the output
blocks unless detection needs it, a middle block of one ResBlock (``transformer_depth_middle -1``).

- SDXL family: ``model_channels 320``, ``context_dim 2048``, ``adm_in_channels 2816``, linear
  transformer projections, and ``transformer_depth`` (one entry per input ResBlock) exactly one of
  the SDXL-family lists. KOALA_700M's ``[0, 2, 5]`` is the cheapest (3 input ResBlocks, 7
  transformer blocks: 52.4 M UNet parameters, 105 MB in fp16; Segmind_Vega's
  ``[0, 0, 1, 1, 2, 2]`` needs 6 ResBlocks and 6 transformer blocks: 66.6 M). It loads as
  ``model_base.SDXL``, like every SDXL-family class.
  The prediction type comes from marker keys (``SDXL.model_type``): none -> eps; ``v_pred`` ->
  v-prediction; ``v_pred`` + ``ztsnr`` -> v-prediction with ComfyUI's zero-terminal-SNR schedule
  (``alphas_cumprod[-1] = 4.9e-8``).
- SD2 family (``SD20``): ``model_channels 320``, ``context_dim 1024``, linear projections, no ADM.
  ``SD20.model_type`` reads v-prediction (SD2-768-v) when
  ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` has a std above 0.09, so the UNet needs
  12 output blocks with attention in the last. With one level that is 11 input ResBlocks (12
  output blocks); detection also needs attention in one input block (``context_dim`` is read
  there): 75.1 M UNet parameters, 150 MB in fp16. That bias gets std 0.15, as SD2-768-v's own
  has a large spread.

Text encoders and VAE are left out (ComfyUI warns and returns ``None`` for them): the tests use
synthetic conditioning of the right shapes (SDXL: context [1, 77, 2048] and pooled_output
[1, 1280]; SD2: context [1, 77, 1024]). Weights are fp16, uniform with std 0.02 (norm layers:
weight 1, bias 0), from a seeded generator.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch
from sd15_checkpoint import randomize_

UNET_PREFIX = "model.diffusion_model."
SD2_V_CHECK_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"  # what SD20.model_type reads
SD2_V_CHECK_STD = 0.15  # SD20.model_type: std > 0.09 means v-prediction

_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "channel_mult": [1],
    "use_linear_in_transformer": True,
    "transformer_depth_middle": -1,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
SDXL_TINY_UNET = {
    **_COMMON,
    "context_dim": 2048,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
    "num_res_blocks": [3],
    "transformer_depth": [0, 2, 5],
    "transformer_depth_output": [0, 0, 0, 0],
}
SD2_TINY_UNET = {
    **_COMMON,
    "context_dim": 1024,
    "adm_in_channels": None,
    "num_res_blocks": [11],
    "transformer_depth": [1] + [0] * 10,
    "transformer_depth_output": [1] + [0] * 11,  # UNetModel pops from the end: entry 0 is output block 11
}

SDXL_CONTEXT_DIM, SDXL_POOLED_DIM, SD2_CONTEXT_DIM = 2048, 1280, 1024
ZSNR_LAST_ALPHAS_CUMPROD = 4.8973451890853435e-08  # where ComfyUI's zsnr rescale stops


@dataclass(frozen=True)
class Family:
    """One model family: its checkpoint recipe and what ComfyUI must detect it as.

    ``zero_terminal_snr_option``: the Diff2Flow patch option the family is used with (SD2 v with
    the zero-SNR option is the SD2-768-v checkpoint patched with ``zero_terminal_snr=True``).
    """

    name: str
    file_name: str
    base: str  # "sdxl" or "sd2"
    config_class: str  # the comfy.supported_models class detection must pick
    model_class: str  # the comfy.model_base class of the loaded model
    prediction: str  # "eps" or "v"
    markers: tuple[str, ...] = ()
    comfy_zsnr: bool = False  # ComfyUI itself gives the checkpoint a zero-terminal-SNR schedule
    zero_terminal_snr_option: bool = False
    context_dim: int = 0  # width of the text conditioning (cross-attention context)

    @property
    def pooled(self) -> bool:
        return self.base == "sdxl"


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "sdxl_eps",
            "d2f_tiny_sdxl_eps.safetensors",
            "sdxl",
            "KOALA_700M",
            "SDXL",
            "eps",
            (),
            context_dim=SDXL_CONTEXT_DIM,
        ),
        Family(
            "sdxl_v",
            "d2f_tiny_sdxl_v.safetensors",
            "sdxl",
            "KOALA_700M",
            "SDXL",
            "v",
            ("v_pred",),
            context_dim=SDXL_CONTEXT_DIM,
        ),
        Family(
            "sdxl_v_ztsnr",
            "d2f_tiny_sdxl_v_ztsnr.safetensors",
            "sdxl",
            "KOALA_700M",
            "SDXL",
            "v",
            ("v_pred", "ztsnr"),
            comfy_zsnr=True,
            context_dim=SDXL_CONTEXT_DIM,
        ),
        Family(
            "sd2_768_v", "d2f_tiny_sd2_768_v.safetensors", "sd2", "SD20", "BaseModel", "v", context_dim=SD2_CONTEXT_DIM
        ),
        Family(
            "sd2_v_zsnr_option",
            "d2f_tiny_sd2_768_v.safetensors",
            "sd2",
            "SD20",
            "BaseModel",
            "v",
            zero_terminal_snr_option=True,
            context_dim=SD2_CONTEXT_DIM,
        ),
    )
}


def _unet_state_dict(base: str, seed: int) -> dict[str, torch.Tensor]:
    import comfy.model_base
    import comfy.supported_models

    gen = torch.Generator().manual_seed(seed)
    if base == "sdxl":
        config = comfy.supported_models.KOALA_700M(dict(SDXL_TINY_UNET))
        model_class = comfy.model_base.SDXL
    elif base == "sd2":
        config = comfy.supported_models.SD20(dict(SD2_TINY_UNET))
        model_class = comfy.model_base.BaseModel
    else:
        raise ValueError(f"base={base!r}: expected 'sdxl' or 'sd2'")
    config.set_inference_dtype(torch.float16, None)
    unet = randomize_(model_class(config, device=torch.device("cpu")).diffusion_model, gen)
    sd = {UNET_PREFIX + k: v.to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    if base == "sd2":
        spread = torch.randn(sd[UNET_PREFIX + SD2_V_CHECK_KEY].shape, generator=gen) * SD2_V_CHECK_STD
        sd[UNET_PREFIX + SD2_V_CHECK_KEY] = spread.to(torch.float16)
    return sd


@lru_cache(maxsize=2)
def _cached_unet(base: str, seed: int) -> dict[str, torch.Tensor]:
    return _unet_state_dict(base, seed)


def family_state_dict(family: Family | str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The checkpoint state dict of a family (UNet weights plus its marker keys)."""
    family = FAMILIES[family] if isinstance(family, str) else family
    sd = dict(_cached_unet(family.base, seed))
    for marker in family.markers:  # presence is what counts (SDXL.model_type); real files hold an empty tensor
        sd[marker] = torch.tensor([])
    return sd


def write_family_checkpoint(family: Family | str, folder: str | os.PathLike, seed: int = 0) -> str:
    """Write the family's checkpoint into ``folder`` (once: families sharing a file reuse it);
    returns the file path."""
    from safetensors.torch import save_file

    family = FAMILIES[family] if isinstance(family, str) else family
    path = os.path.join(str(folder), family.file_name)
    if not os.path.isfile(path):
        save_file(family_state_dict(family, seed), path)
    return path


def synthetic_conditioning(family: Family | str, seed: int = 0, batch: int = 1, tokens: int = 77, **extras) -> list:
    """A CONDITIONING of the family's shapes: context [batch, tokens, dim], and for SDXL a
    ``pooled_output`` [batch, 1280]; ``extras`` (e.g. width / height) are added to the dict."""
    family = FAMILIES[family] if isinstance(family, str) else family
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, family.context_dim, generator=gen)
    info = dict(extras)
    if family.pooled:
        info["pooled_output"] = torch.randn(batch, SDXL_POOLED_DIM, generator=gen)
    return [[context, info]]
