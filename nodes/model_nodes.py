"""Model nodes: the Diff2Flow model patch and the Diff2Flow checkpoint loader."""
from __future__ import annotations

import logging

import comfy.model_sampling as cms
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from d2f_core.lora_metadata import read_lora_metadata

from .model_sampling import patch_model, prediction_of

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


def naive_flow_sampling(num_timesteps: int = 1000):
    """Model sampling of a naive-FM fine-tune: input x_sigma as is, timestep T * sigma, output v."""

    class NaiveFlowSampling(cms.ModelSamplingDiscreteFlow, cms.CONST):
        pass

    ms = NaiveFlowSampling()
    ms.set_parameters(shift=1.0, timesteps=num_timesteps, multiplier=num_timesteps)
    return ms


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
                "terminal SNR) in its metadata, and the patch is configured from them."
            ),
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"), tooltip="Checkpoint from models/checkpoints."),
                io.Combo.Input(
                    "lora_name", options=[NO_LORA] + folder_paths.get_filename_list("loras"), default=NO_LORA,
                    tooltip="Optional LoRA from models/loras (applied to the UNet only).",
                ),
                io.Float.Input("lora_strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="Strength of the LoRA on the UNet."),
                io.Boolean.Input(
                    "zero_terminal_snr", default=False,
                    tooltip=ZSNR_TOOLTIP + " Ignored when the LoRA's Diff2Flow metadata sets it.",
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="The flow-matching model (with the LoRA)."),
                io.Clip.Output(tooltip="The checkpoint's text encoder."),
                io.Vae.Output(tooltip="The checkpoint's VAE."),
            ],
        )

    @classmethod
    def execute(cls, ckpt_name: str, lora_name: str, lora_strength: float, zero_terminal_snr: bool) -> io.NodeOutput:
        ckpt_path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(
            ckpt_path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings")
        )[:3]
        metadata = None
        if lora_name != NO_LORA:
            lora_path = folder_paths.get_full_path_or_raise("loras", lora_name)
            metadata = read_lora_metadata(lora_path)
            lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
            model, _ = comfy.sd.load_lora_for_models(model, None, lora, lora_strength, 0.0)
        if metadata is not None:
            prediction = prediction_of(model.get_model_object("model_sampling"))
            if metadata.prediction != prediction:
                raise ValueError(
                    f"LoRA '{lora_name}' was trained on a {metadata.prediction}-prediction model, but checkpoint "
                    f"'{ckpt_name}' predicts {prediction}: load the LoRA on the base model it was trained on."
                )
            if metadata.zero_terminal_snr != zero_terminal_snr:
                log.info("Diff2Flow: zero_terminal_snr=%s taken from the metadata of %s", metadata.zero_terminal_snr, lora_name)
            zero_terminal_snr = metadata.zero_terminal_snr
            if metadata.objective == "naive_fm":
                flow = model.clone()
                flow.add_object_patch("model_sampling", naive_flow_sampling())
                return io.NodeOutput(flow, clip, vae)
        return io.NodeOutput(patch_model(model, zero_terminal_snr), clip, vae)


NODES = [Diff2FlowModelPatch, Diff2FlowCheckpointLoader]
