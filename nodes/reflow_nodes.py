"""Reflow node: Diff2Flow Reflow Pairs (noise -> image couplings of a teacher, for few-step LoRAs).

The pairs themselves are ``training.pairs`` (pure torch: per-index seeds, shards, manifest,
append / resume); this node gathers the teacher (a ComfyUI MODEL, LoRAs applied), the prompts and
the settings (inputs generated from ``PairsConfig``, the options of the CLI's ``pairs`` flags too), and
reports progress with previews through ComfyUI's own callback. With its optional ``latents`` (and
their captions) it also inverts the user's own images through the same ODE into the same folder
(``training.pairs.invert_pairs``; the CLI's ``pairs --invert-cache``). The Train Diff2Flow LoRA node
trains on the folder with the ``reflow`` objective.
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
from training.pairs import generate_pairs, invert_pairs, pair_settings

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
                    tooltip="The prompts: a conditioning with one or several entries; pair i uses prompt i mod P. "
                    "Also the captions of the latents when latents_positive is not connected (one for all, or one per "
                    "latent).",
                ),
                io.Conditioning.Input(
                    "negative",
                    optional=True,
                    tooltip="The negative prompt for classifier-free guidance (needed when cfg != 1).",
                ),
                io.Latent.Input(
                    "latents",
                    optional=True,
                    tooltip="Your own images (VAE Encode, of width x height) to invert through the teacher's ODE into "
                    "the same folder, besides the count generated pairs (count 0: only these): pairs of real images, "
                    "which Train Diff2Flow LoRA mixes in at its inverted_share. Appending: the images already inverted "
                    "must come first, in the same order.",
                ),
                io.Conditioning.Input(
                    "latents_positive",
                    optional=True,
                    tooltip="The captions of the latents: one conditioning for all, or one entry per latent "
                    "(not connected: positive).",
                ),
                *[config_input(spec) for spec in first_options],
                io.String.Input("folder", default="reflow_pairs", tooltip="Folder name under output/diff2flow_pairs."),
                # after folder, so the widget values of workflows saved before them keep their places
                *[config_input(spec, optional=True) for spec in later_options],
            ],
            outputs=[Pairs.Output(tooltip="The pairs folder, for Train Diff2Flow LoRA's pairs input.")],
        )

    @classmethod
    def execute(
        cls, model, positive, folder: str, negative=None, latents=None, latents_positive=None, **options
    ) -> io.NodeOutput:
        # an option missing from an older API-format prompt takes its PairsConfig default
        config = PairsConfig(**options)
        if latents is None and latents_positive is not None:
            raise ValueError(
                "latents_positive (the captions of the latents) is connected, but latents is not: connect the latents "
                "to invert (VAE Encode of your images), or disconnect latents_positive"
            )
        if latents is None and config.count == 0:
            raise ValueError("count 0 generates no pairs: set count, or connect latents to invert your own images")
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
        conds = conditioning_kwargs(model, positive, probe)
        uncond = cond_kwargs(model, (negative[0][0][:1], negative[0][1]), probe) if negative else None
        inversion = inversion_inputs(model, latents, latents_positive, positive, probe) if latents is not None else None
        settings = pair_settings(
            config,
            probe.shape,
            d2f.sigma_max,
            d2f.sigma_min,
            {"checkpoint_hash": base_model_hash(model), "patches": len(model.patches), "prediction": d2f.prediction},
        )
        network, device = inference_network(model)
        velocity = d2f.velocity_fn(lambda x, t, c: network(x, t, **{k: v.to(device) for k, v in c.items()}))
        target = pairs_folder(folder)
        run = dict(
            shard_size=config.shard_size,
            device=device,
            check_cancel=comfy.model_management.throw_exception_if_processing_interrupted,
        )
        summaries = []
        with torch.inference_mode():
            if config.count:
                preview = latent_preview.prepare_callback(model, config.count)
                summaries.append(
                    generate_pairs(
                        velocity,
                        conds,
                        target,
                        config.count,
                        settings,
                        uncond,
                        progress=lambda p: preview(p.done - 1, p.latest, None, p.total),
                        **run,
                    )
                )
            if inversion is not None:
                images, captions = inversion
                shown = latent_preview.prepare_callback(model, len(images))
                summaries.append(
                    invert_pairs(
                        velocity,
                        images,
                        captions,
                        target,
                        settings,
                        uncond,
                        progress=lambda p: shown(p.done - 1, p.latest, None, p.total),
                        **run,
                    )
                )
        return io.NodeOutput(str(summaries[0].folder), ui={"text": [s.report() for s in summaries]})


def conditioning_kwargs(model, conditioning: list, probe: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """The UNet keyword arguments of every entry of a CONDITIONING (an entry of batch B counts B times)."""
    return [
        cond_kwargs(model, (entry[0][i : i + 1], entry[1]), probe)
        for entry in conditioning
        for i in range(entry[0].shape[0])
    ]


def inversion_inputs(
    model, latents: dict, latents_positive: list | None, positive: list, probe: torch.Tensor
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``(images, captions)`` of the latents input: each latent in the model's scale, checked to have the pairs'
    size, and its caption's UNet arguments (``latents_positive``, else ``positive``: one for all or one per
    latent), refused with the inputs named before any compute."""
    samples = latents["samples"]
    samples = list(samples.unbind()) if samples.is_nested else list(samples)
    if not samples:
        raise ValueError("latents is empty: connect a VAE Encode of your images (or disconnect latents)")
    for i, sample in enumerate(samples):
        if tuple(sample.shape) != tuple(probe.shape):
            raise ValueError(
                f"latent {i} is {sample.shape[-1] * 8}x{sample.shape[-2] * 8} px with {sample.shape[0]} channels, but "
                f"the pairs are {probe.shape[-1] * 8}x{probe.shape[-2] * 8} px with {probe.shape[0]}: set width and "
                "height to the latents' size (the pairs of a folder have one size) and encode the images with the "
                "teacher's VAE"
            )
    name, source = ("latents_positive", latents_positive) if latents_positive is not None else ("positive", positive)
    captions = conditioning_kwargs(model, source, probe)
    if len(captions) not in (1, len(samples)):
        raise ValueError(
            f"{len(samples)} latents but {len(captions)} captions in {name}: connect latents_positive with one "
            "conditioning for all latents or one entry per latent"
        )
    images = [model.model.process_latent_in(s[None].float()).squeeze(0).cpu() for s in samples]
    return images, captions


NODES = [Diff2FlowReflowPairs]
