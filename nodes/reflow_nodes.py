"""Reflow node: Diff2Flow Reflow Pairs (noise -> image couplings of a teacher, for few-step LoRAs).

The pairs themselves are ``training.pairs`` (pure torch: per-index seeds, shards, manifest,
append / resume); this node gathers the teacher (a ComfyUI MODEL, LoRAs applied), the prompts and
the settings (inputs generated from ``PairsConfig``, the options of the CLI's ``pairs`` flags too), and
reports progress with previews through ComfyUI's own callback. The Train
Diff2Flow LoRA node trains on the folder with the ``reflow`` objective.
"""

from __future__ import annotations

import pathlib

import comfy.model_management
import folder_paths
import latent_preview
import torch
from comfy_api.latest import io

import d2f_core
from d2f_host.checkpoints import base_model_hash
from d2f_host.conditioning import cond_kwargs
from d2f_host.depth import is_image_conditioned
from d2f_host.model_sampling import alignment_of, is_patched
from d2f_host.unet import inference_network
from training.config import OptionSpec, PairsConfig, option_specs
from training.files import sanitize_filename
from training.pairs import PairSettings, generate_pairs

from .options import config_input

CATEGORY = "Diff2Flow/reflow"
Pairs = io.Custom("DIFF2FLOW_PAIRS")

# PairsConfig options of the CLI alone: in a graph the teacher's LoRAs and zero terminal SNR come with its
# MODEL, and the negative prompt is the negative CONDITIONING input
CLI_ONLY_OPTIONS = ("lora_strength", "negative", "zero_terminal_snr")
# the options the node had before the folder widget; every later one comes after folder (saved workflows
# store widget values by position)
BEFORE_FOLDER = ("count", "width", "height", "steps", "cfg", "sampler", "seed", "batch_size")


def node_options() -> list[OptionSpec]:
    """The PairsConfig options the node has as inputs, in PairsConfig's order."""
    return [spec for spec in option_specs(PairsConfig) if spec.name not in CLI_ONLY_OPTIONS]


def pairs_folder(name: str) -> pathlib.Path:
    """A pairs folder under ComfyUI's output directory (``name`` may not leave it)."""
    return pathlib.Path(folder_paths.get_output_directory()) / "diff2flow_pairs" / sanitize_filename(name, suffix="")


def teacher_alignment(model) -> d2f_core.Diff2Flow:
    """The alignment the teacher samples with: its own patch when converted, else the plain one."""
    return model.get_model_object("model_sampling").d2f if is_patched(model) else alignment_of(model)


class Diff2FlowReflowPairs(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        options = node_options()
        first_options = [spec for spec in options if spec.name in BEFORE_FOLDER]
        later_options = [spec for spec in options if spec.name not in BEFORE_FOLDER]
        return io.Schema(
            node_id="D2F_ReflowPairs",
            display_name="Diff2Flow Reflow Pairs",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Generates reflow pairs (noise, image) by integrating the teacher model's flow ODE from each noise: "
                "the training data of a few-step Diff2Flow LoRA (Train Diff2Flow LoRA with objective 'reflow'). "
                "Each pair depends only on its index and the seed, so a rerun with a larger count adds only the "
                "missing pairs and a cancelled run keeps every finished shard."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The teacher: an SD1.x / SD2.x / SDXL model (with LoRAs applied), converted or not.",
                ),
                io.Conditioning.Input(
                    "positive",
                    tooltip="The prompts: a conditioning with one or several entries; pair i uses prompt i mod P.",
                ),
                io.Conditioning.Input(
                    "negative",
                    optional=True,
                    tooltip="The negative prompt for classifier-free guidance (needed when cfg != 1).",
                ),
                *[config_input(spec) for spec in first_options],
                io.String.Input("folder", default="reflow_pairs", tooltip="Folder name under output/diff2flow_pairs."),
                # after folder, so the widget values of workflows saved before them keep their places
                *[config_input(spec, optional=True) for spec in later_options],
            ],
            outputs=[Pairs.Output(tooltip="The pairs folder, for Train Diff2Flow LoRA's pairs input.")],
        )

    @classmethod
    def execute(cls, model, positive, folder: str, negative=None, **options) -> io.NodeOutput:
        # an option missing from an older API-format prompt takes its PairsConfig default
        config = PairsConfig(**options)
        if is_image_conditioned(model):
            raise ValueError(
                "model takes an image latent besides the noise (a depth or other image-conditioned model), "
                "but reflow pairs are drawn from prompts alone: connect a text-to-image teacher (the "
                "checkpoint's MODEL, with LoRAs if you like)"
            )
        if not positive:
            raise ValueError("positive is empty: connect a CLIP Text Encode with the prompts")
        if config.cfg != 1.0 and not negative:
            raise ValueError(f"cfg {config.cfg:g} needs the negative conditioning: connect it, or set cfg to 1")
        d2f = teacher_alignment(model)
        channels = model.model.latent_format.latent_channels
        probe = torch.zeros(channels, config.height // 8, config.width // 8)
        conds = [
            cond_kwargs(model, (entry[0][i : i + 1], entry[1]), probe)
            for entry in positive
            for i in range(entry[0].shape[0])
        ]
        uncond = cond_kwargs(model, (negative[0][0][:1], negative[0][1]), probe) if negative else None
        settings = PairSettings(
            shape=tuple(probe.shape),
            sigma_max=d2f.sigma_max,
            sampler=config.sampler,
            steps=config.steps,
            cfg=config.cfg,
            shift=config.shift,
            seed=config.seed,
            batch_size=config.batch_size,
            teacher={
                "checkpoint_hash": base_model_hash(model),
                "patches": len(model.patches),
                "prediction": d2f.prediction,
            },
        )
        network, device = inference_network(model)
        velocity = d2f.velocity_fn(lambda x, t, c: network(x, t, **{k: v.to(device) for k, v in c.items()}))
        preview = latent_preview.prepare_callback(model, config.count)
        target = pairs_folder(folder)
        with torch.inference_mode():
            summary = generate_pairs(
                velocity,
                conds,
                target,
                config.count,
                settings,
                uncond,
                shard_size=config.shard_size,
                device=device,
                progress=lambda p: preview(p.done - 1, p.latest, None, p.total),
                check_cancel=comfy.model_management.throw_exception_if_processing_interrupted,
            )
        return io.NodeOutput(str(summary.folder), ui={"text": [summary.report()]})


NODES = [Diff2FlowReflowPairs]
