"""Training data: latents with per-sample conditioning (and per-sample tensors such as reflow's
paired noise), and deterministic batch drawing."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from d2f_core import OBJECTIVES

if TYPE_CHECKING:
    from .config import TrainConfig

Cond = dict[str, torch.Tensor]


def _signature(latent: torch.Tensor, cond: Cond) -> tuple:
    return (tuple(latent.shape), tuple(sorted((k, tuple(v.shape[1:])) for k, v in cond.items())))


@dataclass
class TrainingData:
    """``latents[i]`` (shape [C, H, W], already in the model's latent scale) with ``conds[i]``
    (network keyword arguments with a batch dimension of 1, e.g. ``{"context": [1, 77, 768]}``).

    ``uncond`` is the empty/negative conditioning used for caption dropout: one for all samples, or
    one per sample (SDXL's ``y`` embeds each sample's own size). ``extras[i]`` holds
    per-sample tensors, without a batch dimension: ``"noise"``, the paired noise of reflow's (noise,
    image) pairs, shaped like the latent, which the objective reads; any other key reaches the network
    as a keyword argument (``"concat"``: an image-conditioned model's clean image latent [C, H, W], in
    the model's latent scale, appended after the noisy input; docs/MATH.md section 13). Samples of different shapes
    (resolution buckets, prompt lengths) are only batched with samples of their own shape.

    ``inverted[i]`` marks reflow pairs made by inverting a real image (training/pairs.py) among pairs the
    teacher generated; ``draw_indices`` mixes the two groups at the share it is given (``None``: no sample
    is inverted).
    """

    latents: list[torch.Tensor]
    conds: list[Cond]
    uncond: Cond | list[Cond] | None = None
    extras: list[dict[str, torch.Tensor]] | None = None
    inverted: list[bool] | None = None
    buckets: list[list[int]] = field(init=False)
    # each bucket's generated and inverted samples (with inverted samples only)
    bucket_groups: list[tuple[list[int], list[int]]] = field(init=False, repr=False)
    # how many samples are inverted real images (reflow pairs; 0 for any other data): counted once, read every draw
    inverted_count: int = field(init=False)

    def __post_init__(self) -> None:
        if len(self.latents) == 0:
            raise ValueError("no training latents: connect at least one latent")
        if len(self.conds) == 1 and len(self.latents) > 1:
            self.conds = self.conds * len(self.latents)
        if len(self.conds) != len(self.latents):
            raise ValueError(
                f"{len(self.latents)} latents but {len(self.conds)} conditionings: give one conditioning for "
                "all latents or exactly one per latent"
            )
        for i, lat in enumerate(self.latents):
            if lat.ndim != 3:
                raise ValueError(f"latent {i} has shape {tuple(lat.shape)}; expected [channels, height, width]")
        if isinstance(self.uncond, list) and len(self.uncond) != len(self.latents):
            raise ValueError(
                f"{len(self.latents)} latents but {len(self.uncond)} unconditional conditionings: give one for "
                "all latents or exactly one per latent"
            )
        if self.extras is not None:
            if len(self.extras) != len(self.latents):
                raise ValueError(
                    f"{len(self.latents)} latents but {len(self.extras)} per-sample extras: give one per latent"
                )
            keys = set(self.extras[0])
            for i, (lat, extra) in enumerate(zip(self.latents, self.extras)):
                if set(extra) != keys:
                    raise ValueError(f"sample {i} carries {sorted(extra)} but sample 0 carries {sorted(keys)}")
                if "noise" in extra and tuple(extra["noise"].shape) != tuple(lat.shape):
                    raise ValueError(
                        f"sample {i}: paired noise of shape {tuple(extra['noise'].shape)} does not match "
                        f"its latent {tuple(lat.shape)}"
                    )
                concat = extra.get("concat")
                if concat is not None and (concat.ndim != 3 or tuple(concat.shape[1:]) != tuple(lat.shape[1:])):
                    raise ValueError(
                        f"sample {i}: its image latent (concat) of shape {tuple(concat.shape)} does not match "
                        f"the size of its latent {tuple(lat.shape)}: encode each image and its target at one size"
                    )
        if self.inverted is not None:
            if len(self.inverted) != len(self.latents):
                raise ValueError(
                    f"{len(self.latents)} latents but {len(self.inverted)} inverted marks: give one per latent"
                )
            self.inverted = [bool(i) for i in self.inverted]
        groups: dict[tuple, list[int]] = {}
        for i, (lat, cond) in enumerate(zip(self.latents, self.conds)):
            groups.setdefault(_signature(lat, cond), []).append(i)
        self.buckets = list(groups.values())
        marks = self.inverted or [False] * len(self.latents)
        self.bucket_groups = [([i for i in b if not marks[i]], [i for i in b if marks[i]]) for b in self.buckets]
        self.inverted_count = sum(marks)

    def __len__(self) -> int:
        return len(self.latents)

    def draw_indices(self, batch_size: int, generator: torch.Generator, inverted_share: float = 0.0) -> list[int]:
        """``batch_size`` sample indices of one bucket (chosen in proportion to its size);
        without replacement where the bucket is large enough.

        Data with inverted samples (``inverted``) is drawn in two groups: ``k`` inverted samples and
        ``batch_size - k`` generated ones, ``k = floor(inverted_share * batch_size + u)`` with ``u`` uniform
        in [0, 1) from ``generator``, so ``k`` averages ``inverted_share * batch_size`` exactly at any batch
        size. The bucket is chosen in proportion to its samples of the groups drawn from; a bucket that
        holds one group only (captions of another token length) gives the whole batch from it. Data
        without inverted samples and share 0 draws as it always did (the same trajectory)."""
        problem = inverted_share_problem(inverted_share, self)
        if problem is not None:
            raise ValueError(f"inverted_share {problem}")
        if not self.inverted_count:
            sizes = torch.tensor([len(b) for b in self.buckets], dtype=torch.float64)
            return _pick(self.buckets[int(torch.multinomial(sizes, 1, generator=generator))], batch_size, generator)
        weights = torch.tensor(
            [len(gen) * (inverted_share < 1) + len(inv) * (inverted_share > 0) for gen, inv in self.bucket_groups],
            dtype=torch.float64,
        )
        generated, inverted = self.bucket_groups[int(torch.multinomial(weights, 1, generator=generator))]
        if 0 < inverted_share < 1:
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            k = min(batch_size, math.floor(inverted_share * batch_size + u))
        else:
            k = batch_size if inverted_share == 1 else 0
        k = 0 if not inverted else batch_size if not generated else k
        return _pick(generated, batch_size - k, generator) + _pick(inverted, k, generator)

    def batch(self, indices: list[int], dropout: torch.Tensor | None = None) -> tuple[torch.Tensor, Cond]:
        """``(x0, cond)`` of the samples, stacked; where ``dropout[j]`` is true, sample j gets ``uncond``."""
        x0 = torch.stack([self.latents[i] for i in indices])
        conds = []
        for j, i in enumerate(indices):
            use_uncond = dropout is not None and bool(dropout[j]) and self.uncond is not None
            uncond = self.uncond[i] if isinstance(self.uncond, list) else self.uncond
            conds.append(uncond if use_uncond else self.conds[i])
        keys = conds[0].keys()
        return x0, {k: torch.cat([c[k] for c in conds]) for k in keys}

    def batch_extras(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The per-sample extras of the samples, stacked (empty when the data carries none)."""
        if self.extras is None:
            return {}
        return {k: torch.stack([self.extras[i][k] for i in indices]) for k in self.extras[0]}


def _pick(members: list[int], count: int, generator: torch.Generator) -> list[int]:
    """``count`` of ``members``: without replacement where there are enough (nothing drawn for 0)."""
    if count == 0:
        return []
    if count <= len(members):
        pick = torch.randperm(len(members), generator=generator)[:count]
    else:
        pick = torch.randint(len(members), (count,), generator=generator)
    return [members[int(i)] for i in pick]


def inverted_share_problem(share: float, data: TrainingData) -> str | None:
    """What is wrong with drawing ``share`` of every batch from ``data``'s inverted samples (the value and
    the reason, for the caller to show under its own name of the option), or ``None``."""
    inverted = data.inverted_count
    if not 0 <= share <= 1:
        return f"{share:g} is not a share: give a value in [0, 1]"
    if share > 0 and not inverted:
        return (
            f"{share:g} draws inverted pairs, but the training data holds none: invert images into the pairs folder "
            "(pairs --invert-cache CACHE, or the latents input of Diff2Flow Reflow Pairs), or set inverted_share 0"
        )
    if share < 1 and inverted == len(data):
        return (
            f"{share:g} draws {1 - share:.0%} of every batch from generated pairs, but the pairs hold inverted images "
            "only: set inverted_share 1, or generate pairs into the folder (pairs --prompts FILE --count N, or the "
            "count of Diff2Flow Reflow Pairs)"
        )
    return None


VALIDATION_SEED = 0  # the held-out samples and the validation draws: the same for every run, whatever its seed


def subset(data: TrainingData, indices: list[int]) -> TrainingData:
    """The samples ``indices`` of ``data`` (with their conditionings, unconditional conditionings and extras)."""
    uncond = [data.uncond[i] for i in indices] if isinstance(data.uncond, list) else data.uncond
    extras = [data.extras[i] for i in indices] if data.extras is not None else None
    inverted = [data.inverted[i] for i in indices] if data.inverted is not None else None
    return TrainingData([data.latents[i] for i in indices], [data.conds[i] for i in indices], uncond, extras, inverted)


def hold_out(data: TrainingData, fraction: float) -> tuple[TrainingData, TrainingData]:
    """``(training, validation)``: ``round(fraction * len(data))`` samples (at least one) held out, chosen by
    a generator of its own (:data:`VALIDATION_SEED`), so every run, process and resume over the same data
    holds out the same ones."""
    count = max(1, round(fraction * len(data)))
    if count >= len(data):
        raise ValueError(
            f"holding out {count} of {len(data)} samples (fraction {fraction:g}) leaves none to train on: lower "
            "validation_split, or give more samples (or separate validation data)"
        )
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(VALIDATION_SEED)).tolist()
    held = sorted(order[:count])
    kept = sorted(order[count:])
    return subset(data, kept), subset(data, held)


