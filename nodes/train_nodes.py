"""Training nodes: Train Diff2Flow LoRA and Save Diff2Flow LoRA.

The loop lives in ``training``; this module turns ComfyUI inputs into ``TrainingData``, attaches
``d2f_core.lora`` adapters to a clone of the model with ``ModelPatcher.add_weight_wrapper`` (the
shared UNet weights are never touched), and reports progress through ComfyUI's ProgressBar and
``progress.report_progress`` (the live loss chart of the page).
"""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, Optional

import torch

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from d2f_core.lora_metadata import LoraMetadata
from d2f_host.checkpoints import attach_recommended_sampling, check_pairs_fit, lora_metadata_for
from d2f_host.conditioning import cond_kwargs, latent_decoder
from d2f_host.model_sampling import alignment_of, flow_model_for, is_patched
from d2f_host.depth import is_image_conditioned, widen_model
from d2f_host.unet import attach_adapters, gradient_checkpointing, unet_network
from training import TrainConfig, Trainer, TrainingData
from training.config import option_specs
from training.depth_dataset import depth_pixels
from training.files import (STATE_SUFFIX, RunFiles, load_training_state, sanitize_filename, save_lora, save_run_lora,
                            write_periodic_save)
from training.pairs import load_pairs
from training.previews import Preview, Previewer, PreviewSettings, no_preview_image

from .options import config_input
from .progress import report_progress
from .reflow_nodes import Pairs

CATEGORY = "Diff2Flow/training"
NO_RESUME = "None"
log = logging.getLogger("diff2flow")

LoraModel = io.Custom("LORA_MODEL")
LossMap = io.Custom("LOSS_MAP")


class Diff2FlowLora(dict):
    """LORA_MODEL value: ComfyUI-native LoRA tensors (a plain dict for stock nodes) that also
    carries the Diff2Flow metadata for Save Diff2Flow LoRA."""

    metadata: Optional[LoraMetadata] = None


def lora_folder() -> pathlib.Path:
    return pathlib.Path(folder_paths.get_folder_paths("loras")[0])


def training_states() -> list[str]:
    found = []
    for folder in folder_paths.get_folder_paths("loras"):
        if os.path.isdir(folder):
            found += sorted(p.name for p in pathlib.Path(folder).glob(f"*{STATE_SUFFIX}"))
    return [NO_RESUME] + found


# ---------------------------------------------------------------------- inputs -> TrainingData
def split_latents(latents: list[dict]) -> list[torch.Tensor]:
    """LATENT dicts (a batch, or the list ComfyUI's dataset nodes give) -> [C, H, W] tensors."""
    out = []
    for item in latents:
        samples = item["samples"] if isinstance(item, dict) else item
        if samples.is_nested:
            samples = list(samples.unbind())
        out.extend(s for s in samples)
    return out


def flatten_conditioning(positive: list) -> list[tuple[torch.Tensor, dict]]:
    """CONDITIONING inputs (one, or one per latent) -> a flat list of (cross-attn tensor, extras)."""
    flat = []
    for cond in positive:
        for entry in cond:
            tensor, extras = entry[0], entry[1]
            flat.extend((tensor[i : i + 1], extras) for i in range(tensor.shape[0]))
    return flat


def build_training_data(model, latents: list[dict], positive: list, negative: Optional[list]) -> TrainingData:
    samples = split_latents(latents)
    if not samples:
        raise ValueError("latents is empty: connect at least one latent (VAE Encode, or a dataset node)")
    channels = model.model.latent_format.latent_channels
    for i, s in enumerate(samples):
        if s.ndim != 3 or s.shape[0] != channels:
            raise ValueError(
                f"latent {i} has shape {tuple(s.shape)} but this model needs {channels} latent channels: "
                "encode the images with this model's VAE"
            )
    conds = flatten_conditioning(positive)
    if not conds:
        raise ValueError("positive conditioning is empty: connect a CLIP Text Encode (one for all latents or one per latent)")
    if len(conds) not in (1, len(samples)):
        raise ValueError(
            f"{len(samples)} latents but {len(conds)} positive conditionings: connect one conditioning for all "
            "latents or exactly one per latent"
        )
    if len(conds) == 1:
        conds = conds * len(samples)
    scaled = [model.model.process_latent_in(s[None].float()).squeeze(0).cpu() for s in samples]
    positive_kwargs = unet_kwargs(model, "positive", conds, samples)
    neg = flatten_conditioning(negative) if negative else []
    # one unconditional entry per sample: SDXL's y carries the sample's own size
    uncond = unet_kwargs(model, "negative", neg[:1] * len(samples), samples) if neg else None
    return TrainingData(scaled, positive_kwargs, uncond)


