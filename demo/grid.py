"""The before / after sample grid PNG (one row per class)."""

from __future__ import annotations

import pathlib

import numpy as np
import torch

from training.files import atomic_write

CELL = 48  # pixels per 16x16 sample (3x nearest upscaling)
LABEL = 24  # left column with the class digit
HEADER = 20  # top row with "before" / "after"
GAP = 16  # between the two halves


def grid_size(per_class: int, classes: int = 10) -> tuple[int, int]:
    """``(width, height)`` of the PNG :func:`save_grid` writes."""
    return LABEL + 2 * per_class * CELL + GAP, HEADER + classes * CELL


def _tile(samples: torch.Tensor, per_class: int) -> np.ndarray:
    # [-1, 1] -> 0..255, rows = classes, columns = samples of that class
    img = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    classes = img.shape[0] // per_class
    img = (
        img.reshape(classes, per_class, *img.shape[1:])
        .repeat(CELL // img.shape[-1], 2)
        .repeat(CELL // img.shape[-1], 3)
    )
    return img.transpose(0, 2, 1, 3).reshape(classes * CELL, per_class * CELL)


def save_grid(path: str | pathlib.Path, before: torch.Tensor, after: torch.Tensor, per_class: int) -> None:
    """Write ``before`` | ``after`` samples (each [classes * per_class, 1, 16, 16], class-major)."""
    from PIL import Image, ImageDraw

    if before.shape != after.shape or before.shape[0] % per_class:
        raise ValueError(f"grids do not match: {tuple(before.shape)} vs {tuple(after.shape)}, {per_class} per class")
    classes = before.shape[0] // per_class
    width, height = grid_size(per_class, classes)
    canvas = np.full((height, width), 255, dtype=np.uint8)
    half = per_class * CELL
    canvas[HEADER:, LABEL : LABEL + half] = _tile(before, per_class)
    canvas[HEADER:, LABEL + half + GAP :] = _tile(after, per_class)
    image = Image.fromarray(canvas, mode="L")
    draw = ImageDraw.Draw(image)
    draw.text((LABEL + 4, 4), "zero-shot (before)", fill=0)
    draw.text((LABEL + half + GAP + 4, 4), "after Diff2Flow LoRA fine-tuning", fill=0)
    for c in range(classes):
        draw.text((8, HEADER + c * CELL + CELL // 2 - 6), str(c), fill=0)
    atomic_write(path, lambda p: image.save(p, format="PNG"))
