"""Training nodes: Train Diff2Flow LoRA and Save Diff2Flow LoRA.

The node checks and converts its inputs (``train_inputs``), assembles the run on a clone of the
model (``d2f_host.training_run.prepare_run``, shared with the headless ``train`` command: adapters as
weight wrappers, the shared UNet weights never touched), and runs the engine with ComfyUI's
ProgressBar, cancel button and progress preview, and ``progress.report_progress`` (the live loss
chart of the page).
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, NamedTuple

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from d2f_core.lora_metadata import LoraMetadata
from d2f_host.conditioning import latent_decoder
from d2f_host.training_run import PreparedRun, prepare_run
from training import TrainConfig
from training.config import option_specs
from training.files import (
    STATE_SUFFIX,
    RunFiles,
    load_training_state,
    sanitize_filename,
    save_lora,
    save_run_lora,
    write_periodic_save,
)
from training.previews import Preview, Previewer, PreviewSettings, no_preview_image

from .options import config_input
from .progress import report_progress, report_validation
from .reflow_nodes import Pairs
from .train_inputs import TrainingInputs, check_training_inputs, flatten_conditioning, run_data, unet_kwargs

CATEGORY = "Diff2Flow/training"
NO_RESUME = "None"
log = logging.getLogger("diff2flow")

LoraModel = io.Custom("LORA_MODEL")
LossMap = io.Custom("LOSS_MAP")


class Diff2FlowLora(dict):
    """LORA_MODEL value: ComfyUI-native LoRA tensors (a plain dict for stock nodes) that also
    carries the Diff2Flow metadata for Save Diff2Flow LoRA."""

    metadata: LoraMetadata | None = None


def lora_folder() -> pathlib.Path:
    return pathlib.Path(folder_paths.get_folder_paths("loras")[0])


def training_states() -> list[str]:
    found = []
    for folder in folder_paths.get_folder_paths("loras"):
        if os.path.isdir(folder):
            found += sorted(p.name for p in pathlib.Path(folder).glob(f"*{STATE_SUFFIX}"))
    return [NO_RESUME] + found


def lora_result(tensors: dict, metadata: LoraMetadata) -> Diff2FlowLora:
    lora = Diff2FlowLora(tensors)
    lora.metadata = metadata
    return lora


# the options whose widgets come after output_name and resume_from, in field order: the previews', and those
# added after them (saved workflows store widget values by position; see define_schema)
PREVIEW_OPTIONS = tuple(spec.name for spec in option_specs() if spec.name.startswith("preview_"))
# every field from the first preview option on: the previews', the validation options, the loss options, ...
_FIELD_NAMES = [spec.name for spec in option_specs()]
LATE_OPTIONS = tuple(_FIELD_NAMES[_FIELD_NAMES.index(PREVIEW_OPTIONS[0]) :])


def node_previewer(run: PreparedRun, inputs: TrainingInputs, pbar: comfy.utils.ProgressBar) -> Previewer:
    """The previews of a node run: ``inputs.preview_prompts`` against ``inputs.negative``, decoded by
    ``inputs.vae``, each grid shown on the node through ComfyUI's progress preview."""
    from comfy.cli_args import args

    model, config = run.model, run.trainer.config
    probe = torch.zeros(
        model.model.latent_format.latent_channels, config.preview_height // 8, config.preview_width // 8
    )
    entries = flatten_conditioning(inputs.preview_prompts)
    prompts = unet_kwargs(model, "preview_prompts", entries, [probe] * len(entries))
    negative = inputs.negative
    uncond = unet_kwargs(model, "negative", flatten_conditioning(negative)[:1], [probe])[0] if negative else None

    def show(preview: Preview) -> None:
        from PIL import Image

        pixels = (preview.grid.numpy() * 255).round().astype("uint8")
        # ComfyUI's progress preview (the stock samplers' latent previews use it): ("JPEG", image, max size)
        pbar.update_absolute(preview.step, config.steps, ("JPEG", Image.fromarray(pixels), args.preview_size))

    return Previewer(
        PreviewSettings.from_config(config),
        prompts,
        uncond,
        latent_decoder(model, inputs.vae, run.unet, run.device),
        model.model.latent_format.latent_channels,
        on_preview=show,
    )


