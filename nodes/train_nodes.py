"""Training nodes: Train Diff2Flow LoRA and Save Diff2Flow LoRA.

The loop lives in ``training``; this module turns ComfyUI inputs into ``TrainingData``, attaches
``d2f_core.lora`` adapters to a clone of the model with ``ModelPatcher.add_weight_wrapper`` (the
shared UNet weights are never touched), and reports progress through ComfyUI's ProgressBar and
``PromptServer.send_sync``.
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

from d2f_core.lora import ALGORITHMS, TARGETS, adapters_state_dict
from d2f_core.lora_metadata import LoraMetadata

from ..training import TrainConfig, Trainer, TrainingData
from ..training.config import DTYPES, LR_SCHEDULES, OPTIMIZERS
from ..training.files import load_training_state, sanitize_filename, save_lora, save_training_state
from ..training.headless import STATE_SUFFIX
from ..training.host import attach_adapters, cond_kwargs, gradient_checkpointing, lora_metadata_for, unet_network
from .model_nodes import naive_flow_sampling
from .model_sampling import diff2flow_sampling_for, patch_model

CATEGORY = "Diff2Flow/training"
# STATE_SUFFIX (".d2fstate") is not a model extension, so LoRA loaders do not list training states
NO_RESUME = "None"
PROGRESS_EVENT = "diff2flow.train.progress"
log = logging.getLogger("diff2flow")

LoraModel = io.Custom("LORA_MODEL")
LossMap = io.Custom("LOSS_MAP")


class Diff2FlowLora(dict):
    """LORA_MODEL value: ComfyUI-native LoRA tensors (a plain dict for stock nodes) that also
    carries the Diff2Flow metadata for Save Diff2Flow LoRA."""

    metadata: Optional[LoraMetadata] = None


def available_optimizers() -> list[str]:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return [o for o in OPTIMIZERS if o != "AdamW8bit"]
    return list(OPTIMIZERS)


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
    uncond = None
    if negative:
        neg = flatten_conditioning(negative)
        if neg:
            uncond = cond_kwargs(model, neg[0], samples[0])
    return TrainingData(scaled, [cond_kwargs(model, c, s) for c, s in zip(conds, samples)], uncond)


def report_progress(pbar: comfy.utils.ProgressBar, steps: int, step: int, loss: float, lr: float) -> None:
    pbar.update_absolute(step, steps)
    try:
        from server import PromptServer

        if PromptServer.instance is not None:
            PromptServer.instance.send_sync(PROGRESS_EVENT, {"step": step, "steps": steps, "loss": loss, "lr": lr})
    except Exception:  # no server (headless use): progress goes to the bar only
        pass


def lora_result(adapters: dict, metadata: LoraMetadata) -> Diff2FlowLora:
    lora = Diff2FlowLora(adapters_state_dict(adapters))
    lora.metadata = metadata
    return lora


def trained_model(model, lora: dict, objective: str, zero_terminal_snr: bool):
    """The input model with the LoRA loaded as stock loaders do, as a flow model for FM objectives."""
    out, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
    if objective == "diff2flow":
        return patch_model(out, zero_terminal_snr)
    if objective == "naive_fm":
        out = out.clone()
        out.add_object_patch("model_sampling", naive_flow_sampling())
    return out


def train_lora(model, latents: list, positive: list, negative: Optional[list], config: TrainConfig,
               output_name: str = "diff2flow_lora", resume_from: str = NO_RESUME) -> tuple[Any, Diff2FlowLora, dict, int]:
    """Train a LoRA on a clone of ``model``; returns (model with LoRA, LoRA, loss map, steps)."""
    ms = diff2flow_sampling_for(model.get_model_object("model_sampling"), config.zero_terminal_snr)
    d2f = ms.d2f
    data = build_training_data(model, latents, positive, negative)
    name = sanitize_filename(output_name)[: -len(".safetensors")]
    metadata = lora_metadata_for(model, config, d2f, ms.source_alphas_cumprod)
    with torch.inference_mode(False), torch.enable_grad():
        clone, unet, adapters, device = attach_adapters(model, config)
        trainer = Trainer(unet_network(unet), adapters, d2f, config, data, device)
        if resume_from and resume_from != NO_RESUME:
            state_path = resume_from if os.path.isabs(resume_from) else str(lora_folder() / resume_from)
            trainer.load_state_dict(load_training_state(state_path))
            log.info("Diff2Flow: resumed %s at step %d", resume_from, trainer.step)

        def save(t: Trainer) -> None:
            save_lora(lora_folder() / f"{name}_{t.step:06d}.safetensors", adapters_state_dict(adapters), metadata(t.step))
            save_training_state(lora_folder() / f"{name}{STATE_SUFFIX}", t.state_dict())

        pbar = comfy.utils.ProgressBar(config.steps)
        pbar.update_absolute(trainer.step, config.steps)
        with gradient_checkpointing(unet, config.gradient_checkpointing):
            trainer.run(
                on_step=lambda step, loss, lr: report_progress(pbar, config.steps, step, loss, lr),
                check_cancel=comfy.model_management.throw_exception_if_processing_interrupted,
                save=save,
            )
        for adapter in adapters.values():
            adapter.requires_grad_(False)
        lora = lora_result({n: a.cpu() for n, a in adapters.items()}, metadata(trainer.step))
    return trained_model(model, lora, config.objective, d2f.zero_terminal_snr), lora, {"loss": list(trainer.losses)}, trainer.step


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
                "within one step and keeps the last save."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base SD1.x / SD2.x / SDXL model (eps or v prediction)."),
                io.Latent.Input("latents", tooltip="Training latents: a LATENT batch, or the list from ComfyUI's dataset nodes."),
                io.Conditioning.Input("positive", tooltip="Captions: one conditioning for all latents, or one per latent."),
                io.Conditioning.Input("negative", optional=True, tooltip="Empty / negative conditioning used for caption dropout (keeps CFG working)."),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=0.99, step=0.01, tooltip="Probability of training a sample on the negative conditioning instead of its caption."),
                io.Combo.Input("objective", options=["diff2flow", "naive_fm", "diffusion"], default="diff2flow", tooltip="diff2flow: the paper's aligned FM objective; naive_fm: FM without alignment; diffusion: the model's own eps/v loss."),
                io.Int.Input("steps", default=500, min=1, max=1_000_000, tooltip="Optimizer steps to train (in total, including resumed steps)."),
                io.Int.Input("batch_size", default=1, min=1, max=256, tooltip="Latents per micro-batch."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=1024, tooltip="Micro-batches per optimizer step (effective batch = batch_size x this)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6, round=False, tooltip="Peak learning rate."),
                io.Combo.Input("lr_schedule", options=list(LR_SCHEDULES), default="constant", tooltip="Decay after warmup: constant, cosine to 0, or linear to 0."),
                io.Int.Input("warmup_steps", default=0, min=0, max=1_000_000, tooltip="Linear warmup steps."),
                io.Combo.Input("optimizer", options=available_optimizers(), default="AdamW", tooltip="AdamW8bit appears when bitsandbytes is installed."),
                io.Int.Input("rank", default=8, min=1, max=512, tooltip="Adapter rank."),
                io.Float.Input("alpha", default=8.0, min=0.01, max=1024.0, step=0.01, tooltip="Adapter alpha; the update is scaled by alpha / rank."),
                io.Combo.Input("algorithm", options=list(ALGORITHMS), default="LoRA", tooltip="LoRA (low-rank product) or LoHa (Hadamard product of two low-rank terms)."),
                io.Combo.Input("targets", options=list(TARGETS), default="attention", tooltip="attention: q/k/v/out projections; attention_ff: plus feed-forward; all: every linear and convolution."),
                io.Combo.Input("timestep_sampling", options=["uniform", "logit_normal", "shift"], default="uniform", tooltip="How training sigmas are drawn (logit_normal: SD3; shift: more high-noise steps)."),
                io.Boolean.Input("zero_terminal_snr", default=False, tooltip="Train with zero terminal SNR so the model learns pure noise (v-prediction only)."),
                io.Combo.Input("training_dtype", options=list(DTYPES), default="fp32", tooltip="bf16 (recommended on GPUs), fp16 with loss scaling, or fp32. Adapter weights stay fp32."),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Recompute activations in the backward pass: much less memory, about 30 % slower."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of adapter initialisation, batches, noise and timesteps."),
                io.Int.Input("save_every", default=0, min=0, max=1_000_000, tooltip="Save the LoRA and the training state every N steps (0: only at the end, through Save Diff2Flow LoRA)."),
                io.String.Input("output_name", default="diff2flow_lora", tooltip="File name stem for periodic saves in models/loras."),
                io.Combo.Input("resume_from", options=training_states(), default=NO_RESUME, tooltip="A training state (.d2fstate) from an earlier run's periodic save, to continue it exactly."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the trained LoRA (and the Diff2Flow patch for the FM objectives)."),
                LoraModel.Output(tooltip="The trained LoRA (ComfyUI-native keys): Save Diff2Flow LoRA, SaveLoRA or LoraModelLoader."),
                LossMap.Output(tooltip="Loss per step, for Loss Graph."),
                io.Int.Output(tooltip="Steps trained in total."),
            ],
        )

    @classmethod
    def execute(cls, model, latents, positive, **lists) -> io.NodeOutput:
        first = {k: v[0] if isinstance(v, list) and v else v for k, v in lists.items()}
        negative = lists.get("negative")
        config = TrainConfig(
            objective=first["objective"], steps=first["steps"], batch_size=first["batch_size"],
            grad_accumulation=first["grad_accumulation"], learning_rate=first["learning_rate"],
            lr_schedule=first["lr_schedule"], warmup_steps=first["warmup_steps"], optimizer=first["optimizer"],
            rank=first["rank"], alpha=first["alpha"], algorithm=first["algorithm"], targets=first["targets"],
            timestep_sampling=first["timestep_sampling"], zero_terminal_snr=first["zero_terminal_snr"],
            dtype=first["training_dtype"], gradient_checkpointing=first["gradient_checkpointing"], seed=first["seed"],
            caption_dropout=first["caption_dropout"], save_every=first["save_every"],
        )
        result = train_lora(model[0], latents, positive, negative, config, first["output_name"], first["resume_from"])
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
