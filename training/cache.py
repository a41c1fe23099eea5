"""The latent cache: VAE latents and text embeddings of a dataset folder, in safetensors shards.

Layout of a cache folder::

    index.json                     entries (source file, size, mtime, caption, bucket, shard) + settings
    uncond.safetensors             the empty caption's embeddings (caption dropout, CFG)
    shard-<run>-<n>.safetensors    tensors "<key>/latent" [C, h, w] and "<key>/<cond name>" [1, ...]

A folder of image + depth pairs (training/depth_dataset.py) makes a depth cache: each entry's
``latent`` is the VAE latent of its normalised depth map (the target), ``concat`` the VAE latent of
its image (the condition), both raw (before the model's latent scaling), and no text: every sample is
trained on the empty prompt, ``uncond.safetensors``. Its index has format ``/2`` and the setting
``task = "depth"``: a toolkit that reads only ``/1`` refuses it rather than train an image model on
depth latents. An image cache has format ``/1``, so every toolkit that reads ``/1`` reads it.

``prepare_cache`` re-encodes only what changed: an entry whose image file (size, mtime), bucket and
image-encoder settings are unchanged keeps its latent; one whose caption and text-encoder settings
are unchanged keeps its embeddings. New shards are written first, then the index (atomically), and
only then are the shards no entry refers to any more deleted, so an interrupted ``prepare`` leaves
the previous cache usable. Unreadable images are reported and skipped, never fatal.

The encoders are a protocol (:class:`Encoder`), so this module does not depend on ComfyUI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .dataset import DatasetError, ImageRecord, UnreadableImage, bucket_resolutions, load_image
from .depth_dataset import depth_pixels, load_depth
from .files import atomic_write

INDEX = "index.json"
UNCOND = "uncond.safetensors"
FORMAT = "diff2flow-latent-cache/1"  # image latents + captions
DEPTH_FORMAT = "diff2flow-latent-cache/2"  # image + depth pairs: depth latents with their image latents ("concat")
READABLE_FORMATS = (FORMAT, DEPTH_FORMAT)
log = logging.getLogger("diff2flow")


class Encoder(Protocol):
    """What ``prepare`` needs from a checkpoint."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, H, W, 3] in [0, 1] -> raw latents [B, C, H/8, W/8] (before the model's latent scaling)."""

    def encode_text(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """One dict per caption of tensors with a batch dimension of 1 (e.g. ``context``)."""

    def image_fingerprint(self) -> str:
        """Changes when the image encoder (VAE) changes."""

    def text_fingerprint(self) -> str:
        """Changes when the text encoder changes."""


@dataclass
class PrepareSummary:
    images: int = 0
    encoded_latents: int = 0
    reused_latents: int = 0
    encoded_captions: int = 0
    reused_captions: int = 0
    missing_captions: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    buckets: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    depth: bool = False  # image + depth pairs (each latent counts the pair: its depth and its image)

    @property
    def cached(self) -> int:
        return self.images - len(self.skipped)

    def report(self) -> str:
        if self.depth:
            first = (
                f"{self.cached} of {self.images} image + depth pairs cached in {self.seconds:.1f} s (a depth model's "
                f"data: empty prompt): {self.encoded_latents} pairs encoded, {self.reused_latents} reused"
            )
        else:
            first = (
                f"{self.cached} of {self.images} images cached in {self.seconds:.1f} s: "
                f"{self.encoded_latents} latents encoded, {self.reused_latents} reused; "
                f"{self.encoded_captions} captions encoded, {self.reused_captions} reused"
            )
        lines = [
            first,
            "buckets (width x height: images): " + ", ".join(f"{k}: {v}" for k, v in sorted(self.buckets.items())),
        ]
        if self.missing_captions:
            lines.append(
                f"{len(self.missing_captions)} images have no .txt caption and were trained with an empty caption"
            )
        if self.skipped:
            lines.append(f"{len(self.skipped)} unreadable {'pairs' if self.depth else 'images'} skipped:")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def entry_key(relative: str) -> str:
    return hashlib.sha1(relative.encode("utf-8")).hexdigest()[:20]


def read_index(cache_dir: str | os.PathLike) -> dict | None:
    path = pathlib.Path(cache_dir) / INDEX
    if not path.is_file():
        return None
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") not in READABLE_FORMATS:
        raise DatasetError(
            f"{path} is not a Diff2Flow latent cache this toolkit reads (format {index.get('format')!r}; "
            f"it reads {', '.join(READABLE_FORMATS)}): run `prepare` into an empty folder, or update the toolkit"
        )
    return index


class _ShardReader:
    """Tensors of the existing shards, opened lazily."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder, self.handles = folder, {}

    def _open(self, shard: str):
        if shard not in self.handles:
            self.handles[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self.handles[shard]

    def get(self, shard: str, name: str) -> torch.Tensor:
        return self._open(shard).get_tensor(name)

    def conds(self, shard: str, key: str) -> dict[str, torch.Tensor]:
        """The conditioning tensors of one entry, by name (``context``, ``pooled_output``)."""
        prefix = f"{key}/cond."
        return {n[len(prefix) :]: self.get(shard, n) for n in self._open(shard).keys() if n.startswith(prefix)}


class _ShardWriter:
    """Collects entries and writes shards of ``shard_size`` entries (each write atomic)."""

    def __init__(self, folder: pathlib.Path, shard_size: int) -> None:
        self.folder, self.shard_size = folder, shard_size
        self.run = uuid.uuid4().hex[:8]
        self.pending: dict[str, torch.Tensor] = {}
        self.count, self.written = 0, []

    @property
    def current(self) -> str:
        return f"shard-{self.run}-{len(self.written):05d}.safetensors"

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> str:
        shard = self.current
        for name, t in tensors.items():
            self.pending[f"{key}/{name}"] = t.detach().to("cpu").contiguous()
        self.count += 1
        if self.count == self.shard_size:
            self.flush()
        return shard

    def flush(self) -> None:
        if self.pending:
            data, name = self.pending, self.current
            atomic_write(self.folder / name, lambda tmp: save_file(data, tmp))
            self.written.append(name)
        self.pending, self.count = {}, 0


@dataclass
class CachePlan:
    """What ``prepare`` may reuse: the previous index and whether its image / text encodings are
    still valid under the settings of this run."""

    folder: pathlib.Path
    old: dict
    settings: dict
    same_images: bool
    same_text: bool
    buckets: list[tuple[int, int]]


def plan_cache(
    cache_dir: str | os.PathLike,
    encoder: Encoder,
    resolution: int,
    max_aspect: float,
    extra_settings: dict | None = None,
) -> CachePlan:
    """Read the previous index of ``cache_dir`` (if any) and compare its settings with this run's."""
    folder = pathlib.Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    old = read_index(folder) or {"entries": {}, "settings": {}}
    settings = {
        "resolution": resolution,
        "max_aspect": max_aspect,
        "image_encoder": encoder.image_fingerprint(),
        "text_encoder": encoder.text_fingerprint(),
        **(extra_settings or {}),
    }
    # "task" ("depth" for image + depth pairs; absent for images): another kind of data re-encodes every entry
    same_images = all(
        old["settings"].get(k) == settings.get(k) for k in ("resolution", "max_aspect", "image_encoder", "task")
    )
    # a depth cache holds no caption embeddings: images prepared over one encode their captions afresh
    same_text = old["settings"].get("text_encoder") == settings["text_encoder"] and old["settings"].get(
        "task"
    ) == settings.get("task")
    return CachePlan(folder, old, settings, same_images, same_text, bucket_resolutions(resolution, max_aspect))


def encode_entries(
    plan: CachePlan,
    records: list[ImageRecord],
    encoder: Encoder,
    writer: _ShardWriter,
    summary: PrepareSummary,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict]:
    """Index entries of ``records``, reusing the plan's valid encodings and encoding the rest in
    batches of one bucket; the tensors go to ``writer``. Unreadable images (and, for depth pairs,
    unreadable or flat depth maps) are counted and skipped."""
    reader = _ShardReader(plan.folder)
    entries: dict[str, dict] = {}
    depth = plan.settings.get("task") == "depth"

    def encode_batch(batch: list[tuple[ImageRecord, tuple | None, dict]]) -> None:
        pixels = [p for _, p, _ in batch if p is not None]
        if depth:  # the depth map's latent is the target, the image's the condition ("concat")
            latents = iter(encoder.encode_images(torch.stack([d for _, d in pixels])).float()) if pixels else iter(())
            concats = iter(encoder.encode_images(torch.stack([i for i, _ in pixels])).float()) if pixels else iter(())
        else:
            latents = iter(encoder.encode_images(torch.stack(pixels)).float()) if pixels else iter(())
        captions = [r.caption for r, _, e in batch if not depth and e.get("text") is None]
        texts = iter(encoder.encode_text(captions)) if captions else iter(())
        for record, pix, entry in batch:
            if depth:
                latent, concat = (
                    (next(latents), next(concats)) if pix is not None else (entry.pop("latent"), entry.pop("concat"))
                )
                tensors = {"latent": latent, "concat": concat}
            else:
                latent = next(latents) if pix is not None else entry.pop("latent")
                text = entry.pop("text") if entry.get("text") is not None else next(texts)
                tensors = {"latent": latent, **{f"cond.{k}": v for k, v in text.items()}}
            entry["shard"] = writer.add(entry["key"], tensors)
            entries[record.relative] = entry

    batch: list = []
    for done, record in enumerate(records, 1):
        key = entry_key(record.relative)
        prev = plan.old["entries"].get(record.relative)
        stat = record.path.stat()
        entry = {"key": key, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "caption": record.caption}
        image_unchanged = (
            plan.same_images
            and prev is not None
            and prev["size"] == stat.st_size
            and prev["mtime_ns"] == stat.st_mtime_ns
        )
        if depth:
            depth_stat = record.depth.stat()
            entry.update(depth=record.depth.name, depth_size=depth_stat.st_size, depth_mtime_ns=depth_stat.st_mtime_ns)
            image_unchanged = image_unchanged and all(
                prev.get(k) == entry[k] for k in ("depth", "depth_size", "depth_mtime_ns")
            )
        pixels = None
        if image_unchanged:
            entry["bucket"] = prev["bucket"]
            entry["latent"] = reader.get(prev["shard"], f"{prev['key']}/latent")
            if depth:
                entry["concat"] = reader.get(prev["shard"], f"{prev['key']}/concat")
            summary.reused_latents += 1
        else:
            try:
                pixels, bucket = load_image(record.path, buckets=plan.buckets)
                if depth:
                    target = depth_pixels(load_depth(record.depth, bucket), f"depth map {record.depth.name}")
                    pixels = (pixels, target)
            except (UnreadableImage, ValueError) as exc:  # ValueError: a flat depth map (its message names it)
                summary.skipped.append((record.relative, str(exc)))
                log.warning("skipping %s (%s)", record.relative, exc)
                continue
            entry["bucket"] = list(bucket)
            summary.encoded_latents += 1
        if depth:
            pass  # no text: a depth model is trained on the empty prompt (uncond.safetensors)
        elif plan.same_text and prev is not None and prev["caption"] == record.caption:
            entry["text"] = reader.conds(prev["shard"], prev["key"])
            summary.reused_captions += 1
        else:
            summary.encoded_captions += 1
        if not record.has_caption and not depth:
            summary.missing_captions.append(record.relative)
        bucket_name = f"{entry['bucket'][0]}x{entry['bucket'][1]}"
        summary.buckets[bucket_name] = summary.buckets.get(bucket_name, 0) + 1
        # a batch shares one bucket (VAE input shape); flush when the bucket changes or it is full
        if batch and (len(batch) == batch_size or batch[-1][2]["bucket"] != entry["bucket"]):
            encode_batch(batch)
            batch = []
        batch.append((record, pixels, entry))
        if progress is not None:
            progress(done, len(records))
    if batch:
        encode_batch(batch)
    writer.flush()
    reader.handles.clear()  # close the old shards before they may be deleted
    return entries


def write_index(plan: CachePlan, entries: dict[str, dict], encoder: Encoder, live_shards: list[str]) -> None:
    """Commit a prepared cache: the empty caption's embeddings (when the text encoder changed),
    the index (atomically), then delete the shards no entry refers to any more."""
    folder = plan.folder
    if not plan.same_text or not (folder / UNCOND).is_file():
        uncond = {k: v.contiguous() for k, v in encoder.encode_text([""])[0].items()}
        atomic_write(folder / UNCOND, lambda tmp: save_file(uncond, tmp))
    depth = plan.settings.get("task") == "depth"
    index = {
        "format": DEPTH_FORMAT if depth else FORMAT,
        "settings": plan.settings,
        "entries": entries,
        "created": time.time(),
    }
    atomic_write(
        folder / INDEX, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(index, indent=1), encoding="utf-8")
    )
    live = set(live_shards)
    for stale in folder.glob("shard-*.safetensors"):
        if stale.name not in live:
            stale.unlink(missing_ok=True)