def unet_kwargs(model, input_name: str, entries: list, samples: list[torch.Tensor]) -> list[dict]:
    """The UNet arguments of each sample's conditioning entry; errors name the node input."""
    try:
        return [cond_kwargs(model, entry, sample) for entry, sample in zip(entries, samples)]
    except ValueError as exc:
        raise ValueError(f"{input_name}: {exc}") from exc


# ---------------------------------------------------------------------- image + depth pairs -> TrainingData
VAE_BATCH = 8  # pairs per VAE call


def split_images(images: Optional[list]) -> list[torch.Tensor]:
    """IMAGE inputs (a batch, or a list of batches of different sizes) -> [H, W, C] tensors."""
    return [image for batch in images or [] for image in batch]


def check_depth_inputs(model, config: TrainConfig, depth_images: Optional[list], depth_maps: Optional[list],
                       latents: Optional[list], positive: Optional[list], pairs: Optional[str], vae: Any) -> bool:
    """Whether this run trains a depth model (``depth_images`` + ``depth_maps`` connected), with every
    input that cannot go with that refused before any compute, naming the input and the fix."""
    if depth_images is None and depth_maps is None:
        if is_image_conditioned(model):
            raise ValueError("this MODEL takes an image latent (a depth model: its first convolution is widened), so it "
                             "trains on image + depth pairs: connect depth_images and depth_maps instead of latents / "
                             "pairs, or connect the base model")
        return False
    if depth_images is None or depth_maps is None:
        given, other = ("depth_images", "depth_maps") if depth_maps is None else ("depth_maps", "depth_images")
        raise ValueError(f"{given} is connected but {other} is not: a depth model trains on pairs, connect both "
                         "(the images and their depth maps, in the same order)")
    if latents is not None or pairs:
        raise ValueError("connect either depth_images + depth_maps (a depth model) or latents / pairs (a LoRA of "
                         f"images), not both: {'latents' if latents is not None else 'pairs'} is connected too")
    if vae is None:
        raise ValueError("depth training encodes depth_images and depth_maps with the model's VAE: connect the vae "
                         "input (the checkpoint's VAE)")
    if config.preview_every > 0:
        raise ValueError(f"preview_every {config.preview_every}: previews sample text prompts, which a depth model "
                         "cannot (it needs an image): set preview_every 0")
    if positive is None:
        raise ValueError("depth training needs positive: connect a CLIP Text Encode with an empty prompt (a depth "
                         "model is trained and sampled on the empty prompt)")
    return True


