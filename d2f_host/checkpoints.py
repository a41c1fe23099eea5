"""SD checkpoints and LoRA files through ComfyUI's own loaders, checked for Diff2Flow."""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import comfy.sd
import comfy.utils
import torch

from d2f_core import Diff2Flow, get_objective, scaled_linear
from d2f_core.lora_metadata import DEPTH_NORMALIZATION, LoraMetadata, read_lora_metadata
from training.config import TrainConfig

from .errors import HostError
from .model_sampling import prediction_of, schedule_of

__all__ = [
    "WEIGHT_DTYPES",
    "load_checkpoint",
    "weight_dtype_name",
    "apply_lora",
    "file_fingerprint",
    "base_model_hash",
    "schedule_name",
    "check_pairs_fit",
    "lora_metadata_for",
    "RecommendedSampling",
    "attach_recommended_sampling",
    "recommended_sampling_of",
]
log = logging.getLogger("diff2flow")

# how the base UNet's weights are stored: "default" (ComfyUI's choice for the device), or fp8 with ComfyUI's
# manual cast (each layer's weight cast to the input's dtype when it runs; the LoRA's weight wrappers apply
# after that cast, so adapters train on an fp8-stored base). UNETLoader's weight_dtype choices, less
# fp8_e4m3fn_fast: its fp8 matmuls (on GPUs that have them) serve inference, not a backward pass.
WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "fp8_e4m3fn",
    torch.float8_e5m2: "fp8_e5m2",
}


def weight_dtype_name(model: Any) -> str:
    """The dtype a MODEL's UNet weights are stored in, by UNETLoader's names (``fp8_e4m3fn``, ``bf16``, ...)."""
    dtype = model.model.get_dtype()
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def load_checkpoint(
    path: str | os.PathLike, encoders: str = "required", embedding_directory: Any = None, weight_dtype: str = "default"
) -> tuple[Any, Any, Any]:
    """(MODEL, CLIP, VAE) of an SD checkpoint through ComfyUI's own loader, checked to be a
    diffusion model Diff2Flow can convert (``HostError`` naming the file and the reason otherwise).

    ``encoders``: ``"required"`` (a checkpoint without text encoder or VAE is refused),
    ``"optional"`` (missing ones come back as ``None``, as in ComfyUI's checkpoint loader) or
    ``"skip"`` (not loaded: training from a latent cache needs only the UNet). ``weight_dtype``: one of
    :data:`WEIGHT_DTYPES`, how the UNet's weights are stored (as UNETLoader's ``weight_dtype``).
    """
    if encoders not in ("required", "optional", "skip"):
        raise ValueError(f"encoders must be 'required', 'optional' or 'skip', got {encoders!r}")
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}")
    model_options = {"dtype": WEIGHT_DTYPES[weight_dtype]} if WEIGHT_DTYPES[weight_dtype] is not None else {}
    load = encoders != "skip"
    path = pathlib.Path(path)
    if not path.is_file():
        raise HostError(
            f"checkpoint {path} does not exist: pass the .safetensors / .ckpt file of an SD1.x, SD2.x or SDXL model"
        )
    try:
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            str(path),
            output_vae=load,
            output_clip=load,
            embedding_directory=embedding_directory,
            model_options=model_options,
        )[:3]
    except Exception as exc:  # ComfyUI raises RuntimeError / ValueError / safetensors errors for files it cannot read
        raise HostError(
            f"checkpoint {path} could not be loaded as an SD model ({exc}): pass an SD1.x, SD2.x or SDXL checkpoint"
        ) from exc
    if model is None:
        raise HostError(f"checkpoint {path} holds no diffusion model (UNet): pass a full SD checkpoint")
    try:
        prediction_of(model.get_model_object("model_sampling"))
    except ValueError as exc:
        raise HostError(
            f"checkpoint {path} is an unsupported model type ({type(model.model).__name__}): {exc}"
        ) from exc
    if encoders == "required" and (clip is None or vae is None):
        missing = " and ".join(n for n, v in (("text encoder", clip), ("VAE", vae)) if v is None)
        raise HostError(
            f"checkpoint {path} has no {missing}: `prepare` and `sample` need a checkpoint that includes them"
        )
    return model, clip, vae