def prepare_cache(
    records: list[ImageRecord],
    cache_dir: str | os.PathLike,
    encoder: Encoder,
    resolution: int = 512,
    max_aspect: float = 2.0,
    batch_size: int = 4,
    shard_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
    extra_settings: dict | None = None,
) -> PrepareSummary:
    """Encode ``records`` into the cache at ``cache_dir`` (reusing what did not change): plan,
    encode, write the index. Records with depth maps (:func:`training.depth_dataset.pair_depth_maps`:
    all or none) make a depth cache."""
    start = time.perf_counter()
    depth = any(r.depth is not None for r in records)
    if depth and not all(r.depth is not None for r in records):
        raise DatasetError(
            "some records have a depth map and some do not: pair them with training.depth_dataset.pair_depth_maps"
        )
    plan = plan_cache(
        cache_dir, encoder, resolution, max_aspect, {**(extra_settings or {}), **({"task": "depth"} if depth else {})}
    )
    writer = _ShardWriter(plan.folder, shard_size)
    summary = PrepareSummary(images=len(records), depth=depth)
    entries = encode_entries(plan, records, encoder, writer, summary, batch_size, progress)
    if not entries:
        raise DatasetError(
            f"none of the {len(records)} images could be read ({summary.skipped[0][1]} ...): nothing was cached"
        )
    write_index(plan, entries, encoder, writer.written)
    summary.seconds = time.perf_counter() - start
    return summary


