"""The UNet as the engine and the headless sampler use it: adapters as weight wrappers on a clone
(training), gradient checkpointing, and the raw UNet as ``d2f_core``'s ``network(x_in, t, **cond)``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import comfy.model_management
import torch
import torch.utils.checkpoint

from d2f_core.lora import WeightAdapter, make_adapter, select_target_modules
from training.config import TrainConfig
from training.engine import AUTOCAST_DTYPES

from .depth import INPUT_CONV, input_conv, is_image_conditioned

__all__ = [
    "trainable_copies_of_inference_tensors",
    "gradient_checkpointing",
    "attach_adapters",
    "unet_network",
    "inference_network",
]


def trainable_copies_of_inference_tensors(module: torch.nn.Module) -> None:
    """Frozen base weights that can take part in autograd.

    ComfyUI runs nodes under ``torch.inference_mode()``, so a checkpoint loaded in a graph holds
    inference tensors, which autograd refuses to save for backward. They are replaced by plain
    copies with the same values (the model's outputs do not change); every weight is frozen.
    """
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            if p.is_inference():
                sub._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
            else:
                p.requires_grad_(False)
        for name, b in list(sub._buffers.items()):
            if b is not None and b.is_inference():
                sub._buffers[name] = b.clone()


@contextlib.contextmanager
def gradient_checkpointing(unet: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute the UNet's layers in the backward pass (far less activation memory).

    The UNet calls the layers inside its input / middle / output blocks one by one (ResBlocks,
    SpatialTransformers, up/down-samplers), so those are the modules whose ``forward`` is wrapped,
    for the duration of the run only, and restored after.
    """
    if not enabled:
        yield
        return
    blocks = [
        *getattr(unet, "input_blocks", []),
        getattr(unet, "middle_block", None),
        *getattr(unet, "output_blocks", []),
    ]
    layers = [layer for block in blocks if block is not None for layer in block.children()]
    wrapped = []
    for layer in layers:
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        wrapped.append((layer, layer.__dict__.get("forward")))
        layer.forward = checkpointed
    try:
        yield
    finally:
        for layer, own in wrapped:
            if own is not None:
                layer.forward = own
            else:
                del layer.forward


def attach_adapters(
    model: Any, config: TrainConfig
) -> tuple[Any, torch.nn.Module, dict[str, WeightAdapter], torch.device]:
    """A clone of ``model`` with fresh ``config`` adapters as weight wrappers (the shared UNet
    weights are never modified), loaded on the compute device and ready for autograd.

    An image-conditioned model's widened first convolution (``d2f_host.depth``) gets a ``Full``
    adapter of its widened shape. Returns (clone, its UNet, adapters by module name, device). Call under
    ``torch.inference_mode(False)`` and ``torch.enable_grad()``.
    """
    clone = model.clone()
    if clone.model.get_dtype() != torch.float32 and clone.model.manual_cast_dtype is None:
        # a base stored in half precision without ComfyUI's manual cast (how ComfyUI loads SD on a GPU): the
        # trainer's fp32 inputs (and fp32 ops under autocast, such as group norm) need every layer's weight
        # cast as it runs, which ComfyUI's compute dtype turns on (as its stock training node does)
        clone.set_model_compute_dtype(AUTOCAST_DTYPES.get(config.dtype, torch.float32))
    unet = clone.model.diffusion_model
    modules = select_target_modules(unet, config.targets)
    widened = is_image_conditioned(clone)
    if widened:
        # the widened first convolution (an object patch) is trained in full whatever the targets: its
        # image half starts as a copy of the prior's weights and must learn what the image means
        modules[INPUT_CONV] = input_conv(clone)
    gen = torch.Generator().manual_seed(config.seed)
    adapters = {
        n: make_adapter(
            "Full" if widened and n == INPUT_CONV else config.algorithm,
            m.weight.shape,
            config.rank,
            config.alpha,
            gen,
            weight=m.weight,
        )
        for n, m in modules.items()
    }
    for n, adapter in adapters.items():
        clone.add_weight_wrapper(f"diffusion_model.{n}.weight", adapter)
    comfy.model_management.load_models_gpu([clone], memory_required=1e20, force_full_load=True)
    device = comfy.model_management.get_torch_device()
    for n, adapter in adapters.items():
        adapter.to(device)
        # loading applied the model's own patches (a LoRA loaded before training): a DoRA magnitude
        # must start at the norms of the weight the wrapper is called on, so training starts at the input model
        adapter.match_base(modules[n].weight)
    trainable_copies_of_inference_tensors(unet)
    return clone, unet, adapters, device


def unet_network(unet: torch.nn.Module, dtype: torch.dtype | None = None) -> Callable[..., torch.Tensor]:
    """``network(x_in, timestep, context, y=None, concat=None)``: the raw UNet as the training
    engine and the headless sampler call it (``d2f_core``'s network protocol).

    ``concat`` (an image-conditioned model's clean latent) is concatenated to the input along the
    channels, as ComfyUI's ``c_concat``. With ``dtype`` the inputs are cast to the UNet's weight
    dtype and the output returned in float32 (inference in the checkpoint's precision); without
    it, inputs pass as they are (training runs under autocast).
    """

    def network(
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        concat: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if concat is not None:
            x = torch.cat([x, concat.to(x)], dim=1)
        if dtype is None:
            return unet(x, t, context=context, y=y)
        y = y.to(dtype) if y is not None else None
        return unet(x.to(dtype), t, context=context.to(dtype), y=y).float()

    return network


def inference_network(model: Any) -> tuple[Callable[..., torch.Tensor], torch.device]:
    """``(network, device)``: ``model`` loaded on ComfyUI's compute device and its raw UNet as a
    network in the checkpoint's precision (headless sampling)."""
    comfy.model_management.load_models_gpu([model])
    return unet_network(model.model.diffusion_model, model.model.get_dtype()), comfy.model_management.get_torch_device()
