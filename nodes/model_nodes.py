"""Model nodes: the Diff2Flow model patch and the Diff2Flow checkpoint loader."""

from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import io

from d2f_host.checkpoints import apply_lora, attach_recommended_sampling, load_checkpoint
from d2f_host.model_sampling import flow_model_for, patch_model
from training import registry_text

CATEGORY = "Diff2Flow"
NO_LORA = "None"
log = logging.getLogger("diff2flow")

ZSNR_TOOLTIP = (
    "Rescale the schedule to zero terminal SNR so sampling starts from pure noise (sigma = 1). "
    "v-prediction models only; SD2.x was not trained with it, so use it for models fine-tuned with zero SNR."
)


class Diff2FlowModelPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="D2F_ModelPatch",
            display_name="Diff2Flow Model Patch",
            category=CATEGORY,
            description=(
                "Turns an SD1.x / SD2.x / SDXL diffusion model (eps or v) into a flow-matching model with the "
                "Diff2Flow alignment (exact time map, interpolant and velocity). Every stock sampler and "
                "scheduler keeps working on the result, and stock 'euler' becomes FM Euler. The input model is "
                "not changed; patching twice equals patching once."
            ),
            inputs=[
                io.Model.Input("model", tooltip="A diffusion model with eps- or v-prediction (SD1.x, SD2.x, SDXL)."),
                io.Boolean.Input("zero_terminal_snr", default=False, tooltip=ZSNR_TOOLTIP),
            ],
            outputs=[io.Model.Output(tooltip="The model as a flow-matching model (sigma = 1 is noise).")],
        )

    @classmethod
    def execute(cls, model, zero_terminal_snr: bool) -> io.NodeOutput:
        return io.NodeOutput(patch_model(model, zero_terminal_snr))


class Diff2FlowCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="D2F_CheckpointLoader",
            display_name="Diff2Flow Checkpoint Loader",
            category=CATEGORY,
            description=(
                "Loads an SD checkpoint (and optionally a LoRA) and returns it as a flow-matching model. "
                "A LoRA trained with this toolkit carries its settings (objective, prediction type, zero "
                "terminal SNR) in its metadata, and the patch is configured from them; its recommended steps and "
                f"cfg (a reflow LoRA: {registry_text.recommended_sampling_text('reflow')}) travel with the MODEL to "
                "Diff2Flow KSampler."
            ),
            inputs=[
                io.Combo.Input(
                    "ckpt_name",
                    options=folder_paths.get_filename_list("checkpoints"),
                    tooltip="Checkpoint from models/checkpoints.",
                ),
                io.Combo.Input(
                    "lora_name",
                    options=[NO_LORA] + folder_paths.get_filename_list("loras"),
                    default=NO_LORA,
                    tooltip="Optional LoRA from models/loras (applied to the UNet only).",
                ),
                io.Float.Input(
                    "lora_strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Strength of the LoRA on the UNet.",
                ),
                io.Boolean.Input(
                    "zero_terminal_snr",
                    default=False,
                    tooltip=ZSNR_TOOLTIP + " Ignored when the LoRA's Diff2Flow metadata sets it.",
                ),
            ],
            outputs=[
                io.Model.Output(
                    tooltip="The flow-matching model (with the LoRA). With a Diff2Flow LoRA it carries the LoRA's recommended steps and cfg, which Diff2Flow KSampler uses (steps_cfg_from = lora)."
                ),
                io.Clip.Output(tooltip="The checkpoint's text encoder."),
                io.Vae.Output(tooltip="The checkpoint's VAE."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name: str, lora_name: str, lora_strength: float, zero_terminal_snr: bool) -> io.NodeOutput:
        ckpt_path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        model, clip, vae = load_checkpoint(
            ckpt_path, "optional", embedding_directory=folder_paths.get_folder_paths("embeddings")
        )
        objective, metadata = "diff2flow", None
        if lora_name != NO_LORA:
            lora_path = folder_paths.get_full_path_or_raise("loras", lora_name)
            model, _, metadata = apply_lora(
                model, None, lora_path, lora_strength, 0.0, checkpoint=f"checkpoint '{ckpt_name}'"
            )
            if metadata is not None:
                if metadata.zero_terminal_snr != zero_terminal_snr:
                    log.info(
                        "Diff2Flow: zero_terminal_snr=%s taken from the metadata of %s",
                        metadata.zero_terminal_snr,
                        lora_name,
                    )
                zero_terminal_snr, objective = metadata.zero_terminal_snr, metadata.objective
        flow = flow_model_for(model, objective, zero_terminal_snr)  # a clone: the attachment stays on it
        if metadata is not None:
            attach_recommended_sampling(flow, metadata, f"LoRA '{lora_name}' (objective {objective})")
            sampler, steps, cfg = metadata.sampling_defaults()
            log.info(
                "Diff2Flow: %s recommends %d steps at cfg %g; Diff2Flow KSampler uses them (steps_cfg_from = lora)",
                lora_name,
                steps,
                cfg,
            )
        return io.NodeOutput(flow, clip, vae)


NODES = [Diff2FlowModelPatch, Diff2FlowCheckpointLoader]
