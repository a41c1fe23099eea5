"""Reflow pairs: (noise, image) couplings of a teacher's probability-flow ODE, in safetensors shards.

For each index ``i`` the noise ``z_i`` comes from a seed derived from ``(seed, i)`` alone, the
conditioning is prompt ``i mod P``, and the teacher's ODE is integrated from ``sigma_max * z_i``
down to sigma = 0 with a ``d2f_core.SAMPLERS`` sampler (optionally with CFG), giving ``x0_i``. The
reflow objective then trains on the straight line between ``z_i`` and ``x0_i`` (docs/MATH.md
sections 6 and 12). Time convention: FM sigma in [0, 1], sigma = 1 is noise.

Folder layout::

    manifest.json                      format, the settings every pair depends on, count, sources; with
                                       inverted images their count, names and sources ("inverted*")
    conds.safetensors                  "<prompt id>/<name>": the teacher's network keyword arguments per
                                       prompt (batch dimension 1); "uncond/<name>": the negative's
    pairs-<start>-<stop>.safetensors   "noise", "latent" [N, C, H, W] float32, "index", "prompt" [N] int64
                                       for the indices start <= i < stop
    inverted-<start>-<stop>.safetensors  inverted images j (their own index space, start <= j < stop):
                                       "noise" (x_T / sigma_max), "latent" (the image itself), "index",
                                       "caption" [N] int64 and "cond/<k>/<name>": the shard's distinct
                                       captions' network keyword arguments (batch dimension 1), caption k

Inverted pairs (:func:`invert_pairs`) are the user's own images run backwards through the same ODE
(``d2f_core.invert``, the same sampler along the same grid reversed, CFG with each image's caption),
stored like generated pairs: the noise ``z = x_T / sigma_max`` from which the teacher's sampling
returns to the image, and the image. A folder that holds any has the manifest format
:data:`INVERTED_FORMAT` (a toolkit that reads only :data:`FORMAT` refuses it instead of training on
half of it); a folder without any keeps :data:`FORMAT` and loads as before. Inverted image ``j``
depends only on itself, its caption, the settings and ``batch_size``: each network batch holds
``batch_size`` rows (a short group is padded with copies of its first image), so which images
share a batch changes no bits on the CPU (a network's rows are computed independently at a given
batch shape). A run checks that the images the folder already holds are the
caller's first ones (appending means more images after them).

Determinism: a network batch is always the aligned block of ``batch_size`` indices
``[j * B, (j + 1) * B)``, computed whole (a block that reaches past ``count`` too: its extra pairs are
dropped), so every pair is computed in the same batch whatever the count, the shard layout, the
number of processes or the point a run was resumed from: the pairs are bit-identical on the CPU.

Resumable and appendable: a run generates only the indices no shard holds yet (a larger count
appends); each shard is written atomically when finished, so an interrupted run, a cancel or a full
disk keeps every finished shard. Several processes (torchrun) take disjoint shards; rank 0 writes
the manifest. This module does not import ComfyUI: the teacher is a velocity function.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import d2f_core

from .data import TrainingData
from .files import atomic_write, ensure_writable_folder, remove_stale_temporaries

__all__ = [
    "FORMAT",
    "INVERTED_FORMAT",
    "PairSettings",
    "pair_settings",
    "PairProgress",
    "PairsSummary",
    "PairsError",
    "Pairs",
    "pair_seed",
    "pair_noise",
    "generate_pairs",
    "invert_pairs",
    "load_pairs",
    "pair_shards",
]

FORMAT = "diff2flow-reflow-pairs/1"
INVERTED_FORMAT = "diff2flow-reflow-pairs/2"  # the folder holds inverted pairs too (inverted-*.safetensors)
READABLE_FORMATS = (FORMAT, INVERTED_FORMAT)
MANIFEST = "manifest.json"
# a folder's settings from before the grid option: its pairs ran the uniform grid
SETTINGS_BEFORE_THE_GRID = {"grid": "uniform", "sigma_floor": 0.0}
CONDS = "conds.safetensors"
_SHARD = re.compile(r"^pairs-(\d{9})-(\d{9})\.safetensors$")
_INVERTED_SHARD = re.compile(r"^inverted-(\d{9})-(\d{9})\.safetensors$")

Cond = dict[str, torch.Tensor]
# fn(x_sigma [B, C, H, W], sigma [B], cond: network keyword arguments batched like x) -> velocity
VelocityFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


class PairsError(ValueError):
    """A pairs folder or request that cannot be used, with the fix named."""


@dataclass(frozen=True)
class PairSettings:
    """Everything a pair depends on; a run that resumes or appends to a folder must use the same.

    ``teacher`` identifies the teacher model (checkpoint hash, LoRA, prediction, ...: whatever the
    caller can name it by; compared as a whole). ``shape`` is the latent shape [C, H, W];
    ``sigma_max`` the teacher's noisiest level (sampling starts at ``sigma_max * z``);
    ``shift`` the time shift of the FM sigma grid, ``grid`` its kind (``d2f_core.FM_GRIDS``) and
    ``sigma_floor`` where its uniform part ends (the teacher's ``sigma_min`` for grid ``sigma_min``, 0 for
    ``uniform``; ``d2f_core.grid_floor``). ``batch_size`` is part of the settings because the batch a pair
    is computed in decides its last bits.
    """

    shape: tuple[int, int, int]
    sigma_max: float = 1.0
    sampler: str = "euler"
    steps: int = 32
    cfg: float = 1.0
    shift: float = 1.0
    seed: int = 0
    batch_size: int = 8
    teacher: dict[str, Any] = field(default_factory=dict)
    grid: str = "uniform"
    sigma_floor: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise PairsError(f"shape must be [channels, height, width] of positive sizes, got {list(self.shape)}")
        d2f_core.get_sampler(self.sampler)
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise PairsError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise PairsError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not 0 < self.sigma_max <= 1:
            raise PairsError(f"sigma_max must lie in (0, 1], got {self.sigma_max}")
        if self.grid not in d2f_core.FM_GRIDS:
            raise PairsError(f"grid {self.grid!r} is unknown: choose one of {', '.join(d2f_core.FM_GRIDS)}")
        if (self.grid == "uniform") != (self.sigma_floor == 0) or not 0 <= self.sigma_floor < self.sigma_max:
            raise PairsError(
                f"sigma_floor {self.sigma_floor} does not fit grid {self.grid}: 0 for uniform, the teacher's sigma_min "
                f"(in (0, sigma_max {self.sigma_max:g})) for sigma_min"
            )
        if not self.shift > 0 or not math.isfinite(self.cfg):
            raise PairsError(f"shift must be > 0 and cfg finite, got shift {self.shift}, cfg {self.cfg}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        return out

    def sigmas(self) -> torch.Tensor:
        """The teacher's FM sigma grid, from ``sigma_max`` to 0 (float64)."""
        return d2f_core.fm_sigmas(self.steps, sigma_max=self.sigma_max, shift=self.shift, sigma_floor=self.sigma_floor)