def apply_lora(
    model: Any,
    clip: Any,
    path: str | os.PathLike,
    strength_model: float = 1.0,
    strength_clip: float = 0.0,
    checkpoint: str = "the checkpoint",
    tensors: dict[str, torch.Tensor] | None = None,
) -> tuple[Any, Any, LoraMetadata | None]:
    """``(model, clip, metadata)`` with the LoRA file at ``path`` loaded as stock loaders do.

    ``metadata`` is the file's Diff2Flow metadata (``None`` for a plain LoRA); a LoRA trained on
    the other prediction type than ``model`` is refused with the fix named (``checkpoint`` names the
    base model in that message). ``tensors``: the file's tensors when the caller has read them already.
    """
    name = pathlib.Path(path).name
    metadata = read_lora_metadata(path)
    if metadata is not None:
        prediction = prediction_of(model.get_model_object("model_sampling"))
        if metadata.prediction != prediction:
            raise ValueError(
                f"LoRA '{name}' was trained on a {metadata.prediction}-prediction model, but {checkpoint} predicts "
                f"{prediction}: load the LoRA on the base model it was trained on."
            )
    lora = tensors if tensors is not None else comfy.utils.load_torch_file(str(path), safe_load=True)
    model, clip = comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)
    return model, clip, metadata


