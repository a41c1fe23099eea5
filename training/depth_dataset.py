"""Image + depth pairs for training an image-to-depth model (docs/MATH.md section 13).

Folder convention: ``photo.png`` (any image type of training/dataset.py) and its depth map next to it,
``photo.depth.png`` (grayscale, 8 or 16 bit) or ``photo.depth.npy`` (a float or integer array
[H, W]; NaN or inf marks unknown pixels). A folder that holds any depth map is a folder of depth
pairs: every image in it needs its depth map (the error names the first images without one), of
its own size. Captions are not used (a depth model is trained on the empty prompt).

Depth is only known up to scale and shift, so what a file holds is normalised per image by
:func:`d2f_core.depth.normalize_depth` (the 2 % / 98 % quantiles to -1 / 1): metres, millimetres or
any 16-bit encoding of depth give the same target. Conventionally it is depth (far = large); a model
trained on disparity predicts disparity.

A depth map follows its image to the image's bucket through the same resize and centre crop
(:func:`training.dataset.cover_and_crop`); it is resized with a mask-aware bilinear filter so unknown
pixels do not bleed into known ones. Checks that need only file headers (a missing or ambiguous depth
file, mismatched sizes, an unsupported format) run before anything is encoded.
"""

from __future__ import annotations

import os
import pathlib

import torch

from d2f_core.depth import depth_as_image, normalize_depth

from .dataset import (
    DEPTH_EXTENSIONS,
    DEPTH_MARK,
    DatasetError,
    ImageRecord,
    UnreadableImage,
    cover_and_crop,
    is_depth_file,
)

__all__ = [
    "depth_files_in",
    "depth_file_for",
    "depth_size",
    "image_size",
    "pair_depth_maps",
    "read_depth",
    "load_depth",
    "depth_pixels",
]

LISTED = 10  # images named in an error before "..."


def depth_files_in(root: pathlib.Path) -> list[pathlib.Path]:
    """The depth maps under ``root`` (hidden folders skipped, as for images)."""
    return [
        p
        for p in sorted(root.rglob("*"))
        if is_depth_file(p) and p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]


def depth_file_for(image: pathlib.Path) -> pathlib.Path | None:
    """``image``'s depth map (``<stem>.depth.png`` or ``.npy`` beside it), ``None`` when it has none; both
    present is refused (which one is meant?)."""
    found = [image.with_name(image.stem + DEPTH_MARK + ext) for ext in DEPTH_EXTENSIONS]
    found = [p for p in found if p.is_file()]
    if len(found) > 1:
        raise DatasetError(f"{image.name} has two depth maps ({found[0].name} and {found[1].name}): keep one")
    return found[0] if found else None