def pair_settings(
    config: Any, shape: Sequence[int], sigma_max: float, sigma_min: float, teacher: dict[str, Any]
) -> PairSettings:
    """The settings of the pairs ``config`` (a ``training.config.PairsConfig``) asks of a teacher whose
    noise levels run from ``sigma_min`` to ``sigma_max`` (its ``Diff2Flow`` alignment's) and which
    ``teacher`` names; ``shape`` is the latent [C, H, W]."""
    return PairSettings(
        shape=tuple(shape),
        sigma_max=sigma_max,
        sampler=config.sampler,
        steps=config.steps,
        cfg=config.cfg,
        shift=config.shift,
        seed=config.seed,
        batch_size=config.batch_size,
        teacher=teacher,
        grid=config.grid,
        sigma_floor=d2f_core.grid_floor(config.grid, sigma_min),
    )


@dataclass
class PairProgress:
    """One progress report: ``done`` of ``total`` pairs of this process, ``seconds`` since it
    started generating, and the last batch's images (``latest`` [B, C, H, W], for previews)."""

    done: int
    total: int
    seconds: float
    latest: torch.Tensor

    @property
    def pairs_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


@dataclass
class PairsSummary:
    folder: pathlib.Path
    count: int  # pairs the folder holds now (all processes)
    generated: int  # by this process in this run
    reused: int  # already in the folder when the run started
    seconds: float
    inverted: bool = False  # the pairs of images inverted (invert_pairs): counts are of inverted pairs

    def report(self) -> str:
        rate = self.generated / self.seconds if self.seconds > 0 else 0.0
        kind, made = ("inverted pairs", "inverted") if self.inverted else ("pairs", "generated")
        return (
            f"{self.count} {kind} in {self.folder}: {self.generated} {made} in {self.seconds:.1f} s "
            f"({rate:.2f} pairs/s), {self.reused} already there"
        )


# ------------------------------------------------------------------------------ per-index randomness
def pair_seed(seed: int, index: int) -> int:
    """The seed of pair ``index``: a hash of ``(seed, index)``, the same on every platform and
    independent of how the indices are split into shards, batches or processes."""
    digest = hashlib.sha256(f"diff2flow-pair/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def pair_noise(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """The standard normal noise ``z_index`` (float32, drawn on the CPU so every device agrees)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(pair_seed(seed, index)))


# ------------------------------------------------------------------------------ the folder
def pair_shards(folder: str | os.PathLike, inverted: bool = False) -> list[tuple[int, int, pathlib.Path]]:
    """The finished shards of a pairs folder as ``(start, stop, path)``, sorted: of the generated pairs,
    or with ``inverted`` of the inverted images (their own index space)."""
    folder = pathlib.Path(folder)
    found = []
    pattern = _INVERTED_SHARD if inverted else _SHARD
    for path in folder.glob("inverted-*.safetensors" if inverted else "pairs-*.safetensors"):
        match = pattern.match(path.name)
        if match:
            found.append((int(match.group(1)), int(match.group(2)), path))
    return sorted(found)


