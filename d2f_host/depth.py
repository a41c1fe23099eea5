"""Image-conditioned (depth) models in ComfyUI: the widened first convolution and the image latent
through ComfyUI's own concat conditioning (docs/MATH.md section 13).

A depth model is an SD1.x / SD2.x / SDXL UNet whose first convolution takes the noisy depth latent
and the clean image latent side by side (8 input channels for a 4-channel latent). It is made on a
clone with two object patches, the mechanism ComfyUI's own model nodes use, so the shared model is
never modified:

- ``diffusion_model.input_blocks.0.0``: the widened convolution (:func:`d2f_core.depth.widen_input_conv`,
  Marigold's initialisation: the added channels copy the base weights and both halves are halved, so the
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

import contextlib
import logging
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import comfy.utils
import torch

from d2f_core.depth import widen_input_conv
from d2f_core.lora_metadata import DEPTH_NORMALIZATION, LoraMetadata, read_lora_metadata

from .checkpoints import apply_lora, attach_recommended_sampling, base_model_hash
from .errors import HostError
from .model_sampling import flow_model_for

__all__ = [
    "INPUT_CONV",
    "CONCAT_KEYS",
    "input_conv",
    "latent_channels",
    "is_image_conditioned",
    "widen_model",
    "widened_input_shape",
    "require_image_conditioned",
    "read_depth_metadata",
    "adapter_shape_mismatches",
    "load_depth_model",
]

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
    return (
        int(input_conv(model).weight.shape[1]) > latent_channels(model)
        and tuple(model.get_model_object("concat_keys")) == CONCAT_KEYS
    )


def widened_input_shape(model: Any) -> tuple[int, ...]:
    """The shape of the first convolution's weight once widened to take the image latent."""
    conv = input_conv(model)
    out, _, *kernel = conv.weight.shape
    return (int(out), 2 * latent_channels(model), *(int(k) for k in kernel))


