"""``prepare``: an image folder with captions (or image + depth pairs) + a checkpoint -> a latent
cache of safetensors shards that ``train --cache`` reads."""

from __future__ import annotations

import argparse
import logging
import pathlib
from typing import Any

from .options import CliError, progress_bar, require_checkpoint, start_host

log = logging.getLogger("diff2flow")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("prepare", help="image folder + captions (or image + depth pairs) -> latent cache")
    p.add_argument(
        "--dataset",
        required=True,
        help="folder of images with same-name .txt captions (nested folders "
        "allowed); or of image + depth pairs for a depth model: photo.png with photo.depth.png (8/16-bit "
        "grayscale) or photo.depth.npy (float [H, W], NaN = unknown), found by themselves",
    )
    p.add_argument(
        "--checkpoint", required=True, help="SD1.x / SD2.x / SDXL checkpoint whose VAE and text encoder encode the data"
    )
    p.add_argument(
        "--cache", required=True, help="cache folder (created; unchanged entries of an earlier run are reused)"
    )
    p.add_argument(
        "--resolution", type=int, default=512, help="bucket area = resolution^2 pixels, multiple of 64 (default 512)"
    )
    p.add_argument("--max-aspect", type=float, default=2.0, help="widest bucket aspect ratio (default 2.0)")
    p.add_argument("--batch-size", type=int, default=4, help="images per VAE call (default 4)")
    return p


def run(args: argparse.Namespace) -> int:
    from training.cache import prepare_cache
    from training.dataset import bucket_resolutions, scan_folder
    from training.depth_dataset import pair_depth_maps

    records = scan_folder(args.dataset)  # a missing / empty folder fails before ComfyUI loads
    # a folder with depth maps (name.depth.png / .npy) is one of image + depth pairs: every image needs its own,
    # of its size (refused here, before ComfyUI loads)
    records = pair_depth_maps(pathlib.Path(args.dataset), records)
    bucket_resolutions(args.resolution, args.max_aspect)
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    require_checkpoint(args.checkpoint)
    start_host(args)
    from d2f_host.checkpoints import load_checkpoint
    from d2f_host.conditioning import CheckpointEncoders

    _, clip, vae = load_checkpoint(args.checkpoint)
    encoders = CheckpointEncoders(clip, vae, args.checkpoint)
    bar = progress_bar(len(records), "prepare", not args.no_progress)
    try:
        summary = prepare_cache(
            records,
            args.cache,
            encoders,
            args.resolution,
            args.max_aspect,
            args.batch_size,
            progress=lambda done, total: bar.update(done - bar.n),
            extra_settings={"checkpoint": str(pathlib.Path(args.checkpoint).resolve())},
        )
    finally:
        bar.close()
    if summary.missing_captions:
        log.warning(
            "%d images have no .txt caption (empty caption used): %s",
            len(summary.missing_captions),
            ", ".join(summary.missing_captions[:10]) + (" ..." if len(summary.missing_captions) > 10 else ""),
        )
    print(summary.report())
    print(f"cache: {pathlib.Path(args.cache).resolve()}")
    return 0
