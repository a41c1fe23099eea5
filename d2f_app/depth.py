"""``depth``: a checkpoint + a depth model (or a Marigold UNet) + images -> depth maps (16-bit grey
PNG, colour PNG, .npy) with FM Euler in few steps and Marigold's ensemble."""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

from .options import CliError, progress_bar, require_checkpoint, start_host


def add_parser(sub: Any) -> argparse.ArgumentParser:
    from d2f_core.colormap import COLORMAPS
    from d2f_core.depth_settings import MAX_ENSEMBLE, MAX_STEPS

    d = sub.add_parser("depth", help="images + depth model -> depth maps (grey 16-bit PNG, colour PNG, .npy)")
    d.add_argument(
        "--checkpoint",
        required=True,
        help="the SD checkpoint: the base of --depth-model, or (with --marigold) "
        "the SD2 checkpoint whose text encoder and VAE the Marigold UNet uses",
    )
    which = d.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--depth-model", default=None, help="a depth model file from depth training (metadata task = depth)"
    )
    which.add_argument(
        "--marigold",
        default=None,
        help="a Marigold-layout UNet (unet/diffusion_pytorch_model.safetensors: "
        "SD2, v-prediction, 8 input channels), converted zero-shot",
    )
    d.add_argument("--images", nargs="+", required=True, help="image files and / or folders of images")
    d.add_argument(
        "--output",
        required=True,
        help="folder for NAME_depth.png (16-bit, 0 = near), NAME_depth_color.png, NAME_depth.npy",
    )
    d.add_argument(
        "--steps",
        type=int,
        default=0,
        help=f"FM Euler steps, 1-{MAX_STEPS} (default 0: the depth file's recommended steps; Marigold: 4)",
    )
    d.add_argument(
        "--ensemble",
        type=int,
        default=1,
        help=f"predictions per image, aligned and merged by their median (1-{MAX_ENSEMBLE}, default 1)",
    )
    d.add_argument(
        "--resolution",
        type=int,
        default=768,
        help="long side the model sees in pixels (0: the image's own "
        "size; default 768, Marigold's); the depth is resized back",
    )
    d.add_argument("--seed", type=int, default=0, help="member m of every image starts from the noise of seed + m")
    d.add_argument("--colormap", choices=list(COLORMAPS), default="spectral", help="colours of NAME_depth_color.png")
    d.add_argument("--strength", type=float, default=1.0, help="strength of --depth-model's weights")
    d.add_argument(
        "--zero-terminal-snr",
        action="store_true",
        help="with --marigold: sample from pure noise (only for a model fine-tuned with zero terminal SNR)",
    )
    return d


def run(args: argparse.Namespace) -> int:
    """Depth maps of images with a depth model (a trained depth file on --checkpoint, or a Marigold UNet
    with --checkpoint's text encoder and VAE): grey 16-bit PNG, colour PNG and .npy per image."""
    from d2f_core.colormap import COLORMAPS
    from d2f_core.depth_settings import DepthSettings

    from .depth_files import ImageListError, list_images, load_image, save_depth

    settings = DepthSettings(args.steps, args.ensemble, args.resolution, args.seed)
    try:
        settings.validate()
        paths = list_images(args.images)
    except ValueError as exc:
        flag = {
            "steps": "--steps",
            "ensemble_size": "--ensemble",
            "processing_resolution": "--resolution",
            "seed": "--seed",
        }
        message = str(exc)
        for name, option in flag.items():
            message = message.replace(f"{name} must", f"{option} must", 1)
        raise CliError(message) from exc
    if args.colormap not in COLORMAPS:
        raise CliError(f"--colormap must be one of {', '.join(COLORMAPS)}, got {args.colormap!r}")
    require_checkpoint(args.checkpoint)
    model_file = args.depth_model or args.marigold
    if not pathlib.Path(model_file).is_file():
        raise CliError(f"{'--depth-model' if args.depth_model else '--marigold'} {model_file} does not exist")
    out = pathlib.Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    start_host(args)
    from d2f_host.depth_estimate import depth_steps, empty_prompt, estimate_depth, load_depth_pipeline

    model, clip, vae, what = load_depth_pipeline(
        args.checkpoint,
        depth_model=args.depth_model,
        marigold=args.marigold,
        strength=args.strength,
        zero_terminal_snr=args.zero_terminal_snr,
    )
    steps, source = depth_steps(model, args.steps)
    settings = DepthSettings(steps, args.ensemble, args.resolution, args.seed)
    print(
        f"{what}: FM Euler, {steps} steps ({source}), ensemble {args.ensemble}, "
        f"resolution {args.resolution or 'as is'}",
        flush=True,
    )
    positive = empty_prompt(clip)
    bar = progress_bar(len(paths) * args.ensemble, "depth", not args.no_progress, unit="member")
    with torch.inference_mode(), bar:
        for path in paths:
            try:
                image = load_image(path)
                depth = estimate_depth(
                    model, vae, positive, image, settings, on_member=lambda done, total: bar.update(1)
                )
            except (ImageListError, ValueError) as exc:
                raise CliError(f"{path}: {exc}") from exc
            save_depth(out, path, depth[0], args.colormap)
    print(f"wrote depth maps of {len(paths)} images to {out.resolve()}")
    return 0