def widen_model(model: Any, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> Any:
    """A clone of ``model`` that takes the image latent through ``concat_latent_image`` (module docstring).

    ``weight`` (and ``bias``): the widened first convolution's own tensors (a converted depth
    checkpoint); by default Marigold's initialisation from ``model``'s convolution. A model that is
    already image-conditioned is refused (its convolution would be widened twice).
    """
    if is_image_conditioned(model):
        raise HostError(
            "this MODEL already takes an image latent (its first convolution is widened): connect the "
            "base model, or use it as it is"
        )
    conv = input_conv(model)
    channels = latent_channels(model)
    if int(conv.weight.shape[1]) != channels:
        raise HostError(
            f"this MODEL's first convolution takes {conv.weight.shape[1]} channels, not its latent's "
            f"{channels} (an inpainting or other image-conditioned model): depth needs a base text-to-image model"
        )
    shape = widened_input_shape(model)
    if weight is None:
        weight = widen_input_conv(conv.weight.detach().float())
    elif tuple(weight.shape) != shape:
        raise HostError(
            f"the depth model's first convolution has shape {tuple(weight.shape)}, but this MODEL needs "
            f"{shape}: load it onto the base model it was trained from (same family)"
        )
    if bias is None:
        bias = conv.bias.detach() if conv.bias is not None else None
    widened = type(conv)(
        shape[1],
        shape[0],
        tuple(shape[2:]),
        stride=conv.stride,
        padding=conv.padding,
        bias=bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    # plain tensors copied out of any inference mode: the trainer wraps and differentiates through them
    with torch.inference_mode(False):
        widened.weight = torch.nn.Parameter(weight.detach().clone().to(conv.weight), requires_grad=False)
        if bias is not None:
            widened.bias = torch.nn.Parameter(bias.detach().clone().to(conv.weight), requires_grad=False)
    clone = model.clone()
    clone.add_object_patch(f"diffusion_model.{INPUT_CONV}", widened)
    clone.add_object_patch("concat_keys", CONCAT_KEYS)
    return clone


def require_image_conditioned(model: Any, what: str = "this MODEL") -> None:
    """``HostError`` naming the fix unless ``model`` takes an image latent (a depth model)."""
    if not is_image_conditioned(model):
        raise HostError(
            f"{what} is not image-conditioned (its first convolution takes {input_conv(model).weight.shape[1]} "
            "channels, its latent's only): load a depth model with 'Diff2Flow Depth Model Loader' (a trained "
            "depth file) or 'Diff2Flow Marigold Loader' (a Marigold-layout checkpoint)"
        )


# ---------------------------------------------------------------------- depth model files
DEPTH_CONV_KEY = f"diffusion_model.{INPUT_CONV}.diff"  # the Full adapter of the widened first convolution
log = logging.getLogger("diff2flow")


def read_depth_metadata(path: str | os.PathLike) -> LoraMetadata:
    """The Diff2Flow metadata of a depth model file, checked to say ``task = depth`` (``HostError``
    naming the file and the fix otherwise)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise HostError(f"depth model {path} does not exist: pass a .safetensors file saved by a depth training run")
    try:
        metadata = read_lora_metadata(path)
    except Exception as exc:  # safetensors' own errors for files that are not safetensors, ValueError for bad metadata
        raise HostError(f"depth model '{path.name}' could not be read ({exc})") from exc
    if metadata is None:
        raise HostError(
            f"'{path.name}' carries no Diff2Flow metadata, so it is not a depth model file: a depth model is "
            "the .safetensors file of a depth training run (task = depth); an ordinary LoRA loads with "
            "'Diff2Flow Checkpoint Loader' or LoraLoader, a Marigold checkpoint with 'Diff2Flow Marigold Loader'"
        )
    if metadata.task != "depth":
        raise HostError(
            f"'{path.name}' is a Diff2Flow {metadata.task} LoRA, not a depth model (its metadata says task = "
            f"{metadata.task}): load it with 'Diff2Flow Checkpoint Loader'"
        )
    if metadata.normalization not in (None, DEPTH_NORMALIZATION):
        raise HostError(
            f"depth model '{path.name}' was trained on targets normalised as {metadata.normalization!r}, which "
            f"this toolkit does not know ({DEPTH_NORMALIZATION} only): update the Diff2Flow toolkit"
        )
    return metadata


# tensor suffix -> (dimension of the tensor, dimension of the weight) that must agree; plain shape checks that
# catch a file trained on another family before ComfyUI would skip the layer with only a log line
_SHAPE_RULES = {
    ".lora_up.weight": (0, 0),
    ".lora_down.weight": (1, 1),
    ".hada_w1_a": (0, 0),
    ".hada_w2_a": (0, 0),
    ".hada_w1_b": (1, 1),
    ".hada_w2_b": (1, 1),
}


def adapter_shape_mismatches(tensors: dict[str, torch.Tensor], model: Any) -> list[str]:
    """Adapter tensors (ComfyUI-native keys, prefix ``diffusion_model.``) whose shapes do not fit the
    weights ``model`` samples with (the widened first convolution included): ``.diff`` tensors must have
    the weight's shape, LoRA / LoHa factors its output and input widths. Other algorithms are not checked."""
    bad = []
    for key, tensor in tensors.items():
        for suffix, (dim, weight_dim) in (*_SHAPE_RULES.items(), (".diff", (None, None))):
            if not key.endswith(suffix) or not key.startswith("diffusion_model."):
                continue
            try:
                weight = _sampled_weight(model, key[: -len(suffix)])
            except AttributeError:
                break  # a layer the model does not have: ComfyUI's loader reports it
            if dim is None:
                fits = tuple(tensor.shape) == tuple(weight.shape)
            else:
                fits = tensor.ndim > dim and tensor.shape[dim] == weight.shape[weight_dim]
            if not fits:
                bad.append(f"{key} {tuple(tensor.shape)} for a weight of shape {tuple(weight.shape)}")
            break
    return bad


def _sampled_weight(model: Any, module: str) -> torch.Tensor:
    """The weight of ``module`` (``diffusion_model.<path>``) that ``model`` samples with: the object-patched
    widened convolution for the first one (``get_model_object`` only sees patches of the exact path)."""
    if module == f"diffusion_model.{INPUT_CONV}":
        return input_conv(model).weight
    return model.get_model_object(module + ".weight")


@contextlib.contextmanager
def _unloaded_keys() -> Iterator[list[str]]:
    """Collect what ComfyUI's LoRA loader logs as not loaded (``lora key not loaded`` / ``NOT LOADED``)."""
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            for marker in ("lora key not loaded: ", "NOT LOADED "):
                if message.startswith(marker):
                    found.append(message[len(marker) :])

    handler = Collect(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield found
    finally:
        root.removeHandler(handler)


def load_depth_model(base_model: Any, path: str | os.PathLike, strength: float = 1.0) -> tuple[Any, LoraMetadata]:
    """``(MODEL, metadata)``: the depth model file at ``path`` on ``base_model`` (the text-to-image model it
    was trained from), ready to sample.

    The file is checked before anything is computed (``HostError`` naming the fix): Diff2Flow metadata
    with ``task = depth``, the base's prediction type, a widened first convolution of the shape this
    base needs, every tensor fitting a layer. Then ``base_model`` is widened (:func:`widen_model`), the
    file applied with ComfyUI's own LoRA loader (``comfy.sd.load_lora_for_models``: the object-patched
    convolution is in place before weights are patched, so its ``.diff`` lands on the widened weight),
    the flow model of the file's objective put on (the Diff2Flow patch, or naive flow sampling) and its
    recommended steps attached (``d2f_host.checkpoints.attach_recommended_sampling``).
    """
    path = pathlib.Path(path)
    metadata = read_depth_metadata(path)
    name = path.name
    if is_image_conditioned(base_model):
        raise HostError(
            f"this MODEL already takes an image latent: connect the base text-to-image model '{name}' was "
            "trained from (a checkpoint loader's MODEL), not a depth model"
        )
    tensors = comfy.utils.load_torch_file(str(path), safe_load=True)
    if DEPTH_CONV_KEY not in tensors:
        raise HostError(
            f"'{name}' has no widened first convolution ({DEPTH_CONV_KEY}): it is not a depth model file "
            "(the depth trainer always saves that layer in full)"
        )
    needed = widened_input_shape(base_model)
    if tuple(tensors[DEPTH_CONV_KEY].shape) != needed:
        raise HostError(
            f"'{name}' has a first convolution of shape {tuple(tensors[DEPTH_CONV_KEY].shape)}, but this MODEL "
            f"needs {needed}: load it onto the base model of the family it was trained on"
        )
    widened = widen_model(base_model)
    mismatched = adapter_shape_mismatches(tensors, widened)
    if mismatched:
        raise HostError(
            f"{len(mismatched)} tensors of '{name}' do not fit this MODEL's layers (e.g. {mismatched[0]}): it was "
            "trained on another model family; load it onto the base model it was trained from"
        )
    if metadata.base_model_hash and metadata.base_model_hash != base_model_hash(base_model):
        log.warning(
            "depth model %s was trained on another base model (UNet fingerprint %s): it loads, but its output "
            "is only reliable on the model it was trained from",
            name,
            metadata.base_model_hash,
        )
    with _unloaded_keys() as unloaded:
        try:
            model, _, _ = apply_lora(widened, None, path, strength, 0.0, checkpoint="this MODEL", tensors=tensors)
        except ValueError as exc:  # the prediction-type check
            raise HostError(str(exc)) from exc
    if unloaded:
        raise HostError(
            f"{len(unloaded)} tensors of '{name}' fit no layer of this MODEL (e.g. {unloaded[0]}): it was "
            "trained on another model family; load it onto the base model it was trained from"
        )
    flow = flow_model_for(model, metadata.objective, metadata.zero_terminal_snr)
    attach_recommended_sampling(flow, metadata, f"depth model '{name}'")
    return flow, metadata
