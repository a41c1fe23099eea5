"""An SD1.5-shaped checkpoint with random weights, for the tests that load checkpoints through ComfyUI.

The state dict is what ComfyUI's checkpoint detection accepts as SD1.5:
- UNet under ``model.diffusion_model.``: model_channels 320 and context_dim 768 (the SD15 match filter), but one
  level (channel_mult [1]) with one res block: 25.8 M parameters.
- text encoder under ``cond_stage_model.transformer.``: the full CLIP-L (123.6 M parameters). The SD15 clip target
  builds CLIP-L from a fixed config (12 layers, width 768, vocab 49408), so anything smaller loads as "clip
  missing" with uninitialised weights. ``text_projection.weight`` cannot come from an SD1.x checkpoint at all
  (``SD15.process_clip_state_dict`` moves it under ``text_model.``) and is unused by SD1.x; ComfyUI itself
  filters it from the "clip missing" warning. It is left out; every other key loads.
- VAE under ``first_stage_model.``: the KL autoencoder's config is hard-coded in ``comfy.sd.VAE`` (ch 128,
  ch_mult [1, 2, 4, 4], 2 res blocks, 83.7 M parameters; the only smaller variant, ch_mult [1, 2, 4], is the x4
  upscaler's VAE with downscale 4). ``comfy.sd.VAE`` also detects a TAESD (``taesd_encoder.*``,
  ``taesd_decoder.*``, ``vae_scale``, ``vae_shift``): downscale 8, 4 latent channels, 2.4 M parameters, all keys
  loaded. That one is used.
Weights: fp16, uniform with std 0.02 (norm layers: weight 1, bias 0), from a seeded generator; ~300 MB on disk.
The TAESD has no normalisation layers: at std 0.02 its output is a near-constant, near-black image whatever the
latent, so it gets std 0.035 and a mid-grey bias on its last layer, and the image then follows the latent.
"""

from __future__ import annotations

import torch

CKPT_NAME = "d2f_tiny_sd15.safetensors"
SD15_TINY_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "use_linear_in_transformer": False,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
WEIGHT_STD = 0.02
TAESD_WEIGHT_STD = 0.035
# keys of CLIP-L that an SD1.x checkpoint cannot provide (ComfyUI drops them from its "clip missing" warning)
CLIP_UNLOADABLE = {"clip_l.transformer.text_projection.weight"}


def randomize_(module: torch.nn.Module, gen: torch.Generator, std: float = WEIGHT_STD) -> torch.nn.Module:
    """Fill the layers' parameters (comfy.ops layers skip initialisation): uniform with the given std, in
    module order; GroupNorm / LayerNorm get weight 1 and bias 0. Scalar parameters keep the value their
    constructor gave them (TAESD's vae_scale 1 / vae_shift 0, CLIP's logit_scale)."""
    bound = std * 3**0.5
    with torch.no_grad():
        for _, mod in module.named_modules():
            is_norm = isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm))
            for name, p in mod.named_parameters(recurse=False):
                if p.ndim == 0:
                    continue
                if is_norm:
                    p.fill_(1.0 if name == "weight" else 0.0)
                else:
                    p.uniform_(-bound, bound, generator=gen)
    return module


def tiny_sd15_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """An SD1.5 checkpoint state dict (UNet, CLIP-L, TAESD) with deterministic random fp16 weights."""
    import comfy.model_base
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd

    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float16
    config = comfy.supported_models.SD15(dict(SD15_TINY_UNET))
    config.set_inference_dtype(dtype, None)
    unet = comfy.model_base.BaseModel(config, device=torch.device("cpu")).diffusion_model
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=dtype)
    vae = randomize_(comfy.taesd.taesd.TAESD().to(dtype), gen, TAESD_WEIGHT_STD)
    with torch.no_grad():
        vae.taesd_decoder[-1].bias.fill_(0.5)  # TAESD.decode maps 0.5 to 0, i.e. mid-grey pixels

    sd: dict[str, torch.Tensor] = {}
    for prefix, module in (("model.diffusion_model.", randomize_(unet, gen)), ("first_stage_model.", vae)):
        for k, v in module.state_dict().items():
            sd[prefix + k] = v.to(dtype).contiguous()
    for k, v in randomize_(clip, gen).state_dict().items():
        if k not in CLIP_UNLOADABLE:  # "clip_l.X" -> "cond_stage_model.X" (as ComfyUI saves SD1.x checkpoints)
            sd["cond_stage_model." + k.removeprefix("clip_l.")] = v.to(dtype).contiguous()
    return sd