def _covered(shards: list[tuple[int, int, pathlib.Path]]) -> set[int]:
    return {i for start, stop, _ in shards for i in range(start, stop)}


def _read_manifest(folder: pathlib.Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise PairsError(f"{path} is not valid JSON ({exc}): generate into an empty folder") from exc
    if manifest.get("format") not in READABLE_FORMATS:
        raise PairsError(
            f"{folder} is not a Diff2Flow pairs folder this toolkit reads ({path.name} has format "
            f"{manifest.get('format')!r}; it reads {', '.join(READABLE_FORMATS)}): generate into an empty folder, "
            "or update the toolkit"
        )
    return manifest


def _write_manifest(folder: pathlib.Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True)
    atomic_write(folder / MANIFEST, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))


def _flat_conds(conds: Sequence[Cond], uncond: Cond | None) -> dict[str, torch.Tensor]:
    flat = {f"{i}/{k}": v.detach().cpu().contiguous() for i, c in enumerate(conds) for k, v in c.items()}
    if uncond is not None:
        flat.update({f"uncond/{k}": v.detach().cpu().contiguous() for k, v in uncond.items()})
    return flat


def _split_conds(flat: dict[str, torch.Tensor], prompts: int) -> tuple[list[Cond], Cond | None]:
    conds: list[Cond] = [{} for _ in range(prompts)]
    uncond: Cond = {}
    for key, value in flat.items():
        owner, name = key.split("/", 1)
        if owner == "uncond":
            uncond[name] = value
        else:
            conds[int(owner)][name] = value
    return conds, uncond or None


def _same_tensors(a: Cond, b: Cond) -> bool:
    """The same names and shapes, and values up to the round-off of encoding on another device."""
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4) for k in a
    )


def _check_same_conds(folder: pathlib.Path, flat: dict[str, torch.Tensor], prefix: str = "") -> None:
    """The folder's conditionings are this run's (up to the round-off of encoding on another device);
    with ``prefix`` (``"uncond/"``) only the entries of that owner."""
    stored = load_file(str(folder / CONDS))
    if not _same_tensors(
        {k: v for k, v in stored.items() if k.startswith(prefix)},
        {k: v for k, v in flat.items() if k.startswith(prefix)},
    ):
        raise PairsError(
            f"{folder} holds pairs generated from other prompts (or another negative prompt / text "
            "encoder): use the same prompts to resume or append, or generate into a new folder"
        )


def _check_settings(folder: pathlib.Path, settings: PairSettings) -> dict | None:
    """The manifest of ``folder`` (``None`` for a new folder), checked to hold pairs of ``settings``."""
    manifest = _read_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        if folder.is_dir() and (pair_shards(folder) or pair_shards(folder, inverted=True)):
            raise PairsError(f"{folder} holds pair shards but no {MANIFEST}: generate into an empty folder")
        return None
    saved = {**SETTINGS_BEFORE_THE_GRID, **manifest["settings"]}
    mine = settings.to_dict()
    differs = [f"{k}: folder {saved.get(k)!r}, now {mine[k]!r}" for k in mine if saved.get(k) != mine[k]]
    if differs:
        raise PairsError(
            f"{folder} holds pairs generated with other settings ({'; '.join(differs)}): use the same "
            "settings to resume or append, or generate into a new folder"
        )
    if not (folder / CONDS).is_file():
        raise PairsError(f"{folder} is incomplete ({CONDS} is missing): generate into a new folder")
    return manifest


def _check_folder(
    folder: pathlib.Path, settings: PairSettings, flat: dict[str, torch.Tensor], labels: list[str]
) -> dict | None:
    """Check that ``folder`` may receive these generated pairs; returns its manifest (``None`` if new).
    A folder of inverted images alone (no prompts yet) takes this run's prompts if its negative is this run's."""
    manifest = _check_settings(folder, settings)
    if manifest is None:
        return None
    if labels and manifest.get("labels") and manifest["labels"] != labels:
        raise PairsError(
            f"{folder} holds pairs of other prompts ({len(manifest['labels'])} prompts, the first "
            f"{manifest['labels'][0]!r}): use the same prompts to resume or append, or generate into a new folder"
        )
    _check_same_conds(folder, flat, "" if manifest.get("prompts") else "uncond/")
    return manifest


def _owned(name: str) -> bool:
    """A file name of a pairs folder (whose stale temporaries a run may remove)."""
    return name in (MANIFEST, CONDS) or _SHARD.match(name) is not None or _INVERTED_SHARD.match(name) is not None