class TrainedLora(NamedTuple):
    """The node's outputs: the model with the LoRA, the LoRA, the loss map, the steps trained and
    the preview grids (one black 1x1 image with previews off)."""

    model: Any
    lora: Diff2FlowLora
    loss_map: dict
    steps: int
    previews: torch.Tensor


def train_lora(
    model,
    config: TrainConfig,
    inputs: TrainingInputs,
    output_name: str = "diff2flow_lora",
    resume_from: str = NO_RESUME,
) -> TrainedLora:
    """Train a LoRA on a clone of ``model`` (never changed) on what ``inputs`` connects: captioned
    latents, reflow pairs (their images, prompts and noise), or image + depth pairs (an image-to-depth
    model: the first convolution widened by ``d2f_host.depth.widen_model`` unless it already is, and
    trained in full; the metadata says ``task = depth``). Saves every ``save_every`` steps into
    models/loras; with ``preview_every`` > 0 it samples ``inputs.preview_prompts`` decoded by
    ``inputs.vae`` (training/previews.py) and shows each grid on the node."""
    task = check_training_inputs(model, config, inputs)
    files = RunFiles.named(lora_folder(), output_name)
    files.remove_stale_temporaries()
    state = None
    if resume_from and resume_from != NO_RESUME:
        state = load_training_state(resume_from if os.path.isabs(resume_from) else lora_folder() / resume_from)
    run = prepare_run(model, config, lambda: run_data(model, inputs, task), state=state)
    trainer = run.trainer
    if state is not None:
        log.info("Diff2Flow: resumed %s at step %d", resume_from, trainer.step)
    pbar = comfy.utils.ProgressBar(config.steps)
    pbar.update_absolute(trainer.step, config.steps)
    with run.training():
        previewer = node_previewer(run, inputs, pbar) if config.preview_every > 0 else None
        trainer.run(
            on_step=lambda step, loss, lr: report_progress(pbar, config.steps, step, loss, lr),
            check_cancel=comfy.model_management.throw_exception_if_processing_interrupted,
            save=lambda t: write_periodic_save(files, t, run.metadata(t.step)),
            preview=previewer,
            on_validation=lambda step, loss: report_validation(config.steps, step, loss),
        )
        for adapter in run.adapters.values():
            adapter.requires_grad_(False)
        save_run_lora(files, trainer, run.metadata(trainer.step), raw=True)  # <output_name>_raw (save_raw with EMA)
        # the outputs hold the saved weights: the EMA's when EMA is on
        lora = lora_result({k: v.cpu() for k, v in trainer.lora_state_dict().items()}, run.metadata(trainer.step))
    grids = previewer.grids() if previewer is not None else no_preview_image()
    loss_map = {"loss": list(trainer.losses)}
    if trainer.validation_losses:  # (step, loss) pairs: Loss Graph reads only "loss"
        loss_map["validation_loss"] = [list(v) for v in trainer.validation_losses]
    return TrainedLora(run.trained_model(lora, lora.metadata), lora, loss_map, trainer.step, grids)


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
                "flow-matching model; the objective input offers the others). The input model is never "
                "modified. Saves every N steps (LoRA + resumable training state) into models/loras; Cancel stops "
                "within one step and keeps the last save. With preview_every > 0 it samples preview_prompts at step 0 "
                "and every N steps (the EMA weights when EMA is on), shows the latest grid on the node and outputs "
                "every grid as IMAGE; previews never change the training."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base SD1.x / SD2.x / SDXL model (eps or v prediction)."),
                io.Latent.Input(
                    "latents",
                    optional=True,
                    tooltip="Training latents: a LATENT batch, or the list from ComfyUI's dataset nodes (not with pairs).",
                ),
                io.Conditioning.Input(
                    "positive",
                    optional=True,
                    tooltip="Captions: one conditioning for all latents, or one per latent (not with pairs).",
                ),
                io.Conditioning.Input(
                    "negative",
                    optional=True,
                    tooltip="Empty / negative conditioning used for caption dropout (keeps CFG working); with pairs only for previews (the pairs carry their own).",
                ),
                Pairs.Input(
                    "pairs",
                    optional=True,
                    tooltip="Reflow pairs from Diff2Flow Reflow Pairs: train on them (objective 'reflow') instead of latents / positive.",
                ),
                io.Vae.Input(
                    "vae", optional=True, tooltip="Decodes the previews (preview_every > 0): the checkpoint's VAE."
                ),
                io.Conditioning.Input(
                    "preview_prompts",
                    optional=True,
                    tooltip="The prompts of the previews (preview_every > 0): one CLIP Text Encode per prompt, or a batch; the negative input is their unconditional prompt.",
                ),
                io.Image.Input(
                    "depth_images",
                    optional=True,
                    tooltip="Train an image-to-depth model: the images (a batch, or a list of batches), with depth_maps, vae and positive = an empty CLIP Text Encode, instead of latents. The model's first convolution is widened to take the image latent and trained in full; the saved file loads with a depth model loader.",
                ),
                io.Image.Input(
                    "depth_maps",
                    optional=True,
                    tooltip="The depth map of each of depth_images, in the same order and at the same size (grayscale; only order and relative differences matter: each is normalised by its 2 % / 98 % quantiles). Depth (far = bright) by convention.",
                ),
                io.Latent.Input(
                    "validation_latents",
                    optional=True,
                    tooltip="Separate validation samples for the validation loss (validation_every > 0), with validation_positive: other images than the training latents. The alternative to validation_split.",
                ),
                io.Conditioning.Input(
                    "validation_positive",
                    optional=True,
                    tooltip="The captions of validation_latents: one conditioning for all, or one per latent.",
                ),
                *[config_input(spec) for spec in option_specs() if spec.name not in LATE_OPTIONS],
                io.String.Input(
                    "output_name",
                    default="diff2flow_lora",
                    tooltip="File name stem for periodic saves in models/loras (<name>_<step>.safetensors, <name>.d2fstate; <name>_raw.safetensors with save_raw).",
                ),
                io.Combo.Input(
                    "resume_from",
                    options=training_states(),
                    default=NO_RESUME,
                    tooltip="A training state (.d2fstate) from an earlier run's periodic save, to continue it exactly.",
                ),
                # last, so a saved workflow without these widgets keeps its widget values in place
                *[config_input(spec) for spec in option_specs() if spec.name in LATE_OPTIONS],
            ],
            outputs=[
                io.Model.Output(
                    tooltip="The model with the trained LoRA (EMA weights when ema_decay > 0), as the flow model its objective samples as (the help page's objective table), carrying the LoRA's recommended steps and cfg for Diff2Flow KSampler."
                ),
                LoraModel.Output(
                    tooltip="The trained LoRA (ComfyUI-native keys; the EMA weights when ema_decay > 0): Save Diff2Flow LoRA, SaveLoRA or LoraModelLoader."
                ),
                LossMap.Output(tooltip="Loss per step, for Loss Graph."),
                io.Int.Output(display_name="steps", tooltip="Steps trained in total."),
                io.Image.Output(
                    display_name="previews",
                    tooltip="The preview grid of every preview step (step 0, then every preview_every steps; the EMA weights when EMA is on), as an IMAGE batch for Preview / Save Image. With previews off: one black 1x1 image.",
                ),
            ],
        )

    @classmethod
    def execute(cls, model, latents=None, positive=None, **lists) -> io.NodeOutput:
        first = {k: v[0] if isinstance(v, list) and v else v for k, v in lists.items()}
        config = TrainConfig(**{spec.name: first[spec.name] for spec in option_specs()})
        inputs = TrainingInputs(
            latents,
            positive,
            lists.get("negative"),
            first.get("pairs"),
            first.get("vae"),
            lists.get("preview_prompts"),
            lists.get("depth_images"),
            lists.get("depth_maps"),
            lists.get("validation_latents"),
            lists.get("validation_positive"),
        )
        return io.NodeOutput(*train_lora(model[0], config, inputs, first["output_name"], first["resume_from"]))


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
                io.String.Input(
                    "filename",
                    default="diff2flow_lora",
                    tooltip="File name (no folders; unsafe characters are replaced).",
                ),
                io.Boolean.Input(
                    "overwrite",
                    default=False,
                    tooltip="Replace an existing file of that name instead of adding a counter.",
                ),
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
