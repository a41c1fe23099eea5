"""Depth nodes: the depth model loader, the Marigold loader and the depth estimate (docs/MATH.md section 13).

A depth model is an SD UNet whose first convolution is widened to take the image latent, which
arrives through ComfyUI's concat conditioning (``concat_latent_image``); see ``d2f_host.depth``.
The estimate samples with ComfyUI's own sampling (``d2f_host.depth_estimate``).
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from d2f_core.colormap import COLORMAPS, apply_colormap
from d2f_core.depth_settings import DEFAULT_DEPTH_STEPS, MAX_ENSEMBLE, MAX_STEPS, DepthSettings
from d2f_host.depth import load_depth_model, widen_model
from d2f_host.depth_estimate import check_depth_inputs, depth_steps, empty_prompt, estimate_depth
from d2f_host.marigold import MARIGOLD_STEPS, load_marigold_file

CATEGORY = "Diff2Flow/depth"
NEW_DEPTH_MODEL = "(new: widen for training)"
DEFAULT_RESOLUTION = 768  # Marigold's processing resolution
log = logging.getLogger("diff2flow")


class DepthModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="D2F_DepthModelLoader",
            display_name="Diff2Flow Depth Model Loader",
            category=CATEGORY,
            description=(
                "Makes an image-to-depth MODEL from a base SD1.x / SD2.x / SDXL model: its first convolution is "
                "widened to take the image latent (on a clone), and a trained depth file from models/loras is "
                "applied on top, with the Diff2Flow patch its metadata asks for and its recommended steps. "
                f"'{NEW_DEPTH_MODEL}' gives the widened model alone (Marigold's initialisation: it equals the base "
                "model on duplicated input), the starting point of depth training."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The base text-to-image model the depth file was trained from (a checkpoint loader's MODEL).",
                ),
                io.Combo.Input(
                    "depth_name",
                    options=[NEW_DEPTH_MODEL] + folder_paths.get_filename_list("loras"),
                    default=NEW_DEPTH_MODEL,
                    tooltip="A depth model file from models/loras (saved by depth training: its metadata says task = depth), "
                    f"or '{NEW_DEPTH_MODEL}' for the untrained widened model.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                    tooltip="Strength of the depth file's weights (1 = as trained). Unused for a new model.",
                ),
            ],
            outputs=[
                io.Model.Output(
                    tooltip="The depth MODEL: connect it to Diff2Flow Depth Estimate (or to training for a new one)."
                )
            ],
        )

    @classmethod
    def execute(cls, model, depth_name: str, strength: float) -> io.NodeOutput:
        if depth_name == NEW_DEPTH_MODEL:
            return io.NodeOutput(widen_model(model), ui={"text": ["widened for depth training (untrained)"]})
        path = folder_paths.get_full_path_or_raise("loras", depth_name)
        depth_model, metadata = load_depth_model(model, path, strength)
        steps = metadata.sampling_defaults().steps
        log.info("Diff2Flow: depth model %s (objective %s) recommends %d steps", depth_name, metadata.objective, steps)
        return io.NodeOutput(
            depth_model, ui={"text": [f"{depth_name}: objective {metadata.objective}, {steps} steps recommended"]}
        )


class MarigoldLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="D2F_MarigoldLoader",
            display_name="Diff2Flow Marigold Loader",
            category=CATEGORY,
            description=(
                "Loads a Marigold-layout depth model (an SD2 v-prediction UNet with 8 input channels, e.g. Marigold's "
                "unet/diffusion_pytorch_model.safetensors copied into models/diffusion_models) as a Diff2Flow depth "
                "MODEL: the image latent goes through ComfyUI's concat conditioning and it samples as a flow model "
                "with FM Euler in 1-4 steps, zero-shot (no training). Use the SD2 checkpoint's CLIP and VAE with it."
            ),
            inputs=[
                io.Combo.Input(
                    "unet_name",
                    options=folder_paths.get_filename_list("diffusion_models"),
                    tooltip="The Marigold UNet file (diffusers or ComfyUI keys) from models/diffusion_models.",
                ),
                io.Boolean.Input(
                    "zero_terminal_snr",
                    default=False,
                    tooltip="Sample from pure noise with the zero-terminal-SNR schedule (only for a model fine-tuned with it).",
                ),
            ],
            outputs=[
                io.Model.Output(tooltip=f"The depth MODEL (Diff2Flow-patched, {MARIGOLD_STEPS} steps recommended).")
            ],
        )

    @classmethod
    def execute(cls, unet_name: str, zero_terminal_snr: bool) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        return io.NodeOutput(load_marigold_file(path, zero_terminal_snr))


class DepthEstimate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="D2F_DepthEstimate",
            display_name="Diff2Flow Depth Estimate",
            category=CATEGORY,
            description=(
                "Image to depth with a depth MODEL (Diff2Flow Depth Model Loader or Marigold Loader): the image is "
                "encoded, the depth latent sampled with FM Euler from the empty prompt, decoded; several members "
                "(ensemble) are aligned by scale and shift and their median taken (Marigold's ensemble). Depth is "
                "affine-invariant: each image's result spans [0, 1], 0 = near, 1 = far."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="An image-conditioned depth model (converted to a flow model here if it is not one yet).",
                ),
                io.Clip.Input(
                    "clip",
                    tooltip="The checkpoint's text encoder: it encodes the empty prompt, the depth model's condition.",
                ),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE: it encodes the image and decodes the depth."),
                io.Image.Input("image", tooltip="One image or a batch; each gets its own depth map at its own size."),
                io.Int.Input(
                    "steps",
                    default=0,
                    min=0,
                    max=MAX_STEPS,
                    tooltip="FM Euler steps: 0 = the model's recommended (a depth file's metadata or the "
                    "Marigold conversion's; else the diff2flow objective's depth steps, "
                    f"{DEFAULT_DEPTH_STEPS}); 1-4 is the usual range.",
                ),
                io.Int.Input(
                    "ensemble_size",
                    default=1,
                    min=1,
                    max=MAX_ENSEMBLE,
                    tooltip="Predictions per image from different noise, aligned by least-squares scale and shift and "
                    "merged by their median: smoother and more reliable, each member costs a full estimate.",
                ),
                io.Int.Input(
                    "processing_resolution",
                    default=DEFAULT_RESOLUTION,
                    min=0,
                    max=8192,
                    step=8,
                    tooltip="The long side the model sees, in pixels (aspect kept, sides rounded to multiples of 8; "
                    "the depth is resized back to the image). 0 = the image's own size. Marigold: 768.",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=False,
                    tooltip="Noise seed: member m starts from the noise of seed + m, so results are reproducible.",
                ),
                io.Combo.Input(
                    "colormap",
                    options=list(COLORMAPS),
                    default="spectral",
                    tooltip=f"Colours of the depth_color output: {', '.join(COLORMAPS)} (spectral is "
                    "Marigold's: near red, far blue).",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="depth",
                    tooltip="Depth as a grey IMAGE: black = near, white = far (for a ControlNet "
                    "that wants near = white, add Invert Image).",
                ),
                io.Image.Output(display_name="depth_color", tooltip="Depth colour-mapped with the chosen colormap."),
                io.Mask.Output(
                    display_name="depth_raw",
                    tooltip="The depth values in [0, 1] (0 = near, 1 = far) as a MASK [B, H, W], float.",
                ),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        clip,
        vae,
        image,
        steps: int,
        ensemble_size: int,
        processing_resolution: int,
        seed: int,
        colormap: str,
    ) -> io.NodeOutput:
        if colormap not in COLORMAPS:
            raise ValueError(f"colormap {colormap!r} is unknown: choose one of {', '.join(COLORMAPS)}")
        steps, source = depth_steps(model, steps)
        settings = DepthSettings(steps, ensemble_size, processing_resolution, seed)
        check_depth_inputs(model, vae, image, settings)  # every input error before the text encoder runs
        positive = empty_prompt(clip)
        pbar = comfy.utils.ProgressBar(image.shape[0] * ensemble_size)
        depth = estimate_depth(
            model,
            vae,
            positive,
            image,
            settings,
            on_member=lambda done, total: pbar.update_absolute(done, total),
            check_cancel=comfy.model_management.throw_exception_if_processing_interrupted,
        )
        grey = depth.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
        used = f"{steps} steps ({source}), ensemble {ensemble_size}, {image.shape[0]} image(s)"
        log.info("Diff2Flow Depth Estimate: %s", used)
        return io.NodeOutput(grey, apply_colormap(depth, colormap), depth, ui={"text": [used]})


NODES = [DepthModelLoader, MarigoldLoader, DepthEstimate]