# ------------------------------------------------------------------------------ work plan
def _units(count: int, shard_size: int, have: set[int]) -> list[tuple[int, int]]:
    """The shards still to write: maximal runs of missing indices within each aligned block of
    ``shard_size`` indices, as ``(start, stop)``."""
    units = []
    for block in range(0, count, shard_size):
        start = None
        for i in range(block, min(block + shard_size, count) + 1):
            missing = i < min(block + shard_size, count) and i not in have
            if missing and start is None:
                start = i
            elif not missing and start is not None:
                units.append((start, i))
                start = None
    return units


def _match_tokens(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention contexts of different token counts repeated to a common count (as ComfyUI
    concatenates a long prompt with a short negative): repeating the keys and values of
    attention leaves its output unchanged."""
    if a.ndim != 3 or b.ndim != 3 or a.shape[1] == b.shape[1]:
        return a, b
    common = math.lcm(a.shape[1], b.shape[1])
    return a.repeat(1, common // a.shape[1], 1), b.repeat(1, common // b.shape[1], 1)


def _batch_conds(
    conds: Sequence[Cond], uncond: Cond | None, prompt_ids: list[int], device: torch.device
) -> tuple[Cond, Cond | None]:
    cond = {k: torch.cat([conds[p][k] for p in prompt_ids]).to(device) for k in conds[prompt_ids[0]]}
    if uncond is None:
        return cond, None
    neg = {k: v.to(device).expand(len(prompt_ids), *v.shape[1:]) for k, v in uncond.items()}
    for k in cond.keys() & neg.keys():
        cond[k], neg[k] = _match_tokens(cond[k], neg[k])
    return cond, neg


@torch.no_grad()
def _generate_block(
    velocity: VelocityFn,
    conds: Sequence[Cond],
    uncond: Cond | None,
    settings: PairSettings,
    block: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indices, noise, x0)`` of the aligned batch block ``block`` (all ``batch_size`` indices).

    Prompts whose conditionings differ in shape (a long prompt) are sampled as separate groups, in
    index order, so the grouping too depends on the indices alone."""
    size = settings.batch_size
    indices = torch.arange(block * size, (block + 1) * size)
    noise = torch.stack([pair_noise(settings.seed, int(i), settings.shape) for i in indices])
    prompt = indices % len(conds)
    groups: dict[tuple, list[int]] = {}
    for j, p in enumerate(prompt.tolist()):
        groups.setdefault(tuple((k, tuple(v.shape)) for k, v in sorted(conds[p].items())), []).append(j)
    x0 = torch.empty_like(noise)
    sampler, sigmas = d2f_core.get_sampler(settings.sampler), settings.sigmas()
    for members in groups.values():
        cond, neg = _batch_conds(conds, uncond if settings.cfg != 1.0 else None, prompt[members].tolist(), device)
        guided = d2f_core.cfg_velocity(velocity, cond, neg, settings.cfg)
        x = (settings.sigma_max * noise[members]).to(device)
        x0[members] = sampler(guided, x, sigmas).float().cpu()
    return indices, noise, x0


# ------------------------------------------------------------------------------ generation
def _check_guidance_and_shards(settings: PairSettings, uncond: Cond | None, shard_size: Any) -> None:
    """The arguments generation and inversion share: a negative for cfg != 1, whole batches per shard."""
    if settings.cfg != 1.0 and uncond is None:
        raise PairsError(f"cfg {settings.cfg} needs the negative (unconditional) conditioning: pass uncond, or cfg 1")
    if not isinstance(shard_size, int) or shard_size < 1 or shard_size % settings.batch_size:
        raise PairsError(
            f"shard_size must be a positive multiple of batch_size {settings.batch_size}, got {shard_size!r}"
        )


def _write_shard(folder: pathlib.Path, name: str, tensors: dict[str, torch.Tensor], inverted: bool) -> None:
    """Write one shard atomically; on a failed write (a full disk) an ``OSError`` that counts the pairs of
    the finished shards, which are kept."""
    fmt, what, verb = (INVERTED_FORMAT, "inverted pairs", "invert") if inverted else (FORMAT, "pairs", "generate")
    try:
        atomic_write(folder / name, lambda tmp: save_file(tensors, tmp, metadata={"format": fmt}))
    except OSError as exc:
        kept = len(_covered(pair_shards(folder, inverted=inverted)))
        raise OSError(
            exc.errno,
            f"{exc.strerror or exc}. The {kept} {what} of the finished shards in {folder} are kept: "
            f"free space and run the same command again to {verb} the rest",
        ) from exc


def generate_pairs(
    velocity: VelocityFn,
    conds: Sequence[Cond],
    folder: str | os.PathLike,
    count: int,
    settings: PairSettings,
    uncond: Cond | None = None,
    *,
    shard_size: int = 256,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: Callable[[PairProgress], None] | None = None,
    check_cancel: Callable[[], None] | None = None,
    labels: Sequence[str] | None = None,
    sources: dict[str, Any] | None = None,
) -> PairsSummary:
    """Generate the pairs ``0 .. count - 1`` that ``folder`` does not hold yet.

    Args:
        velocity: the teacher as ``fn(x_sigma, sigma, cond) -> v`` (FM convention; for a Diff2Flow
            model ``Objective.velocity_fn(network, d2f)`` of its objective).
        conds: the network keyword arguments of each prompt (tensors with batch dimension 1); pair
            ``i`` uses ``conds[i % len(conds)]``. ``uncond``: the negative's, required for ``cfg != 1``.
        count: the pairs the folder should hold; ``settings``: what every pair depends on.
        shard_size: pairs per shard file (a multiple of ``settings.batch_size``): the unit that an
            interruption can lose and the unit of work of a process.
        rank, world_size, barrier: this process's place among torchrun processes and a function that
            waits for all of them (``d2f_app.distributed.barrier``); each process takes every
            ``world_size``-th missing shard, and rank 0 writes the manifest.
        progress: called after each batch with a :class:`PairProgress`; ``check_cancel``: called
            before each batch, raises to stop (finished shards are kept).
        labels: the prompts' texts (recorded in the manifest); ``sources``: file paths and other
            details recorded in the manifest but not compared on resume.

    Raises :class:`PairsError` for bad arguments or a folder holding other pairs, and ``OSError``
    when a shard cannot be written (a full disk: the finished shards are kept).
    """
    if not conds:
        raise PairsError("no prompts: give at least one prompt (conditioning) to generate pairs for")
    if not isinstance(count, int) or count < 1:
        raise PairsError(f"count must be a positive integer, got {count!r}")
    _check_guidance_and_shards(settings, uncond, shard_size)
    if labels is not None and len(labels) != len(conds):
        raise PairsError(f"{len(labels)} prompt texts for {len(conds)} conditionings: give one per conditioning")
    folder = pathlib.Path(folder)
    device = torch.device(device)
    labels = list(labels or [])
    flat = _flat_conds(conds, uncond)
    previous = _check_folder(folder, settings, flat, labels) or {}
    inverted = {k: v for k, v in previous.items() if k.startswith("inverted")}  # what invert_pairs recorded
    manifest = {
        "format": INVERTED_FORMAT if inverted.get("inverted") else FORMAT,
        "settings": settings.to_dict(),
        "prompts": len(conds),
        "labels": labels,
        "sources": sources or {},
        **inverted,
    }
    if rank == 0:
        ensure_writable_folder(folder)
        remove_stale_temporaries(folder, _owned)
        if not (folder / CONDS).is_file() or not previous.get("prompts"):
            # a new folder, or one of inverted images alone: the prompts join the negative they were inverted with
            stored = load_file(str(folder / CONDS)) if previous else {}
            keep = {**flat, **{k: v for k, v in stored.items() if k.startswith("uncond/")}}
            atomic_write(folder / CONDS, lambda tmp: save_file(keep, tmp))
    have = _covered(pair_shards(folder)) if folder.is_dir() else set()
    units = _units(count, shard_size, have)
    reused = len(have & set(range(count)))
    if rank == 0:
        _write_manifest(folder, {**manifest, "count": max(int(previous.get("count", 0)), reused)})
    barrier()  # every process planned from the same shards before any writes a new one
    # every process, and every resumed run, samples with the stored conditionings: the pairs do not
    # depend on where (on which device) the prompts were encoded
    conds, uncond = _split_conds(load_file(str(folder / CONDS)), len(conds))
    mine = units[rank::world_size]
    total = sum(stop - start for start, stop in mine)
    done, start_time = 0, time.perf_counter()
    size = settings.batch_size
    for start, stop in mine:
        noise, latents, indices = [], [], []
        for block in range(start // size, (stop - 1) // size + 1):
            if check_cancel is not None:
                check_cancel()
            idx, z, x0 = _generate_block(velocity, conds, uncond, settings, block, device)
            keep = (idx >= start) & (idx < stop)
            indices.append(idx[keep])
            noise.append(z[keep])
            latents.append(x0[keep])
            done += int(keep.sum())
            if progress is not None:
                progress(PairProgress(done, total, time.perf_counter() - start_time, x0[keep]))
        index = torch.cat(indices)
        tensors = {
            "noise": torch.cat(noise).contiguous(),
            "latent": torch.cat(latents).contiguous(),
            "index": index,
            "prompt": index % len(conds),
        }
        _write_shard(folder, f"pairs-{start:09d}-{stop:09d}.safetensors", tensors, inverted=False)
    seconds = time.perf_counter() - start_time
    barrier()  # every shard of this run is written
    held = len(_covered(pair_shards(folder)))
    if rank == 0:
        _write_manifest(folder, {**manifest, "count": held})
    return PairsSummary(folder, held, done, reused, seconds)


# ------------------------------------------------------------------------------ inversion
def _cond_digest(cond: Cond) -> str:
    """A digest of a conditioning's names, dtypes, shapes and values: equal captions share one entry of a shard."""
    digest = hashlib.sha1()
    for name in sorted(cond):
        t = cond[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _inverted_shard(index: torch.Tensor, noise: torch.Tensor, latents: torch.Tensor, conds: list[Cond]) -> dict:
    """The tensors of an inverted shard: each row's caption as an id into the shard's distinct captions."""
    ids: dict[str, int] = {}
    table: dict[str, torch.Tensor] = {}
    caption = []
    for cond in conds:
        key = _cond_digest(cond)
        if key not in ids:
            ids[key] = len(ids)
            table.update({f"cond/{ids[key]}/{k}": v.detach().cpu().contiguous() for k, v in cond.items()})
        caption.append(ids[key])
    return {
        "noise": noise.contiguous(),
        "latent": latents.contiguous(),
        "index": index,
        "caption": torch.tensor(caption, dtype=torch.int64),
        **table,
    }


def _read_inverted_shard(path: pathlib.Path) -> tuple[dict[str, torch.Tensor], list[Cond]]:
    """An inverted shard's tensors and the conditioning of each row (rows of one caption share the dict)."""
    data = load_file(str(path))
    table: dict[int, Cond] = {}
    for key, value in data.items():
        if key.startswith("cond/"):
            _, number, name = key.split("/", 2)
            table.setdefault(int(number), {})[name] = value
    return data, [table[int(c)] for c in data["caption"]]


def _check_same_images(
    folder: pathlib.Path,
    shards: list[tuple[int, int, pathlib.Path]],
    latents: Sequence[torch.Tensor],
    conds: Sequence[Cond],
    labels: Sequence[str],
) -> None:
    """The images (and captions) the folder already inverted are the caller's first ones, in order."""
    for _, _, path in shards:
        data, stored = _read_inverted_shard(path)
        for row, j in enumerate(data["index"].tolist()):
            if j >= len(latents):
                continue  # the caller gives fewer images: the folder keeps the others
            same = tuple(data["latent"][row].shape) == tuple(latents[j].shape) and torch.allclose(
                data["latent"][row], latents[j].detach().float().cpu(), rtol=1e-3, atol=1e-4
            )
            if not (same and _same_tensors(stored[row], conds[j])):
                name = f" ({labels[j]})" if j < len(labels) else ""
                raise PairsError(
                    f"{folder} holds another image or caption as inverted pair {j} than this run's image {j}{name}: "
                    "the images already inverted must come first, in the same order and with the same captions "
                    "(append new images after them), or invert into a new folder"
                )


@torch.no_grad()
def _invert_block(
    velocity: VelocityFn,
    latents: Sequence[torch.Tensor],
    conds: Sequence[Cond],
    uncond: Cond | None,
    settings: PairSettings,
    members: list[int],
    device: torch.device,
) -> torch.Tensor:
    """``z = x_T / sigma_max`` of the images ``members`` [len(members), C, H, W].

    The images whose captions have one shape are inverted together in a network batch of exactly
    ``batch_size`` rows (a short group padded with copies of its first image): every image is computed
    in a batch of one shape whoever shares it, so its bits depend on itself alone."""
    size = settings.batch_size
    groups: dict[tuple, list[int]] = {}
    for j in members:
        groups.setdefault(tuple((k, tuple(v.shape)) for k, v in sorted(conds[j].items())), []).append(j)
    noise: dict[int, torch.Tensor] = {}
    sigmas = settings.sigmas()
    for group in groups.values():
        padded = group + [group[0]] * (size - len(group))
        cond, neg = _batch_conds(conds, uncond if settings.cfg != 1.0 else None, padded, device)
        guided = d2f_core.cfg_velocity(velocity, cond, neg, settings.cfg)
        x0 = torch.stack([latents[j] for j in padded]).float().to(device)
        top = d2f_core.invert(settings.sampler, guided, x0, sigmas).float().cpu()
        for row, j in enumerate(group):
            noise[j] = top[row] / settings.sigma_max
    return torch.stack([noise[j] for j in members])


def invert_pairs(
    velocity: VelocityFn,
    latents: Sequence[torch.Tensor],
    conds: Sequence[Cond],
    folder: str | os.PathLike,
    settings: PairSettings,
    uncond: Cond | None = None,
    *,
    shard_size: int = 256,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: Callable[[PairProgress], None] | None = None,
    check_cancel: Callable[[], None] | None = None,
    labels: Sequence[str] | None = None,
    sources: dict[str, Any] | None = None,
) -> PairsSummary:
    """Invert the images ``latents`` that ``folder`` does not hold yet into inverted pairs.

    Image ``j`` (``latents[j]`` [C, H, W] in the teacher's latent scale, of ``settings.shape``) is run
    from sigma = 0 up to ``sigma_max`` through the teacher's ODE with ``settings``' sampler along its grid
    reversed (``d2f_core.invert``), with CFG on its own caption ``conds[j]`` against ``uncond``; the pair is
    ``(x_T / sigma_max, latents[j])``: the noise from which the teacher's sampling returns to the image
    (docs/MATH.md section 12), stored in ``inverted-*.safetensors`` shards with the caption.

    Args:
        velocity, settings, uncond, shard_size, device, rank, world_size, barrier, progress,
            check_cancel: as :func:`generate_pairs` (the same settings as the folder's generated pairs).
        conds: each image's network keyword arguments (batch dimension 1): one per image, or one for all.
        labels: a name per image (a cache entry's file), recorded in the manifest and named in errors;
            ``sources``: recorded in the manifest (the cache folder, ...), not compared.

    Appending: the folder's inverted images must be the first of ``latents``, in order, with the same
    captions (checked); the rest are inverted. Raises :class:`PairsError` for bad arguments, a sampler that
    cannot run backwards, or a folder of other pairs; ``OSError`` as :func:`generate_pairs`.
    """
    try:
        d2f_core.check_invertible(settings.sampler)
    except ValueError as exc:
        raise PairsError(str(exc)) from exc
    latents = list(latents)
    if not latents:
        raise PairsError("no images: give at least one latent to invert")
    if len(conds) not in (1, len(latents)):
        raise PairsError(
            f"{len(latents)} images but {len(conds)} captions (conditionings): give one for all images or one per image"
        )
    conds = list(conds) * len(latents) if len(conds) == 1 else list(conds)
    for j, latent in enumerate(latents):
        if tuple(latent.shape) != settings.shape:
            raise PairsError(
                f"image {j} has the latent shape {list(latent.shape)} but the pairs have {list(settings.shape)} "
                "([channels, height / 8, width / 8]): invert images of the pairs' size (one size per pairs folder)"
            )
    _check_guidance_and_shards(settings, uncond, shard_size)
    labels = list(labels or [])
    if labels and len(labels) != len(latents):
        raise PairsError(f"{len(labels)} image names for {len(latents)} images: give one per image")
    folder = pathlib.Path(folder)
    device = torch.device(device)
    flat = _flat_conds([], uncond)
    previous = _check_settings(folder, settings) or {}
    if previous:
        _check_same_conds(folder, flat, "uncond/")
    held = pair_shards(folder, inverted=True) if folder.is_dir() else []
    _check_same_images(folder, held, latents, conds, labels)
    have = _covered(held)
    units = _units(len(latents), shard_size, have)
    reused = len(have & set(range(len(latents))))
    manifest = {
        "settings": settings.to_dict(),
        "prompts": 0,
        "labels": [],
        "sources": {},
        "count": 0,
        **previous,
        # from the first inversion on, a toolkit that reads only the generated pairs' format refuses the folder
        "format": INVERTED_FORMAT,
        "inverted_labels": labels or previous.get("inverted_labels", []),
        "inverted_sources": sources or previous.get("inverted_sources", {}),
    }
    if rank == 0:
        ensure_writable_folder(folder)
        remove_stale_temporaries(folder, _owned)
        if not (folder / CONDS).is_file():
            atomic_write(folder / CONDS, lambda tmp: save_file(flat, tmp))
        _write_manifest(folder, {**manifest, "inverted": max(int(previous.get("inverted", 0)), reused)})
    barrier()  # every process planned from the same shards before any writes a new one
    # the stored negative, as generated pairs use it: the pairs do not depend on where it was encoded
    uncond = {k.split("/", 1)[1]: v for k, v in load_file(str(folder / CONDS)).items() if k.startswith("uncond/")}
    mine = units[rank::world_size]
    total = sum(stop - start for start, stop in mine)
    done, start_time = 0, time.perf_counter()
    size = settings.batch_size
    for start, stop in mine:
        noise = []
        for block in range(start // size, (stop - 1) // size + 1):
            if check_cancel is not None:
                check_cancel()
            members = [j for j in range(block * size, (block + 1) * size) if start <= j < stop]
            noise.append(_invert_block(velocity, latents, conds, uncond or None, settings, members, device))
            done += len(members)
            if progress is not None:
                images = torch.stack([latents[j].float().cpu() for j in members])
                progress(PairProgress(done, total, time.perf_counter() - start_time, images))
        index = torch.arange(start, stop)
        images = torch.stack([latents[j].detach().float().cpu() for j in range(start, stop)])
        tensors = _inverted_shard(index, torch.cat(noise), images, [conds[j] for j in range(start, stop)])
        _write_shard(folder, f"inverted-{start:09d}-{stop:09d}.safetensors", tensors, inverted=True)
    seconds = time.perf_counter() - start_time
    barrier()  # every shard of this run is written
    held_now = len(_covered(pair_shards(folder, inverted=True)))
    if rank == 0:
        _write_manifest(folder, {**manifest, "inverted": held_now})
    return PairsSummary(folder, held_now, done, reused, seconds, inverted=True)


# ------------------------------------------------------------------------------ loading
@dataclass
class Pairs:
    """A loaded pairs folder: ``noise`` and ``latents`` [N, C, H, W] (the teacher's latent scale),
    ``index`` and ``prompt`` [N] in index order, the conditioning of each prompt and the negative's.

    The generated pairs come first, then the inverted images (``inverted`` [N] bool marks them; ``None``
    when the folder holds none), each group in its own index order; an inverted row's ``prompt`` is -1
    and its conditioning is its own caption's, ``captions[k]`` for the k-th inverted row."""

    manifest: dict
    index: torch.Tensor
    prompt: torch.Tensor
    noise: torch.Tensor
    latents: torch.Tensor
    conds: list[Cond]
    uncond: Cond | None
    inverted: torch.Tensor | None = None
    captions: list[Cond] = field(default_factory=list)

    @property
    def inverted_count(self) -> int:
        return 0 if self.inverted is None else int(self.inverted.sum())

    @property
    def generated_count(self) -> int:
        return len(self.index) - self.inverted_count

    @property
    def settings(self) -> dict[str, Any]:
        return {**SETTINGS_BEFORE_THE_GRID, **self.manifest["settings"]}

    def line_noise(self, sigma_max: float | None = None) -> torch.Tensor:
        """The noise end of each pair's straight line for a model that starts sampling at ``sigma_max``
        (default: the teacher's own, as the pairs were run): the FM line ``(1 - sigma) x0 + sigma * n``
        through that start ``sigma_max * z`` and through ``x0`` at 0 (docs/MATH.md section 12,
        ``d2f_core.reflow_line_noise``). Training forms it from the student's own ``sigma_max``."""
        start = float(self.settings["sigma_max"]) if sigma_max is None else sigma_max
        return d2f_core.reflow_line_noise(self.noise, self.latents, start)

    def training_data(self) -> TrainingData:
        """Training data for the ``reflow`` objective: each pair's image as the latent, its prompt's
        conditioning, and the noise ``z`` it was drawn from as the per-sample ``"noise"``. The objective
        forms the line from the student's own start ``sigma_max * z`` (``Objective.draw``), so a student
        whose ``sigma_max`` differs from the teacher's (zero terminal SNR on one side) still learns the
        teacher's map from where it starts itself. Inverted images carry their own caption's conditioning
        and the ``inverted`` mark the training's ``inverted_share`` draws by."""
        generated = self.generated_count
        return TrainingData(
            latents=list(self.latents),
            conds=[self.conds[int(p)] for p in self.prompt[:generated]] + list(self.captions),
            uncond=self.uncond,
            extras=[{"noise": z} for z in self.noise],
            inverted=self.inverted.tolist() if self.inverted_count else None,
        )


def load_pairs(folder: str | os.PathLike) -> Pairs:
    """Every finished pair of ``folder`` (an interrupted run's finished shards included)."""
    folder = pathlib.Path(folder)
    manifest = _read_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        hint = "it does not exist" if not folder.exists() else f"it has no {MANIFEST}"
        raise PairsError(
            f"pairs folder {folder}: {hint}. Generate pairs first: python -m training pairs --checkpoint CKPT "
            f"--prompts PROMPTS.txt --count N --output {folder}"
        )
    shards, inverted_shards = pair_shards(folder), pair_shards(folder, inverted=True)
    if not shards and not inverted_shards:
        raise PairsError(f"pairs folder {folder} holds no finished shard: run the pairs command again to generate them")
    shape = tuple(manifest["settings"]["shape"])
    parts: dict[str, list[torch.Tensor]] = {"index": [], "prompt": [], "noise": [], "latent": []}
    for _, _, path in shards:
        with safe_open(str(path), framework="pt") as f:
            for name in parts:
                parts[name].append(f.get_tensor(name))
    captions: list[Cond] = []
    for _, _, path in inverted_shards:
        data, rows = _read_inverted_shard(path)
        for name in ("index", "noise", "latent"):
            parts[name].append(data[name])
        parts["prompt"].append(torch.full_like(data["index"], -1))
        captions += rows
    empty = {"index": torch.zeros(0, dtype=torch.int64), "prompt": torch.zeros(0, dtype=torch.int64)}
    data = {
        name: torch.cat(values) if values else empty.get(name, torch.zeros(0, *shape)) for name, values in parts.items()
    }
    # generated pairs first, then the inverted images; each in index order
    inverted = data["prompt"] < 0
    order = torch.argsort(data["index"] + inverted * (int(data["index"].max()) + 1), stable=True)
    data = {name: value[order] for name, value in data.items()}
    inverted = inverted[order]
    for part in (~inverted, inverted):
        if (data["index"][part][1:] == data["index"][part][:-1]).any():
            raise PairsError(
                f"pairs folder {folder} holds an index twice (overlapping shards): remove the extra shard files"
            )
    first = len(inverted) - int(inverted.sum())
    captions = [captions[int(k)] for k in (order[first:] - first)] if captions else []
    conds, uncond = _split_conds(load_file(str(folder / CONDS)), int(manifest["prompts"]))
    return Pairs(
        manifest,
        data["index"],
        data["prompt"],
        data["noise"],
        data["latent"],
        conds,
        uncond,
        inverted if captions else None,
        captions,
    )