def image_size(path: pathlib.Path) -> tuple[int, int]:
    """(width, height) of an image as :func:`training.dataset.load_image` sees it (EXIF rotation applied),
    from its header; :class:`UnreadableImage` when it cannot be opened."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
            # EXIF orientations 5-8 rotate by 90 degrees (exif_transpose swaps the sides)
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
    except Exception as exc:  # PIL raises many kinds for broken files
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from exc
    return width, height


def _png_mode_error(path: pathlib.Path, mode: str) -> DatasetError:
    return DatasetError(
        f"depth map {path} is a PNG of mode {mode}: save depth as a grayscale PNG (8 or 16 bit) or as "
        f"{path.name[: -len('.png')]}.npy (a float array [H, W])"
    )


def depth_size(path: pathlib.Path) -> tuple[int, int]:
    """(width, height) of a depth map from its header, checking that its format is one this module
    reads (:class:`DatasetError` naming the file otherwise)."""
    import numpy as np

    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise DatasetError(f"depth map {path} is not a readable .npy array ({type(exc).__name__}: {exc})") from exc
        shape = _depth_shape(array.shape, path)
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise DatasetError(f"depth map {path} holds {array.dtype} values: save depth as a float array [H, W]")
        return shape[1], shape[0]
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "RGB", "RGBA"):
                raise _png_mode_error(path, im.mode)
            return im.size
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"depth map {path} could not be opened ({type(exc).__name__}: {exc})") from exc


def _depth_shape(shape: tuple[int, ...], path: pathlib.Path) -> tuple[int, int]:
    """(H, W) of an array of shape [H, W], [1, H, W] or [H, W, 1]."""
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    elif len(shape) == 3 and shape[2] == 1:
        shape = shape[:2]
    if len(shape) != 2:
        raise DatasetError(f"depth map {path} has shape {tuple(shape)}: save one channel, [H, W]")
    return int(shape[0]), int(shape[1])


def pair_depth_maps(root: pathlib.Path, records: list[ImageRecord]) -> list[ImageRecord]:
    """``records`` with their depth maps when ``root`` holds any depth map (a folder of depth pairs), else
    unchanged. Refused before anything is encoded, naming the files: images without a depth map,
    depth maps of another size than their image, unreadable depth headers, depth maps without an image."""
    depth_files = depth_files_in(root)
    if not depth_files:
        return records
    paired, missing, mismatched = [], [], []
    for record in records:
        depth = depth_file_for(record.path)
        if depth is None:
            missing.append(record.relative)
            continue
        try:
            size = image_size(record.path)
        except UnreadableImage:
            size = None  # a broken image is reported and skipped by prepare, as in any dataset
        depth_wh = depth_size(depth)
        if size is not None and depth_wh != size:
            mismatched.append(
                f"{record.relative} is {size[0]}x{size[1]} but {depth.name} is {depth_wh[0]}x{depth_wh[1]}"
            )
        paired.append(ImageRecord(record.path, record.relative, "", False, depth))
    if missing:
        raise DatasetError(
            f"{root} holds depth maps (e.g. {depth_files[0].relative_to(root).as_posix()}), so it is read as image + "
            f"depth pairs, but {len(missing)} images have no depth map: {', '.join(missing[:LISTED])}"
            + (" ..." if len(missing) > LISTED else "")
            + f". Add <name>{DEPTH_MARK}.png (8/16-bit grayscale) or "
            f"<name>{DEPTH_MARK}.npy (float) beside each, or move those images out"
        )
    if mismatched:
        raise DatasetError(
            f"{len(mismatched)} depth maps differ in size from their image (a depth map must be "
            f"aligned with its image pixel for pixel): "
            + "; ".join(mismatched[:LISTED])
            + (" ..." if len(mismatched) > LISTED else "")
        )
    used = {r.depth for r in paired}
    orphans = [p.relative_to(root).as_posix() for p in depth_files if p not in used]
    if orphans:
        raise DatasetError(
            f"{len(orphans)} depth maps have no image beside them: {', '.join(orphans[:LISTED])}"
            + (" ..." if len(orphans) > LISTED else "")
            + " (photo.depth.png pairs with photo.png / "
            ".jpg / ...): add the image or remove the depth map"
        )
    return paired


def read_depth(path: str | os.PathLike) -> torch.Tensor:
    """A depth map file as float32 [H, W] (NaN / inf: unknown pixels), values as stored (16-bit PNG
    codes, metres, ...: only their order and ratios of differences matter after normalisation).
    :class:`UnreadableImage` for files that cannot be decoded; :class:`DatasetError` for formats
    that are not depth (a colour PNG, an array of several channels)."""
    import numpy as np

    path = pathlib.Path(path)
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise UnreadableImage(f"{type(exc).__name__}: {exc}") from exc
        h, w = _depth_shape(array.shape, path)
        return torch.from_numpy(np.ascontiguousarray(array.reshape(h, w), dtype=np.float32))
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            array = np.asarray(im)
    except Exception as exc:
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from exc
    if mode in ("RGB", "RGBA", "LA"):
        colour = array[..., :3] if mode != "LA" else array[..., :1]
        # a grayscale map saved as RGB is depth; a colour-mapped visualisation is not (its colours have no order)
        if mode != "LA" and not (
            np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])
        ):
            raise DatasetError(
                f"depth map {path} is in colour (a visualisation?): save depth itself as a grayscale PNG "
                "(8 or 16 bit) or a float .npy"
            )
        array = colour[..., 0]
    elif mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
        raise _png_mode_error(path, mode)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def _resize_masked(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``depth`` [H, W] resized to ``size`` (width, height) bilinearly (antialiased when shrinking), each
    output pixel from the known input pixels only; NaN where less than half of its weight is known."""
    known = torch.isfinite(depth)
    filled = torch.where(known, depth, torch.zeros_like(depth))
    stack = torch.stack([filled * known, known.float()])[None].double()
    out = torch.nn.functional.interpolate(
        stack, size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=True
    )[0]
    value, weight = out[0], out[1]
    return torch.where(weight > 0.5, value / weight.clamp_min(1e-12), torch.full_like(value, float("nan"))).float()


def load_depth(path: str | os.PathLike, bucket: tuple[int, int]) -> torch.Tensor:
    """A depth map as float32 [h, w] at ``bucket`` (width, height), through the resize and centre crop
    its image takes (:func:`training.dataset.cover_and_crop`); NaN marks unknown pixels."""
    depth = read_depth(path)
    size, (left, top, right, bottom) = cover_and_crop(depth.shape[1], depth.shape[0], bucket)
    if size != (depth.shape[1], depth.shape[0]):
        depth = _resize_masked(depth, size)
    return depth[top:bottom, left:right].contiguous()


def depth_pixels(depth: torch.Tensor, name: str = "depth map") -> torch.Tensor:
    """A depth map [H, W] (NaN / inf: unknown) as the image a VAE encodes, [H, W, 3] in [0, 1] (ComfyUI's
    IMAGE layout): normalised per image to [-1, 1] (2 % / 98 % quantiles), the channel replicated, then
    mapped to [0, 1] (the VAE maps pixels back to [-1, 1]). A flat depth map raises ``ValueError`` naming
    ``name``."""
    if depth.ndim != 2:
        raise ValueError(f"{name} must have shape [H, W], got {tuple(depth.shape)}")
    try:
        normalised = normalize_depth(depth[None].float())
    except ValueError as exc:  # its message names "depth map 0" (the batch index): name the file or input instead
        raise ValueError(str(exc).replace("depth map 0", name, 1)) from exc
    return ((depth_as_image(normalised)[0] + 1) / 2).permute(1, 2, 0).contiguous()