def grid_share_problem(config: TrainConfig, task: str) -> tuple[str, str] | None:
    """``("grid_share", reason)`` when the run's share of training sigmas on the sampling grid cannot go with
    its ``task`` (``"image"`` or ``"depth"``), ``None`` when it can: the grid is the objective's image sampling
    grid, so a depth model that samples with other steps would train on levels it never evaluates."""
    objective, share = OBJECTIVES[config.objective], config.resolved_grid_share
    if task != "depth" or share == 0 or objective.recommended_steps("depth") == objective.steps:
        return None
    return (
        "grid_share",
        f"{share:g} places training sigmas on the {objective.steps}-step image sampling grid of objective "
        f"{config.objective}, but a depth model samples with {objective.recommended_steps('depth')} steps: set "
        "grid_share 0",
    )


def validation_problem(config: TrainConfig, separate: bool) -> tuple[str, str] | None:
    """``(option, reason)`` when ``config``'s validation options cannot go with ``separate`` validation data
    (given or not), ``None`` when they can: the split and separate data both, separate data never
    evaluated, or evaluations without samples. Each caller shows the option as its own input (a node input,
    a CLI flag) before it encodes any data."""
    if config.validation_split > 0 and separate:
        return (
            "validation_split",
            f"{config.validation_split:g} holds out training samples, but separate validation data is given too: "
            "use one of them (validation_split 0 to validate on the separate data)",
        )
    if separate and config.validation_every == 0:
        return (
            "validation_every",
            "0, but validation data is given (never evaluated): set validation_every N, or leave the validation "
            "data out",
        )
    if config.validation_every > 0 and config.validation_split == 0 and not separate:
        return (
            "validation_every",
            f"{config.validation_every} needs validation samples: set validation_split (a fraction of the training "
            "samples to hold out) or give separate validation data, or set validation_every 0",
        )
    return None
