"""Files of ``python -m training depth``: the images to read and the depth maps written for each.

For an image ``NAME.ext`` the output folder gets ``NAME_depth.png`` (16-bit grey: 0 = near, 65535 = far),
``NAME_depth_color.png`` (the colour map, 8-bit RGB) and ``NAME_depth.npy`` (float32 [H, W] in [0, 1]).
Depth is affine-invariant (docs/MATH.md section 13): each image's map spans [0, 1]. Pure: no ComfyUI.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np
import torch

from d2f_core.colormap import apply_colormap
from training.dataset import IMAGE_EXTENSIONS, UnreadableImage, read_rgb

__all__ = ["list_images", "load_image", "depth_paths", "save_depth"]


class ImageListError(ValueError):
    """No usable image among the paths given (the message names them)."""


def list_images(paths: Sequence[str | os.PathLike]) -> list[pathlib.Path]:
    """The image files named by ``paths``: files as given, folders' image files (by suffix, sorted; not
    recursive). Missing paths and an empty result raise :class:`ImageListError`; two images with the same
    name stem would write the same output files and are refused too."""
    found: list[pathlib.Path] = []
    for raw in paths:
        path = pathlib.Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found.append(path)
        else:
            raise ImageListError(f"--images {path} does not exist: pass image files or folders of images")
    if not found:
        raise ImageListError(f"--images {', '.join(map(str, paths))}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    stems: dict[str, pathlib.Path] = {}
    for p in found:
        if p.stem in stems:
            raise ImageListError(
                f"--images: {stems[p.stem]} and {p} have the same name stem, so their depth files would "
                "overwrite each other: rename one"
            )
        stems[p.stem] = p
    return found


def load_image(path: pathlib.Path) -> torch.Tensor:
    """An image file as a ComfyUI IMAGE ``[1, H, W, 3]`` float32 in [0, 1] (read as training reads images:
    EXIF rotation applied, transparent areas white)."""
    try:
        rgb = read_rgb(path)
    except UnreadableImage as exc:
        raise ImageListError(f"{path} could not be read as an image ({exc})") from exc
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).unsqueeze(0)


def depth_paths(output: pathlib.Path, image: pathlib.Path) -> dict[str, pathlib.Path]:
    """The three files written for ``image``: ``grey``, ``color`` and ``raw``."""
    stem = image.stem
    return {
        "grey": output / f"{stem}_depth.png",
        "color": output / f"{stem}_depth_color.png",
        "raw": output / f"{stem}_depth.npy",
    }


def save_depth(
    output: pathlib.Path, image: pathlib.Path, depth: torch.Tensor, colormap: str = "spectral"
) -> dict[str, pathlib.Path]:
    """Write ``depth`` ([H, W] in [0, 1]) as the three files of :func:`depth_paths`; returns them."""
    from PIL import Image

    paths = depth_paths(output, image)
    values = depth.detach().float().clamp(0, 1).cpu()
    Image.fromarray(np.round(values.numpy() * 65535).astype(np.uint16)).save(paths["grey"])
    colors = (apply_colormap(values, colormap).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(colors).save(paths["color"])
    np.save(paths["raw"], values.numpy().astype(np.float32))
    return paths