def file_fingerprint(path: str | os.PathLike) -> str:
    """Identity of a file for cache validity: resolved path, size and modification time."""
    p = pathlib.Path(path).resolve()
    st = p.stat()
    return hashlib.sha1(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def _base_unet_state(model: Any) -> dict[str, torch.Tensor]:
    """The base UNet's tensors by name, whichever clone of ``model`` ComfyUI has loaded last: loading a
    clone applies its object patches (a depth model's widened convolution) and weight patches (a LoRA) to
    the shared UNet in place, and ``ModelPatcher`` keeps the originals in ``object_patches_backup`` and
    ``backup`` until it unpatches."""
    prefix = "diffusion_model."
    sd = dict(model.model.diffusion_model.state_dict())
    replaced = []
    for name, original in getattr(model, "object_patches_backup", {}).items():
        if name.startswith(prefix) and isinstance(original, torch.nn.Module):
            path = name[len(prefix) :]
            replaced.append(path + ".")
            sd = {k: v for k, v in sd.items() if not k.startswith(path + ".")}
            sd.update({f"{path}.{k}": v for k, v in original.state_dict().items()})
    for key, saved in getattr(model, "backup", {}).items():
        path = key[len(prefix) :]
        # a weight patch of an object-patched module backs up the patch's weight, not the base's
        if key.startswith(prefix) and path in sd and not any(path.startswith(r) for r in replaced):
            sd[path] = saved.weight
    return sd


def base_model_hash(model: Any) -> str:
    """A cheap fingerprint of the base UNet: key names, shapes and the first layers' values (of the
    unpatched UNet, even while a patched clone of it is loaded)."""
    h = hashlib.sha256()
    sd = _base_unet_state(model)
    for key in sorted(sd):
        h.update(f"{key}{tuple(sd[key].shape)}".encode())
    for key in sorted(sd)[:4]:
        h.update(sd[key].detach().float().cpu().numpy().tobytes()[:65536])
    return h.hexdigest()[:16]


def schedule_name(alphas_cumprod: torch.Tensor) -> str:
    """``scaled_linear`` for SD's own schedule, ``custom`` for anything else (LoRA metadata)."""
    return (
        "scaled_linear"
        if torch.allclose(torch.as_tensor(alphas_cumprod, dtype=torch.float64), scaled_linear(), rtol=1e-5, atol=0)
        else "custom"
    )


def check_pairs_fit(model: Any, pairs: Any, folder: str) -> None:
    """Refuse reflow pairs (``training.pairs.Pairs``) whose latents do not fit ``model``; warn when
    they come from another base model (a reflow student starts from its teacher)."""
    channels = model.model.latent_format.latent_channels
    if pairs.latents.shape[1] != channels:
        raise ValueError(
            f"the pairs in {folder} hold {pairs.latents.shape[1]}-channel latents but this model needs "
            f"{channels}: generate the pairs with a model of this family"
        )
    teacher = pairs.settings.get("teacher", {}).get("checkpoint_hash")
    if teacher not in (None, base_model_hash(model)):
        log.warning(
            "the pairs in %s come from another base model (UNet fingerprint %s): reflow usually trains the "
            "teacher's own base model",
            folder,
            teacher,
        )


def lora_metadata_for(
    model: Any, config: TrainConfig, d2f: Diff2Flow, teacher_cfg: float | None = None, task: str = "image"
) -> Callable[[int], LoraMetadata]:
    """``metadata(step)``: what a LoRA trained on ``model`` under ``config`` with alignment ``d2f``
    records (the same for the node and the CLI, so both write the same format): the objective's
    recommended sampling from the registry, and ``teacher_cfg``, the guidance of the pairs a
    ``reflow`` LoRA was trained on (``None`` for other data).

    ``task="depth"``: an image-to-depth model (``model`` is the BASE model, before
    ``d2f_host.depth.widen_model``: its hash names what the file loads onto), recorded with its
    targets' normalisation, the objective's depth steps and cfg 1 (the prompt is the empty one, so
    guidance changes nothing but doubles the work)."""
    source, _ = schedule_of(model.get_model_object("model_sampling"))
    objective = get_objective(config.objective)
    depth = task == "depth"
    fields = dict(
        objective=config.objective,
        prediction=d2f.prediction,
        zero_terminal_snr=d2f.zero_terminal_snr,
        schedule=schedule_name(source),
        rank=config.rank,
        alpha=config.alpha,
        algorithm=config.algorithm,
        base_model_hash=base_model_hash(model),
        sampler=objective.sampler,
        sampling_steps=objective.recommended_steps(task),
        sampling_cfg=1.0 if depth else objective.cfg,
        teacher_cfg=teacher_cfg,
        task=task,
        normalization=DEPTH_NORMALIZATION if depth else None,
        optimizer=config.optimizer,
        learning_rate=config.learning_rate,
        loss=config.resolved_loss,
        huber_c=config.huber_c if config.huber_c > 0 else None,  # 0: the default c, recorded by its absence
        inverted_share=config.inverted_share if config.inverted_share > 0 else None,  # 0: generated pairs only
        grid_share=config.resolved_grid_share if config.resolved_grid_share > 0 else None,  # 0: none on the grid
        base_weight_dtype=weight_dtype_name(model),
    )
    return lambda step: LoraMetadata(**fields, steps=step)


# ------------------------------------------------------------ recommended sampling on a MODEL
SAMPLING_ATTACHMENT = "diff2flow.recommended_sampling"  # ModelPatcher attachment key (copied by clone())


@dataclass(frozen=True)
class RecommendedSampling:
    """The sampling settings a MODEL carries from the Diff2Flow LoRA it was loaded or trained with
    (``source`` names that LoRA for logs and the sampler node's message)."""

    sampler: str
    steps: int
    cfg: float
    source: str


def attach_recommended_sampling(model: Any, metadata: LoraMetadata, source: str) -> Any:
    """Attach ``metadata``'s recommended sampler, steps and cfg to ``model`` (a ModelPatcher clone the
    caller owns: ComfyUI's ``set_attachments``, which every later ``clone()`` keeps) and return it."""
    sampler, steps, cfg = metadata.sampling_defaults()
    model.set_attachments(SAMPLING_ATTACHMENT, RecommendedSampling(sampler, int(steps), float(cfg), source))
    return model


def recommended_sampling_of(model: Any) -> RecommendedSampling | None:
    """What :func:`attach_recommended_sampling` attached to ``model`` (``None`` for any other model)."""
    get = getattr(model, "get_attachment", None)
    value = get(SAMPLING_ATTACHMENT) if get is not None else None
    return value if isinstance(value, RecommendedSampling) else None
