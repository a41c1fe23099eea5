"""Sampling nodes: FM scheduler, FM sampler (SAMPLER) and the Diff2Flow KSampler.

Sampler and start-rule choices come from ``d2f_core.SAMPLERS`` / ``START_RULES`` (the registries), their
tooltips and descriptions from ``training.registry_text``: an entry added there appears in every combo and
tooltip here and in the CLI.
"""

from __future__ import annotations

import logging

import comfy.sample
import comfy.utils
import latent_preview
from comfy_api.latest import io

import d2f_core
from d2f_host.checkpoints import recommended_sampling_of
from d2f_host.model_sampling import is_flow_model, patch_model
from d2f_host.sampling import flow_sigmas, fm_sampler
from training import registry_text

CATEGORY = "Diff2Flow/sampling"
log = logging.getLogger("diff2flow")

SHIFT_TOOLTIP = (
    "SD3-style time shift of the FM sigma grid: 1 = uniform in sigma; > 1 spends more steps at high noise "
    "(try 2-3 for few-step sampling or large images)."
)
DENOISE_TOOLTIP = (
    "1.0 starts from pure noise (text-to-image); lower values keep more of the input latent (image-to-image)."
)
STEPS_CFG_FROM = ("lora", "widgets")
OVERRIDDEN = " Not used when steps_cfg_from is 'lora' and the model carries a Diff2Flow LoRA's recommendation."


# the tooltips that name registry entries are rendered from the registries when a schema is built
def steps_tooltip() -> str:
    return f"Number of sampling steps; model evaluations per step: {registry_text.evaluations_text()}."


def sampler_tooltip() -> str:
    return registry_text.choices_text("samplers") + "."


def start_tooltip() -> str:
    return (
        "Where sampling from pure noise starts on an SD model without zero terminal SNR (its schedule ends at "
        f"sigma_max = 0.936): {registry_text.choices_text('start_rules')}. No effect on flow or zero-terminal-SNR "
        "models or with denoise < 1."
    )


def steps_cfg_from_tooltip() -> str:
    return (
        "lora: when the model carries a Diff2Flow LoRA's recommended steps and cfg (Diff2Flow Checkpoint Loader or "
        "Train Diff2Flow LoRA with a LoRA from this toolkit; a reflow LoRA: "
        f"{registry_text.recommended_sampling_text('reflow')}), sample with those and ignore the steps and cfg widgets; "
        "other models use the widgets. widgets: always the steps and cfg widgets."
    )


def steps_and_cfg(model, steps: int, cfg: float, steps_cfg_from: str = "lora") -> tuple[int, float, str]:
    """``(steps, cfg, message)``: the LoRA's recommendation the model carries when ``steps_cfg_from``
    is ``"lora"`` and there is one, else the widgets' ``steps`` / ``cfg``; ``message`` says which."""
    if steps_cfg_from not in STEPS_CFG_FROM:
        raise ValueError(f"steps_cfg_from must be one of {', '.join(STEPS_CFG_FROM)}, got {steps_cfg_from!r}")
    rec = recommended_sampling_of(model)
    if rec is None:
        return steps, cfg, f"{steps} steps, cfg {cfg:g} (widgets)"
    if steps_cfg_from == "lora":
        return (
            rec.steps,
            rec.cfg,
            (
                f"{rec.steps} steps, cfg {rec.cfg:g}: recommended by {rec.source} "
                f"(widgets {steps} / {cfg:g} ignored; steps_cfg_from = widgets to use them)"
            ),
        )
    return (
        steps,
        cfg,
        f"{steps} steps, cfg {cfg:g} (widgets; {rec.source} recommends {rec.steps} steps, cfg {rec.cfg:g})",
    )


def as_flow_model(model):
    """The model itself if it is already a flow model, else a Diff2Flow-patched clone."""
    return model if is_flow_model(model) else patch_model(model)


class FMScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="D2F_FMScheduler",
            display_name="FM Scheduler (Diff2Flow)",
            category=CATEGORY,
            description=(
                "Flow-matching sigma schedule for SamplerCustom / SamplerCustomAdvanced: uniform in sigma from "
                "the model's noisiest level (1.0 for zero-terminal-SNR and native flow models, 0.936 for SD "
                "eps/v models) down to 0, with optional SD3-style shift and denoise for image-to-image."
            ),
            inputs=[
                io.Model.Input(
                    "model", tooltip="A flow model: the output of Diff2Flow Model Patch or Diff2Flow Checkpoint Loader."
                ),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip=steps_tooltip()),
                io.Float.Input("shift", default=1.0, min=0.01, max=100.0, step=0.01, tooltip=SHIFT_TOOLTIP),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, tooltip=DENOISE_TOOLTIP),
                io.Combo.Input(
                    "start",
                    options=list(d2f_core.START_RULES),
                    default="sigma_max",
                    optional=True,
                    tooltip=start_tooltip(),
                ),
            ],
            outputs=[io.Sigmas.Output(tooltip="steps + 1 decreasing FM sigmas ending at 0.")],
        )

    @classmethod
    def execute(cls, model, steps: int, shift: float, denoise: float, start: str = "sigma_max") -> io.NodeOutput:
        return io.NodeOutput(flow_sigmas(model, steps, shift, denoise, start))


class FMSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            # saved workflows refer to the node by this id, so it stays although the node runs every FM sampler
            node_id="D2F_FMEulerSampler",
            display_name="FM Sampler (Diff2Flow)",
            category=CATEGORY,
            description=(
                "A flow-matching sampler as a SAMPLER for SamplerCustom / SamplerCustomAdvanced, one of: "
                f"{registry_text.choices_text('samplers')}. Use it with the FM Scheduler on a Diff2Flow-patched "
                "model; previews and progress come through the usual callback."
            ),
            inputs=[
                io.Combo.Input(
                    "sampler",
                    options=list(d2f_core.SAMPLERS),
                    default=registry_text.default_sampler(),
                    tooltip=sampler_tooltip(),
                ),
            ],
            outputs=[io.Sampler.Output(tooltip="The chosen FM sampler.")],
        )

    @classmethod
    def execute(cls, sampler: str) -> io.NodeOutput:
        return io.NodeOutput(fm_sampler(sampler))


class Diff2FlowKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="D2F_KSampler",
            display_name="Diff2Flow KSampler",
            category=CATEGORY,
            description=(
                "KSampler for flow matching: converts an SD model with Diff2Flow if it is not converted yet, "
                "then samples on the uniform FM sigma grid with the chosen FM sampler, by default "
                f"{registry_text.choice_text('samplers', registry_text.default_sampler())}. The answer to 'how do I "
                "sample after Diff2Flow training': this node, with the trained LoRA applied. A model from Diff2Flow "
                "Checkpoint Loader with a Diff2Flow LoRA samples at the LoRA's recommended steps and cfg unless "
                "steps_cfg_from is 'widgets'; the node shows the values it used."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="An SD1.x / SD2.x / SDXL model (converted here if needed) or an already converted one.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Seed of the initial noise.",
                ),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip=steps_tooltip() + OVERRIDDEN),
                io.Float.Input(
                    "cfg",
                    default=7.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance scale (1 = no guidance)." + OVERRIDDEN,
                ),
                io.Combo.Input(
                    "sampler",
                    options=list(d2f_core.SAMPLERS),
                    default=registry_text.default_sampler(),
                    tooltip=sampler_tooltip(),
                ),
                io.Float.Input("shift", default=1.0, min=0.01, max=100.0, step=0.01, tooltip=SHIFT_TOOLTIP),
                io.Conditioning.Input("positive", tooltip="What the image should show."),
                io.Conditioning.Input(
                    "negative", tooltip="What the image should not show (the unconditional branch of CFG)."
                ),
                io.Latent.Input(
                    "latent_image", tooltip="Empty latent for text-to-image, an encoded image for image-to-image."
                ),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01, tooltip=DENOISE_TOOLTIP),
                io.Combo.Input(
                    "start",
                    options=list(d2f_core.START_RULES),
                    default="sigma_max",
                    optional=True,
                    tooltip=start_tooltip(),
                ),
                # last, so saved workflows without it keep their widget values in place; optional, so
                # API-format prompts without it validate (they get the default)
                io.Combo.Input(
                    "steps_cfg_from",
                    options=list(STEPS_CFG_FROM),
                    default="lora",
                    optional=True,
                    tooltip=steps_cfg_from_tooltip(),
                ),
            ],
            outputs=[io.Latent.Output(tooltip="The sampled latent.")],
        )

    @classmethod
    def execute(
        cls,
        model,
        seed,
        steps,
        cfg,
        sampler,
        shift,
        positive,
        negative,
        latent_image,
        denoise,
        start: str = "sigma_max",
        steps_cfg_from: str = "lora",
    ) -> io.NodeOutput:
        steps, cfg, used = steps_and_cfg(model, steps, cfg, steps_cfg_from)
        log.info("Diff2Flow KSampler: %s", used)
        flow_model = as_flow_model(model)
        sigmas = flow_sigmas(flow_model, steps, shift, denoise, start)
        latent = latent_image.copy()
        samples = comfy.sample.fix_empty_latent_channels(flow_model, latent["samples"])
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        callback = latent_preview.prepare_callback(flow_model, steps)
        latent["samples"] = comfy.sample.sample_custom(
            flow_model,
            noise,
            cfg,
            fm_sampler(sampler),
            sigmas,
            positive,
            negative,
            samples,
            noise_mask=latent.get("noise_mask"),
            callback=callback,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
            seed=seed,
        )
        return io.NodeOutput(latent, ui={"text": [f"{sampler}, {used}"]})


NODES = [FMScheduler, FMSampler, Diff2FlowKSampler]
