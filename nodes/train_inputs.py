"""The data inputs of Train Diff2Flow LoRA: checked, each refusal naming the input and the fix,
before any compute, then turned into the engine's ``TrainingData`` (captioned latents, reflow
pairs, or image + depth pairs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from d2f_host.checkpoints import check_pairs_fit
from d2f_host.conditioning import cond_kwargs
from d2f_host.depth import is_image_conditioned
from d2f_host.model_sampling import is_patched
from d2f_host.training_run import RunData
from training import TrainConfig, TrainingData
from training.data import grid_share_problem, validation_problem
from training.depth_dataset import depth_pixels
from training.pairs import load_pairs
from training.previews import PreviewSettings

log = logging.getLogger("diff2flow")


@dataclass
class TrainingInputs:
    """What is connected to the node's data inputs (``None``: not connected). ``latents`` +
    ``positive`` (+ ``negative``), ``pairs`` (a Diff2Flow Reflow Pairs folder) and ``depth_images`` +
    ``depth_maps`` (+ ``vae`` to encode them) are the three alternative kinds of data;
    ``preview_prompts`` and ``vae`` serve the previews; ``validation_latents`` + ``validation_positive``
    are separate validation samples for captioned latents (the alternative to ``validation_split``)."""

    latents: list | None = None
    positive: list | None = None
    negative: list | None = None
    pairs: str | None = None
    vae: Any = None
    preview_prompts: list | None = None
    depth_images: list | None = None
    depth_maps: list | None = None
    validation_latents: list | None = None
    validation_positive: list | None = None


def check_training_inputs(model: Any, config: TrainConfig, inputs: TrainingInputs) -> str:
    """Refuse every input that cannot go with the others or with ``config``, before any compute;
    returns the task the inputs train (``"image"`` or ``"depth"``)."""
    depth = check_depth_inputs(model, config, inputs)
    check_preview_inputs(config, inputs, depth)
    check_zero_terminal_snr(model, config)
    check_validation_inputs(config, inputs, depth)
    problem = grid_share_problem(config, "depth" if depth else "image")
    if problem is not None:
        raise ValueError(f"{problem[0]}: {problem[1]}")
    if config.inverted_share > 0 and (depth or not inputs.pairs):
        raise ValueError(
            f"inverted_share {config.inverted_share:g} mixes reflow pairs of inverted images into every batch, but "
            "no pairs are connected: connect pairs (Diff2Flow Reflow Pairs with its latents input), or set "
            "inverted_share 0"
        )
    if not depth and inputs.pairs:
        check_pairs_inputs(config, inputs)
    elif not depth and (inputs.latents is None or inputs.positive is None):  # an empty batch has its own error
        raise ValueError(
            "connect latents and positive (captioned training data), or pairs (from Diff2Flow Reflow Pairs)"
        )
    return "depth" if depth else "image"


def run_data(model: Any, inputs: TrainingInputs, task: str) -> RunData:
    """The ``TrainingData`` of checked inputs (:func:`check_training_inputs`) for ``model``."""
    if task == "depth":
        return RunData(
            build_depth_training_data(
                model, inputs.vae, inputs.depth_images, inputs.depth_maps, inputs.positive, inputs.negative
            ),
            "depth",
        )
    if inputs.pairs:
        loaded = load_pairs(inputs.pairs)
        check_pairs_fit(model, loaded, inputs.pairs)
        return RunData(loaded.training_data(), teacher_cfg=float(loaded.settings["cfg"]))
    validation = None
    if inputs.validation_latents is not None:
        try:
            validation = build_training_data(model, inputs.validation_latents, inputs.validation_positive, None)
        except ValueError as exc:
            raise ValueError(f"validation_latents / validation_positive: {exc}") from exc
    return RunData(build_training_data(model, inputs.latents, inputs.positive, inputs.negative), validation=validation)


# ---------------------------------------------------------------------- captioned latents -> TrainingData
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


def build_training_data(model, latents: list[dict], positive: list, negative: list | None) -> TrainingData:
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
        raise ValueError(
            "positive conditioning is empty: connect a CLIP Text Encode (one for all latents or one per latent)"
        )
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


def split_images(images: list | None) -> list[torch.Tensor]:
    """IMAGE inputs (a batch, or a list of batches of different sizes) -> [H, W, C] tensors."""
    return [image for batch in images or [] for image in batch]


def check_depth_inputs(model, config: TrainConfig, inputs: TrainingInputs) -> bool:
    """Whether this run trains a depth model (``depth_images`` + ``depth_maps`` connected), with every
    input that cannot go with that refused before any compute, naming the input and the fix."""
    depth_images, depth_maps, latents, pairs = inputs.depth_images, inputs.depth_maps, inputs.latents, inputs.pairs
    if depth_images is None and depth_maps is None:
        if is_image_conditioned(model):
            raise ValueError(
                "this MODEL takes an image latent (a depth model: its first convolution is widened), so it "
                "trains on image + depth pairs: connect depth_images and depth_maps instead of latents / "
                "pairs, or connect the base model"
            )
        return False
    if depth_images is None or depth_maps is None:
        given, other = ("depth_images", "depth_maps") if depth_maps is None else ("depth_maps", "depth_images")
        raise ValueError(
            f"{given} is connected but {other} is not: a depth model trains on pairs, connect both "
            "(the images and their depth maps, in the same order)"
        )
    if latents is not None or pairs:
        raise ValueError(
            "connect either depth_images + depth_maps (a depth model) or latents / pairs (a LoRA of "
            f"images), not both: {'latents' if latents is not None else 'pairs'} is connected too"
        )
    if inputs.vae is None:
        raise ValueError(
            "depth training encodes depth_images and depth_maps with the model's VAE: connect the vae "
            "input (the checkpoint's VAE)"
        )
    if config.preview_every > 0:
        raise ValueError(
            f"preview_every {config.preview_every}: previews sample text prompts, which a depth model "
            "cannot (it needs an image): set preview_every 0"
        )
    if inputs.positive is None:
        raise ValueError(
            "depth training needs positive: connect a CLIP Text Encode with an empty prompt (a depth "
            "model is trained and sampled on the empty prompt)"
        )
    return True


def build_depth_training_data(
    model, vae: Any, depth_images: list, depth_maps: list, positive: list, negative: list | None
) -> TrainingData:
    """TrainingData of image + depth pairs (docs/MATH.md section 13): latents = the VAE latents of the
    normalised depth maps (2 % / 98 % quantiles to [-1, 1], three channels), ``extras[i]["concat"]`` =
    the VAE latent of image i, both in ``model``'s latent scale (d2f_host.depth's convention). A depth
    map is an IMAGE (its channel mean; e.g. a grayscale depth PNG from Load Image). Counts, sizes and flat
    maps are checked before anything is encoded."""
    images, maps = split_images(depth_images), split_images(depth_maps)
    if not images:
        raise ValueError("depth_images is empty: connect at least one image")
    if len(images) != len(maps):
        raise ValueError(
            f"{len(images)} depth_images but {len(maps)} depth_maps: connect one depth map per image, in the same order"
        )
    for i, (image, depth) in enumerate(zip(images, maps)):
        if image.shape[:2] != depth.shape[:2]:
            raise ValueError(
                f"pair {i}: the image is {image.shape[1]}x{image.shape[0]} but its depth map is "
                f"{depth.shape[1]}x{depth.shape[0]}: a depth map must be aligned with its image pixel "
                "for pixel (resize both the same way)"
            )
    targets = [
        depth_pixels(d[..., :3].float().mean(-1) if d.ndim == 3 else d.float(), f"depth map {i} (depth_maps)")
        for i, d in enumerate(maps)
    ]
    conds = flatten_conditioning(positive)
    if len(conds) not in (1, len(images)):
        raise ValueError(
            f"{len(images)} image + depth pairs but {len(conds)} positive conditionings: connect one "
            "(the empty prompt) for all pairs"
        )
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


# ---------------------------------------------------------------------- the other checks
def check_preview_inputs(config: TrainConfig, inputs: TrainingInputs, depth: bool = False) -> None:
    """Refuse previews the node cannot make, before any training, naming the input and the fix; with
    previews off, name the inputs only previews would use (``vae`` serves depth training too)."""
    vae, preview_prompts, negative = inputs.vae, inputs.preview_prompts, inputs.negative
    if config.preview_every <= 0:
        unused = [
            name
            for name, value in (("preview_prompts", preview_prompts), ("vae", None if depth else vae))
            if value is not None
        ]
        if unused:
            are = "are" if len(unused) > 1 else "is"
            log.warning(
                "Diff2Flow: %s %s connected but preview_every is 0: no previews are sampled, so nothing uses "
                "them (set preview_every N to sample previews every N steps)",
                " and ".join(unused),
                are,
            )
        return
    if vae is None:
        raise ValueError(
            f"preview_every {config.preview_every} needs a VAE to decode the previews: connect the vae "
            "input (the checkpoint's VAE), or set preview_every 0 (previews off)"
        )
    if not preview_prompts or not flatten_conditioning(preview_prompts):
        raise ValueError(
            f"preview_every {config.preview_every} needs prompts: connect preview_prompts (a CLIP Text "
            "Encode; one per prompt, or a batch), or set preview_every 0 (previews off)"
        )
    cfg = PreviewSettings.from_config(config).cfg
    if cfg != 1.0 and not negative:
        raise ValueError(
            f"previews at cfg {cfg:g} need an unconditional prompt: connect negative (an empty CLIP Text "
            "Encode), or set preview_cfg 1"
        )


def check_validation_inputs(config: TrainConfig, inputs: TrainingInputs, depth: bool) -> None:
    """Refuse separate validation data that is incomplete, that the run's kind of data cannot take, or that
    the validation options would not evaluate (or evaluations without any samples), naming the input."""
    latents, positive = inputs.validation_latents, inputs.validation_positive
    if (latents is None) != (positive is None):
        given, other = (
            ("validation_latents", "validation_positive")
            if positive is None
            else (
                "validation_positive",
                "validation_latents",
            )
        )
        raise ValueError(
            f"{given} is connected but {other} is not: separate validation samples are captioned latents, "
            "connect both (or neither, and hold samples out with validation_split)"
        )
    if latents is not None and (depth or inputs.pairs):
        kind = "image + depth pairs" if depth else "reflow pairs"
        raise ValueError(
            f"validation_latents are captioned latents, but this run trains on {kind}: disconnect "
            "validation_latents and validation_positive and hold part of the data out with validation_split"
        )
    problem = validation_problem(config, latents is not None)
    if problem is not None:
        raise ValueError(f"{problem[0]}: {problem[1]}")


def check_zero_terminal_snr(model, config: TrainConfig) -> None:
    """Refuse to train a MODEL that Diff2Flow Model Patch converted with zero terminal SNR while the run's
    own zero_terminal_snr is off: the conversion would be dropped in silence."""
    if (
        is_patched(model)
        and model.get_model_object("model_sampling").d2f.zero_terminal_snr
        and not config.zero_terminal_snr
    ):
        raise ValueError(
            "zero_terminal_snr is off, but this MODEL was converted with zero terminal SNR (Diff2Flow Model "
            "Patch): set zero_terminal_snr on to train it as converted, or connect the model before the patch"
        )


def check_pairs_inputs(config: TrainConfig, inputs: TrainingInputs) -> None:
    """Refuse the inputs that training on reflow pairs would ignore: the pairs bring their own images,
    prompts and negative (the teacher's), so latents / positive are alternatives to them, and negative
    serves only the previews."""
    given = [name for name, value in (("latents", inputs.latents), ("positive", inputs.positive)) if value is not None]
    if given:
        raise ValueError(
            f"pairs and {' / '.join(given)} are both connected: a run trains on reflow pairs (their images "
            f"and prompts) or on latents + positive, not both. Disconnect {' and '.join(given)} to train on "
            "the pairs, or disconnect pairs to train on the latents"
        )
    if inputs.negative is not None and config.preview_every <= 0:
        raise ValueError(
            "negative is connected but the run trains on pairs, whose caption dropout uses the teacher's own "
            "negative stored with them: negative would only serve previews, which are off. Disconnect "
            "negative, or set preview_every > 0"
        )
