"""ComfyUI as the host library: reading SD checkpoints, encoding, and the trainable model.

Shared by the ComfyUI training node (inside a running ComfyUI) and the headless CLI (which finds
ComfyUI through ``COMFYUI_PATH`` or the ``custom_nodes`` folder this pack lives in, see
:func:`bootstrap_comfyui`). ComfyUI modules are imported inside the functions, so importing this
module never needs ComfyUI.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pathlib
import sys
from typing import Any, Callable, Iterator, Optional

import torch
import torch.utils.checkpoint

from d2f_core import Diff2Flow, rescale_zero_terminal_snr, scaled_linear
from d2f_core.lora import WeightAdapter, make_adapter, select_target_modules
from d2f_core.lora_metadata import LoraMetadata
from d2f_core.schedules import alphas_cumprod_from_discrete_sigmas

from .config import TrainConfig

PACK_ROOT = pathlib.Path(__file__).resolve().parents[1]
COMFYUI_HINT = (
    "set COMFYUI_PATH to a ComfyUI source tree (0.8.0 or newer) whose requirements are installed in this "
    "Python, or run from a copy of this pack inside ComfyUI/custom_nodes/"
)


class HostError(RuntimeError):
    """ComfyUI or a checkpoint cannot be used; the message says what to change."""


# ---------------------------------------------------------------------- finding ComfyUI
def find_comfyui() -> Optional[pathlib.Path]:
    """A ComfyUI source tree: ``COMFYUI_PATH``, else the ComfyUI this pack is installed in."""
    candidates = [os.environ.get("COMFYUI_PATH", "")]
    if PACK_ROOT.parent.name == "custom_nodes":
        candidates.append(str(PACK_ROOT.parent.parent))
    for c in candidates:
        if c and (pathlib.Path(c) / "comfy" / "model_management.py").is_file():
            return pathlib.Path(c).resolve()
    return None


def bootstrap_comfyui(cpu: Optional[bool] = None) -> pathlib.Path:
    """Make ComfyUI importable as a library (headless): put its tree first on ``sys.path`` (its
    ``nodes.py`` must win over this pack's ``nodes/`` package) and choose the device before
    ``comfy.model_management`` is imported (CPU when no CUDA GPU, or when ``cpu`` is true)."""
    if "comfy.model_management" in sys.modules:  # already inside ComfyUI (or bootstrapped)
        return pathlib.Path(sys.modules["comfy.model_management"].__file__).resolve().parents[1]
    root = find_comfyui()
    if root is None:
        given = os.environ.get("COMFYUI_PATH")
        found = f"COMFYUI_PATH={given!r} holds no comfy/model_management.py; " if given else ""
        raise HostError(f"ComfyUI was not found, and it is what reads SD checkpoints: {found}{COMFYUI_HINT}")
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = (not torch.cuda.is_available()) if cpu is None else cpu
        import comfy.model_management  # noqa: F401
        import comfy.sd  # noqa: F401
    except ImportError as exc:
        raise HostError(f"ComfyUI at {root} could not be imported ({exc}): install its requirements.txt into this Python") from exc
    return root


def comfyui_importable() -> bool:
    return importlib.util.find_spec("comfy") is not None


# ---------------------------------------------------------------------- model sampling
def _is_plain_discrete_vp(ms: object) -> bool:
    """ModelSamplingDiscrete with its own log-sigma table (not EDM, LCM-distilled or Cascade)."""
    import comfy.model_sampling as cms

    if not isinstance(ms, cms.ModelSamplingDiscrete):
        return False
    refused = [cms.ModelSamplingDiscreteEDM, cms.StableCascadeSampling]
    # ComfyUI's LCM model sampling lives in comfy_extras; refuse it by its base's name
    if any(isinstance(ms, cls) for cls in refused) or any(c.__name__ == "ModelSamplingDiscreteDistilled" for c in type(ms).__mro__):
        return False
    return type(ms).sigma is cms.ModelSamplingDiscrete.sigma


def prediction_of(ms: object) -> str:
    """``"eps"`` or ``"v"`` for a convertible model sampling; ``ValueError`` saying why not otherwise."""
    import comfy.model_sampling as cms

    name = type(ms).__name__
    if isinstance(ms, cms.CONST):
        raise ValueError(
            f"this model is already a flow model ({name}: SD3, Flux, AuraFlow and the like sample as flow "
            "models natively); Diff2Flow converts diffusion models (SD1.x, SD2.x, SDXL). Sample it directly "
            "with the FM scheduler and sampler."
        )
    if not isinstance(ms, cms.EPS):
        raise ValueError(
            f"cannot convert a model with {name} model sampling: Diff2Flow needs a discrete eps- or "
            "v-prediction diffusion model (SD1.x, SD2.x, SDXL)."
        )
    continuous = (cms.ModelSamplingContinuousEDM, cms.ModelSamplingDiscreteEDM)
    if isinstance(ms, cms.EDM) or isinstance(ms, continuous):
        raise ValueError(
            f"cannot convert a model with {name} model sampling: EDM / continuous-time models are not "
            "supported; Diff2Flow needs ComfyUI's discrete 1000-step VP schedule (SD1.x, SD2.x, SDXL)."
        )
    if isinstance(ms, cms.X0) or any(c.__name__ == "LCM" for c in type(ms).__mro__):
        raise ValueError(
            f"cannot convert a model with {name} model sampling: x0 / LCM / img2img prediction is not "
            "supported, only eps and v. Remove the ModelSamplingDiscrete patch that set it."
        )
    if not _is_plain_discrete_vp(ms):
        raise ValueError(
            f"cannot convert a model with {name} model sampling: Diff2Flow needs ComfyUI's discrete "
            "1000-step VP schedule (ModelSamplingDiscrete)."
        )
    return "v" if isinstance(ms, cms.V_PREDICTION) else "eps"


def schedule_of(ms: object) -> tuple[torch.Tensor, str]:
    """(alphas_cumprod in float64, prediction) of a convertible diffusion model sampling."""
    prediction = prediction_of(ms)
    return alphas_cumprod_from_discrete_sigmas(ms.sigmas.detach().cpu()), prediction


def diff2flow_of(model: Any, zero_terminal_snr: bool = False) -> Diff2Flow:
    """The alignment of a (not yet patched) ComfyUI model; ``ValueError`` if it cannot be converted."""
    ac, prediction = schedule_of(model.get_model_object("model_sampling"))
    if zero_terminal_snr:
        if prediction != "v":
            raise ValueError("zero_terminal_snr is only valid for v-prediction models: this model predicts eps. Turn it off.")
        ac = rescale_zero_terminal_snr(ac)
    return Diff2Flow(ac, prediction)


def schedule_name(alphas_cumprod: torch.Tensor) -> str:
    """``scaled_linear`` for SD's own schedule, ``custom`` for anything else (LoRA metadata)."""
    return "scaled_linear" if torch.allclose(torch.as_tensor(alphas_cumprod, dtype=torch.float64), scaled_linear(), rtol=1e-5, atol=0) else "custom"


# ---------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | os.PathLike, need_encoders: bool = True) -> tuple[Any, Any, Any]:
    """(MODEL, CLIP, VAE) of an SD checkpoint through ComfyUI's own loader, checked to be a
    diffusion model Diff2Flow can convert (``HostError`` naming the file and the reason otherwise)."""
    import comfy.sd

    path = pathlib.Path(path)
    if not path.is_file():
        raise HostError(f"checkpoint {path} does not exist: pass the .safetensors / .ckpt file of an SD1.x, SD2.x or SDXL model")
    try:
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=need_encoders, output_clip=need_encoders)[:3]
    except Exception as exc:  # ComfyUI raises RuntimeError / ValueError / safetensors errors for files it cannot read
        raise HostError(f"checkpoint {path} could not be loaded as an SD model ({exc}): pass an SD1.x, SD2.x or SDXL checkpoint") from exc
    if model is None:
        raise HostError(f"checkpoint {path} holds no diffusion model (UNet): pass a full SD checkpoint")
    try:
        prediction_of(model.get_model_object("model_sampling"))
    except ValueError as exc:
        raise HostError(f"checkpoint {path} is an unsupported model type ({type(model.model).__name__}): {exc}") from exc
    if need_encoders and (clip is None or vae is None):
        missing = " and ".join(n for n, v in (("text encoder", clip), ("VAE", vae)) if v is None)
        raise HostError(f"checkpoint {path} has no {missing}: `prepare` and `sample` need a checkpoint that includes them")
    return model, clip, vae


