"""Image-folder datasets: images with same-name ``.txt`` captions, aspect-ratio buckets.

The kohya / ComfyUI convention: ``photo.png`` is captioned by ``photo.txt`` next to it; nested
folders are scanned too. A missing caption is an empty caption (counted, so the caller can warn).
Images go to the bucket whose aspect ratio is nearest (in log ratio), are resized to cover it and
centre-cropped; every bucket holds about ``resolution**2`` pixels, both sides multiples of 64.
"""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass
from typing import Any

import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEPTH_MARK = ".depth"  # photo.png's depth map is photo.depth.png (8 / 16-bit) or photo.depth.npy (float)
DEPTH_EXTENSIONS = (".png", ".npy")
BUCKET_STEP = 64  # pixels: 8 latent cells of an SD VAE


class DatasetError(ValueError):
    """The dataset folder cannot be used (missing, empty); the message says how to fix it."""


class UnreadableImage(Exception):
    """One image could not be decoded (reported and skipped, never fatal)."""


@dataclass(frozen=True)
class ImageRecord:
    path: pathlib.Path
    relative: str  # path inside the dataset folder, with "/" separators: the cache key
    caption: str
    has_caption: bool
    depth: pathlib.Path | None = None  # its depth map (name.depth.png / .npy) in a folder of depth pairs

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @property
    def mtime_ns(self) -> int:
        return self.path.stat().st_mtime_ns


def is_depth_file(path: pathlib.Path) -> bool:
    """``name.depth.png`` / ``name.depth.npy``: the depth map of ``name.<ext>`` (training/depth_dataset.py),
    never an image of its own."""
    return any(path.name.lower().endswith(DEPTH_MARK + ext) for ext in DEPTH_EXTENSIONS)


def scan_folder(folder: str | os.PathLike) -> list[ImageRecord]:
    """Every image under ``folder`` (recursively, sorted) with its caption (depth maps, ``name.depth.png``,
    are not images: :func:`training.depth_dataset.scan_depth_pairs` pairs them)."""
    root = pathlib.Path(folder)
    if not root.exists():
        raise DatasetError(
            f"dataset folder {root} does not exist: pass the folder that holds your images (and their .txt captions)"
        )
    if not root.is_dir():
        raise DatasetError(f"dataset {root} is a file, not a folder: pass the folder that holds your images")
    records = []
    for path in sorted(root.rglob("*")):
        if (
            path.suffix.lower() not in IMAGE_EXTENSIONS
            or not path.is_file()
            or any(p.startswith(".") for p in path.relative_to(root).parts)
        ):
            continue
        if is_depth_file(path):
            continue
        caption_file = path.with_suffix(".txt")
        has_caption = caption_file.is_file()
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip() if has_caption else ""
        records.append(ImageRecord(path, path.relative_to(root).as_posix(), caption, has_caption))
    if not records:
        raise DatasetError(
            f"dataset folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)}): put your training images "
            "there, each with a same-name .txt caption"
        )
    return records


def bucket_resolutions(resolution: int, max_aspect: float = 2.0, step: int = BUCKET_STEP) -> list[tuple[int, int]]:
    """(width, height) buckets of about ``resolution**2`` pixels, sides multiples of ``step``,
    aspect ratios between 1/max_aspect and max_aspect (the square one always included)."""
    if resolution < step or resolution % step:
        raise ValueError(f"resolution must be a positive multiple of {step}, got {resolution}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = step
    while width <= resolution * max_aspect:
        height = max(step, int(area / width) // step * step)
        if 1 / max_aspect <= width / height <= max_aspect:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the aspect ratio closest to width/height (log distance; ties: larger area)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def read_rgb(path: str | os.PathLike) -> Any:
    """The image file as an RGB PIL image, EXIF rotation applied and transparent areas white.
    Raises UnreadableImage for broken files."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            if im.mode in ("RGBA", "LA", "P"):
                # transparent areas become white, not black
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size, (255, 255, 255))
                im.paste(rgba, mask=rgba.getchannel("A"))
            else:
                im = im.convert("RGB")
    except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from exc
    return im


def load_image(
    path: str | os.PathLike, bucket: tuple[int, int] | None = None, buckets: list[tuple[int, int]] | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """The image as [H, W, 3] float in [0, 1] (ComfyUI's IMAGE layout), resized to cover its bucket
    and centre-cropped to it; returns (pixels, bucket). Raises UnreadableImage for broken files."""
    import numpy as np
    from PIL import Image

    im = read_rgb(path)
    if bucket is None:
        if not buckets:
            raise ValueError("give a bucket or a list of buckets")
        bucket = nearest_bucket(im.width, im.height, buckets)
    size, box = cover_and_crop(im.width, im.height, bucket)
    im = im.resize(size, Image.Resampling.LANCZOS).crop(box)
    pixels = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    return pixels, bucket


def cover_and_crop(
    width: int, height: int, bucket: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """How an image of ``width`` x ``height`` goes to ``bucket``: the (width, height) it is resized to
    (covering the bucket, aspect kept) and the centred crop box (left, top, right, bottom) after it. A
    depth map goes through the same two steps as its image, so the pair stays aligned pixel for pixel."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    size = (max(bw, round(width * scale)), max(bh, round(height * scale)))
    left, top = (size[0] - bw) // 2, (size[1] - bh) // 2
    return size, (left, top, left + bw, top + bh)