@dataclass
class CachedDataset:
    """A loaded cache: raw latents [C, h, w], conditioning dicts (batch 1) with the empty
    caption's as ``uncond``, captions, source files and the settings it was made with. A depth
    cache (``task == "depth"``) also holds each depth latent's raw image latent in ``concats``
    [C, h, w], and every conditioning is the empty prompt's."""

    latents: list[torch.Tensor]
    conds: list[dict[str, torch.Tensor]]
    captions: list[str]
    sources: list[str]
    settings: dict
    uncond: dict[str, torch.Tensor]
    concats: list[torch.Tensor] | None = None

    @property
    def task(self) -> str:
        """``"depth"`` (image + depth pairs) or ``"image"``."""
        return "depth" if self.settings.get("task") == "depth" else "image"


def load_cache(cache_dir: str | os.PathLike) -> CachedDataset:
    folder = pathlib.Path(cache_dir)
    index = read_index(folder)
    if index is None:
        hint = "it does not exist" if not folder.exists() else f"it has no {INDEX}"
        raise DatasetError(
            f"latent cache {folder}: {hint}. Run `python -m training prepare --dataset DIR --checkpoint CKPT --cache {folder}` first"
        )
    reader = _ShardReader(folder)
    if not (folder / UNCOND).is_file():
        raise DatasetError(f"latent cache {folder} is incomplete ({UNCOND} is missing): run `prepare` again")
    data = CachedDataset([], [], [], [], index["settings"], load_file(str(folder / UNCOND)))
    depth = data.task == "depth"
    if depth != (index["format"] == DEPTH_FORMAT):
        raise DatasetError(
            f"latent cache {folder}: its index says format {index['format']} but task "
            f"{index['settings'].get('task', 'image')}: run `prepare` into an empty folder"
        )
    if depth:
        data.concats = []
    for relative, entry in sorted(index["entries"].items()):
        shard = folder / entry["shard"]
        if not shard.is_file():
            raise DatasetError(
                f"latent cache {folder} is incomplete ({entry['shard']} is missing): run `prepare` again"
            )
        key = entry["key"]
        data.latents.append(reader.get(entry["shard"], f"{key}/latent"))
        if depth:
            data.concats.append(reader.get(entry["shard"], f"{key}/concat"))
            data.conds.append(data.uncond)  # a depth model is trained on the empty prompt
        else:
            data.conds.append(reader.conds(entry["shard"], key))
        data.captions.append(entry["caption"])
        data.sources.append(relative)
    if not data.latents:
        raise DatasetError(f"latent cache {folder} is empty: run `prepare` on a folder with images")
    return data