def build_depth_training_data(model, vae: Any, depth_images: list, depth_maps: list, positive: list,
                              negative: Optional[list]) -> TrainingData:
    """TrainingData of image + depth pairs (docs/MATH.md section 13): latents = the VAE latents of the
    normalised depth maps (2 % / 98 % quantiles to [-1, 1], three channels), ``extras[i]["concat"]`` =
    the VAE latent of image i, both in ``model``'s latent scale (d2f_host.depth's convention). A depth
    map is an IMAGE (its channel mean; e.g. a grayscale depth PNG from Load Image). Counts, sizes and flat
    maps are checked before anything is encoded."""
    images, maps = split_images(depth_images), split_images(depth_maps)
    if not images:
        raise ValueError("depth_images is empty: connect at least one image")
    if len(images) != len(maps):
        raise ValueError(f"{len(images)} depth_images but {len(maps)} depth_maps: connect one depth map per image, in "
                         "the same order")
    for i, (image, depth) in enumerate(zip(images, maps)):
        if image.shape[:2] != depth.shape[:2]:
            raise ValueError(f"pair {i}: the image is {image.shape[1]}x{image.shape[0]} but its depth map is "
                             f"{depth.shape[1]}x{depth.shape[0]}: a depth map must be aligned with its image pixel "
                             "for pixel (resize both the same way)")
    targets = [depth_pixels(d[..., :3].float().mean(-1) if d.ndim == 3 else d.float(), f"depth map {i} (depth_maps)")
               for i, d in enumerate(maps)]
    conds = flatten_conditioning(positive)
    if len(conds) not in (1, len(images)):
        raise ValueError(f"{len(images)} image + depth pairs but {len(conds)} positive conditionings: connect one "
                         "(the empty prompt) for all pairs")
    if len(conds) == 1:
        conds = conds * len(images)

    def encode(pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        out, start = [], 0
        while start < len(pixels):  # consecutive pairs of one size share a VAE call
            end = start + 1
            while end < len(pixels) and end - start < VAE_BATCH and pixels[end].shape == pixels[start].shape:
                end += 1
            with torch.no_grad():  # data, not part of any graph (a node called outside ComfyUI's inference mode too)
                raw = vae.encode(torch.stack([p[..., :3].float() for p in pixels[start:end]]))
                out.extend(model.model.process_latent_in(raw.float()).cpu())
            start = end
        # plain tensors (ComfyUI runs nodes under inference mode): the trainer differentiates through the network
        with torch.inference_mode(False):
            return [t.detach().clone() for t in out]

    latents, concats = encode(targets), encode(images)
    positive_kwargs = unet_kwargs(model, "positive", conds, latents)
    neg = flatten_conditioning(negative) if negative else []
    uncond = unet_kwargs(model, "negative", neg[:1] * len(latents), latents) if neg else None
    return TrainingData(latents, positive_kwargs, uncond, [{"concat": c} for c in concats])


def lora_result(tensors: dict, metadata: LoraMetadata) -> Diff2FlowLora:
    lora = Diff2FlowLora(tensors)
    lora.metadata = metadata
    return lora


def trained_model(model, lora: dict, objective: str, zero_terminal_snr: bool):
    """The input model with the LoRA loaded as stock loaders do, as the flow model the objective
    samples as (``Objective.flow_model``), carrying the LoRA's recommended sampling (as Diff2Flow
    Checkpoint Loader's output does) when the LoRA has Diff2Flow metadata."""
    out, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    flow = flow_model_for(out, objective, zero_terminal_snr)
    metadata = getattr(lora, "metadata", None)
    if metadata is not None:
        attach_recommended_sampling(flow, metadata, f"the trained LoRA (objective {metadata.objective})")
    return flow


# the preview options (TrainConfig fields): their widgets come after the older ones (see define_schema)
PREVIEW_OPTIONS = tuple(spec.name for spec in option_specs() if spec.name.startswith("preview_"))


def check_preview_inputs(config: TrainConfig, vae: Any, preview_prompts: Optional[list], negative: Optional[list],
                         depth: bool = False) -> None:
    """Refuse previews the node cannot make, before any training, naming the input and the fix; with
    previews off, name the inputs only previews would use (``vae`` serves depth training too)."""
    if config.preview_every <= 0:
        unused = [name for name, value in (("preview_prompts", preview_prompts), ("vae", None if depth else vae))
                  if value is not None]
        if unused:
            are = "are" if len(unused) > 1 else "is"
            log.warning("Diff2Flow: %s %s connected but preview_every is 0: no previews are sampled, so nothing uses "
                        "them (set preview_every N to sample previews every N steps)", " and ".join(unused), are)
        return
    if vae is None:
        raise ValueError(f"preview_every {config.preview_every} needs a VAE to decode the previews: connect the vae "
                         "input (the checkpoint's VAE), or set preview_every 0 (previews off)")
    if not preview_prompts or not flatten_conditioning(preview_prompts):
        raise ValueError(f"preview_every {config.preview_every} needs prompts: connect preview_prompts (a CLIP Text "
                         "Encode; one per prompt, or a batch), or set preview_every 0 (previews off)")
    cfg = PreviewSettings.from_config(config).cfg
    if cfg != 1.0 and not negative:
        raise ValueError(f"previews at cfg {cfg:g} need an unconditional prompt: connect negative (an empty CLIP Text "
                         "Encode), or set preview_cfg 1")


def check_zero_terminal_snr(model, config: TrainConfig) -> None:
    """Refuse to train a MODEL that Diff2Flow Model Patch converted with zero terminal SNR while the run's
    own zero_terminal_snr is off: the conversion would be dropped in silence."""
    if is_patched(model) and model.get_model_object("model_sampling").d2f.zero_terminal_snr and not config.zero_terminal_snr:
        raise ValueError("zero_terminal_snr is off, but this MODEL was converted with zero terminal SNR (Diff2Flow Model "
                         "Patch): set zero_terminal_snr on to train it as converted, or connect the model before the patch")


def check_pairs_inputs(config: TrainConfig, latents: Optional[list], positive: Optional[list],
                       negative: Optional[list]) -> None:
    """Refuse the inputs that training on reflow pairs would ignore: the pairs bring their own images,
    prompts and negative (the teacher's), so latents / positive are alternatives to them, and negative
    serves only the previews."""
    given = [name for name, value in (("latents", latents), ("positive", positive)) if value is not None]
    if given:
        raise ValueError(f"pairs and {' / '.join(given)} are both connected: a run trains on reflow pairs (their images "
                         f"and prompts) or on latents + positive, not both. Disconnect {' and '.join(given)} to train on "
                         "the pairs, or disconnect pairs to train on the latents")
    if negative is not None and config.preview_every <= 0:
        raise ValueError("negative is connected but the run trains on pairs, whose caption dropout uses the teacher's own "
                         "negative stored with them: negative would only serve previews, which are off. Disconnect "
                         "negative, or set preview_every > 0")


def node_previewer(model, config: TrainConfig, vae: Any, preview_prompts: list, negative: Optional[list], unet,
                   device, pbar: comfy.utils.ProgressBar) -> Previewer:
    """The previews of a node run: each grid shown on the node through ComfyUI's progress preview."""
    from comfy.cli_args import args

    probe = torch.zeros(model.model.latent_format.latent_channels, config.preview_height // 8, config.preview_width // 8)
    entries = flatten_conditioning(preview_prompts)
    prompts = unet_kwargs(model, "preview_prompts", entries, [probe] * len(entries))
    uncond = unet_kwargs(model, "negative", flatten_conditioning(negative)[:1], [probe])[0] if negative else None

    def show(preview: Preview) -> None:
        from PIL import Image

        pixels = (preview.grid.numpy() * 255).round().astype("uint8")
        # ComfyUI's progress preview (the stock samplers' latent previews use it): ("JPEG", image, max size)
        pbar.update_absolute(preview.step, config.steps, ("JPEG", Image.fromarray(pixels), args.preview_size))

    return Previewer(PreviewSettings.from_config(config), prompts, uncond, latent_decoder(model, vae, unet, device),
                     model.model.latent_format.latent_channels, on_preview=show)


def train_lora(model, latents: list, positive: list, negative: Optional[list], config: TrainConfig,
               output_name: str = "diff2flow_lora", resume_from: str = NO_RESUME,
               pairs: Optional[str] = None, vae: Any = None,
               preview_prompts: Optional[list] = None, depth_images: Optional[list] = None,
               depth_maps: Optional[list] = None) -> tuple[Any, Diff2FlowLora, dict, int]:
    """Train a LoRA on a clone of ``model``; returns (model with LoRA, LoRA, loss map, steps).

    With ``pairs`` (a folder of Diff2Flow Reflow Pairs) the training data are the pairs (images,
    their prompts, their noise) instead of ``latents`` / ``positive``. With ``depth_images`` and
    ``depth_maps`` (IMAGE inputs, and ``vae`` to encode them) it trains an image-to-depth model: the
    model widened by ``d2f_host.depth.widen_model`` (unless it already is a depth model), its first
    convolution trained in full; the LoRA's metadata says ``task = depth``.
    :func:`train_lora_with_previews` also returns the preview grids."""
    return train_lora_with_previews(model, latents, positive, negative, config, output_name, resume_from, pairs, vae,
                                    preview_prompts, depth_images, depth_maps)[:4]


def train_lora_with_previews(model, latents: list, positive: list, negative: Optional[list], config: TrainConfig,
                             output_name: str = "diff2flow_lora", resume_from: str = NO_RESUME,
                             pairs: Optional[str] = None, vae: Any = None,
                             preview_prompts: Optional[list] = None, depth_images: Optional[list] = None,
                             depth_maps: Optional[list] = None) -> tuple[Any, Diff2FlowLora, dict, int, torch.Tensor]:
    """:func:`train_lora` and, with ``preview_every`` > 0, previews of ``preview_prompts`` decoded by
    ``vae`` (training/previews.py): returns its four results and the grids as an IMAGE batch
    [N, H, W, 3] (one black 1x1 image with previews off)."""
    depth = check_depth_inputs(model, config, depth_images, depth_maps, latents, positive, pairs, vae)
    check_preview_inputs(config, vae, preview_prompts, negative, depth)
    check_zero_terminal_snr(model, config)
    d2f = alignment_of(model, config.zero_terminal_snr)
    teacher_cfg = None
    if depth:
        data = build_depth_training_data(model, vae, depth_images, depth_maps, positive, negative)
    elif pairs:
        check_pairs_inputs(config, latents, positive, negative)
        loaded = load_pairs(pairs)
        check_pairs_fit(model, loaded, pairs)
        data, teacher_cfg = loaded.training_data(), float(loaded.settings["cfg"])
    elif latents is None or positive is None:  # not connected (an empty batch gets its own error below)
        raise ValueError("connect latents and positive (captioned training data), or pairs (from Diff2Flow Reflow Pairs)")
    else:
        data = build_training_data(model, latents, positive, negative)
    files = RunFiles.named(lora_folder(), output_name)
    files.remove_stale_temporaries()
    metadata = lora_metadata_for(model, config, d2f, teacher_cfg=teacher_cfg, task="depth" if depth else "image")
    if depth and not is_image_conditioned(model):
        model = widen_model(model)  # a clone: the input MODEL is never changed
    with torch.inference_mode(False), torch.enable_grad():
        clone, unet, adapters, device = attach_adapters(model, config)
        trainer = Trainer(unet_network(unet), adapters, d2f, config, data, device)
        if resume_from and resume_from != NO_RESUME:
            state_path = resume_from if os.path.isabs(resume_from) else str(lora_folder() / resume_from)
            trainer.load_state_dict(load_training_state(state_path))
            log.info("Diff2Flow: resumed %s at step %d", resume_from, trainer.step)

        def save(t: Trainer) -> None:
            write_periodic_save(files, t, metadata(t.step))

        pbar = comfy.utils.ProgressBar(config.steps)
        pbar.update_absolute(trainer.step, config.steps)
        previewer = node_previewer(model, config, vae, preview_prompts, negative, unet, device, pbar) \
            if config.preview_every > 0 else None
        with gradient_checkpointing(unet, config.gradient_checkpointing):
            trainer.run(
                on_step=lambda step, loss, lr: report_progress(pbar, config.steps, step, loss, lr),
                check_cancel=comfy.model_management.throw_exception_if_processing_interrupted,
                save=save,
                preview=previewer,
            )
        for adapter in adapters.values():
            adapter.requires_grad_(False)
        save_run_lora(files, trainer, metadata(trainer.step), raw=True)  # <output_name>_raw (save_raw with EMA)
        # the outputs hold the saved weights: the EMA's when EMA is on
        lora = lora_result({k: v.cpu() for k, v in trainer.lora_state_dict().items()}, metadata(trainer.step))
    grids = previewer.grids() if previewer is not None else no_preview_image()
    return (trained_model(model, lora, config.objective, d2f.zero_terminal_snr), lora, {"loss": list(trainer.losses)},
            trainer.step, grids)


class TrainDiff2FlowLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="D2F_TrainLoRA",
            display_name="Train Diff2Flow LoRA",
            category=CATEGORY,
            is_input_list=True,
            description=(
                "Fine-tunes a LoRA on an SD model under the Diff2Flow objective (the diffusion prior trained as a "
                "flow-matching model; naive FM and plain diffusion for comparison). The input model is never "
                "modified. Saves every N steps (LoRA + resumable training state) into models/loras; Cancel stops "
                "within one step and keeps the last save. With preview_every > 0 it samples preview_prompts at step 0 "
                "and every N steps (the EMA weights when EMA is on), shows the latest grid on the node and outputs "
                "every grid as IMAGE; previews never change the training."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base SD1.x / SD2.x / SDXL model (eps or v prediction)."),
                io.Latent.Input("latents", optional=True, tooltip="Training latents: a LATENT batch, or the list from ComfyUI's dataset nodes (not with pairs)."),
                io.Conditioning.Input("positive", optional=True, tooltip="Captions: one conditioning for all latents, or one per latent (not with pairs)."),
                io.Conditioning.Input("negative", optional=True, tooltip="Empty / negative conditioning used for caption dropout (keeps CFG working); with pairs only for previews (the pairs carry their own)."),
                Pairs.Input("pairs", optional=True, tooltip="Reflow pairs from Diff2Flow Reflow Pairs: train on them (objective 'reflow') instead of latents / positive."),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the previews (preview_every > 0): the checkpoint's VAE."),
                io.Conditioning.Input("preview_prompts", optional=True, tooltip="The prompts of the previews (preview_every > 0): one CLIP Text Encode per prompt, or a batch; the negative input is their unconditional prompt."),
                io.Image.Input("depth_images", optional=True, tooltip="Train an image-to-depth model: the images (a batch, or a list of batches), with depth_maps, vae and positive = an empty CLIP Text Encode, instead of latents. The model's first convolution is widened to take the image latent and trained in full; the saved file loads with a depth model loader."),
                io.Image.Input("depth_maps", optional=True, tooltip="The depth map of each of depth_images, in the same order and at the same size (grayscale; only order and relative differences matter: each is normalised by its 2 % / 98 % quantiles). Depth (far = bright) by convention."),
                *[config_input(spec) for spec in option_specs() if spec.name not in PREVIEW_OPTIONS],
                io.String.Input("output_name", default="diff2flow_lora", tooltip="File name stem for periodic saves in models/loras (<name>_<step>.safetensors, <name>.d2fstate; <name>_raw.safetensors with save_raw)."),
                io.Combo.Input("resume_from", options=training_states(), default=NO_RESUME, tooltip="A training state (.d2fstate) from an earlier run's periodic save, to continue it exactly."),
                # after the older widgets, so a saved workflow's widget values keep their places
                *[config_input(spec) for spec in option_specs() if spec.name in PREVIEW_OPTIONS],
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the trained LoRA (EMA weights when ema_decay > 0), as the flow model its objective samples as (the Diff2Flow patch; naive-flow sampling for naive_fm), carrying the LoRA's recommended steps and cfg for Diff2Flow KSampler."),
                LoraModel.Output(tooltip="The trained LoRA (ComfyUI-native keys; the EMA weights when ema_decay > 0): Save Diff2Flow LoRA, SaveLoRA or LoraModelLoader."),
                LossMap.Output(tooltip="Loss per step, for Loss Graph."),
                io.Int.Output(display_name="steps", tooltip="Steps trained in total."),
                io.Image.Output(display_name="previews", tooltip="The preview grid of every preview step (step 0, then every preview_every steps; the EMA weights when EMA is on), as an IMAGE batch for Preview / Save Image. With previews off: one black 1x1 image."),
            ],
        )

    @classmethod
    def execute(cls, model, latents=None, positive=None, **lists) -> io.NodeOutput:
        first = {k: v[0] if isinstance(v, list) and v else v for k, v in lists.items()}
        negative = lists.get("negative")
        config = TrainConfig(**{spec.name: first[spec.name] for spec in option_specs()})
        result = train_lora_with_previews(model[0], latents, positive, negative, config, first["output_name"],
                                          first["resume_from"], first.get("pairs"), first.get("vae"),
                                          lists.get("preview_prompts"), lists.get("depth_images"), lists.get("depth_maps"))
        return io.NodeOutput(*result)


class SaveDiff2FlowLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="D2F_SaveLoRA",
            display_name="Save Diff2Flow LoRA",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Saves a LoRA into models/loras (so LoraLoader and Diff2Flow Checkpoint Loader list it) as "
                "safetensors with ComfyUI-native keys and Diff2Flow metadata. The write is atomic; an existing "
                "file is never overwritten unless asked."
            ),
            inputs=[
                LoraModel.Input("lora", tooltip="The LoRA from Train Diff2Flow LoRA."),
                io.String.Input("filename", default="diff2flow_lora", tooltip="File name (no folders; unsafe characters are replaced)."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of that name instead of adding a counter."),
            ],
            outputs=[io.String.Output(tooltip="The saved file's name inside models/loras.")],
        )

    @classmethod
    def execute(cls, lora: dict, filename: str, overwrite: bool) -> io.NodeOutput:
        if not lora:
            raise ValueError("lora is empty: connect the LORA_MODEL output of Train Diff2Flow LoRA")
        folder = lora_folder()
        name = sanitize_filename(filename)
        path = folder / name
        counter = 1
        while path.exists() and not overwrite:
            path = folder / f"{name[: -len('.safetensors')]}_{counter:03d}.safetensors"
            counter += 1
        save_lora(path, lora, getattr(lora, "metadata", None))
        return io.NodeOutput(path.name, ui={"text": [f"saved {path}"]})


NODES = [TrainDiff2FlowLora, SaveDiff2FlowLora]