def file_fingerprint(path: str | os.PathLike) -> str:
    """Identity of a file for cache validity: resolved path, size and modification time."""
    p = pathlib.Path(path).resolve()
    st = p.stat()
    return hashlib.sha1(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


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


def cond_kwargs(model: Any, entry: tuple[torch.Tensor, dict], latent: torch.Tensor) -> dict[str, torch.Tensor]:
    """UNet keyword arguments for one sample: ``context`` and, for SDXL-type models, ``y``."""
    tensor, extras = entry
    kwargs = {"context": tensor.float().cpu()}
    if getattr(model.model, "adm_channels", 0):
        height, width = latent.shape[-2] * 8, latent.shape[-1] * 8
        adm = model.model.encode_adm(**{**extras, "width": width, "height": height, "target_width": width,
                                         "target_height": height, "device": torch.device("cpu")})
        if adm is not None:
            kwargs["y"] = adm.float().cpu()
    return kwargs


def lora_metadata_for(model: Any, config: TrainConfig, d2f: Diff2Flow, source_alphas_cumprod: torch.Tensor) -> Callable[[int], LoraMetadata]:
    """``metadata(step)``: what a LoRA trained on ``model`` under ``config`` records (the same for
    the node and the CLI, so both write the same format)."""
    fields = dict(objective=config.objective, prediction=d2f.prediction, zero_terminal_snr=d2f.zero_terminal_snr,
                  schedule=schedule_name(source_alphas_cumprod), rank=config.rank, alpha=config.alpha,
                  algorithm=config.algorithm, base_model_hash=base_model_hash(model))
    return lambda step: LoraMetadata(**fields, steps=step)


def text_cond_kwargs(model: Any, text: dict[str, torch.Tensor], latent: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`cond_kwargs` of an encoded caption as ``CheckpointEncoders.encode_text`` (and the
    latent cache) hold it: ``{"context", optional "pooled_output"}``."""
    return cond_kwargs(model, (text["context"], {"pooled_output": text.get("pooled_output")}), latent)


def base_model_hash(model: Any) -> str:
    """A cheap fingerprint of the base UNet: key names, shapes and the first layers' values."""
    h = hashlib.sha256()
    sd = model.model.diffusion_model.state_dict()
    for key in sorted(sd):
        h.update(f"{key}{tuple(sd[key].shape)}".encode())
    for key in sorted(sd)[:4]:
        h.update(sd[key].detach().float().cpu().numpy().tobytes()[:65536])
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------- the trainable model
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
    blocks = [*getattr(unet, "input_blocks", []), getattr(unet, "middle_block", None), *getattr(unet, "output_blocks", [])]
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


def attach_adapters(model: Any, config: TrainConfig) -> tuple[Any, torch.nn.Module, dict[str, WeightAdapter], torch.device]:
    """A clone of ``model`` with fresh ``config`` adapters as weight wrappers (the shared UNet
    weights are never modified), loaded on the compute device and ready for autograd.

    Returns (clone, its UNet, adapters by module name, device). Call under
    ``torch.inference_mode(False)`` and ``torch.enable_grad()``.
    """
    import comfy.model_management

    clone = model.clone()
    unet = clone.model.diffusion_model
    modules = select_target_modules(unet, config.targets)
    gen = torch.Generator().manual_seed(config.seed)
    adapters = {n: make_adapter(config.algorithm, m.weight.shape, config.rank, config.alpha, gen) for n, m in modules.items()}
    for n, adapter in adapters.items():
        clone.add_weight_wrapper(f"diffusion_model.{n}.weight", adapter)
    comfy.model_management.load_models_gpu([clone], memory_required=1e20, force_full_load=True)
    device = comfy.model_management.get_torch_device()
    for adapter in adapters.values():
        adapter.to(device)
    trainable_copies_of_inference_tensors(unet)
    return clone, unet, adapters, device


def unet_network(unet: torch.nn.Module):
    """``network(x_in, timestep, context, y=None)``: the raw UNet as the training engine calls it."""

    def network(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        return unet(x, t, context=context, y=y)

    return network
