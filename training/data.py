"""Training data: latents with per-sample conditioning, and deterministic batch drawing."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

Cond = dict[str, torch.Tensor]


def _signature(latent: torch.Tensor, cond: Cond) -> tuple:
    return (tuple(latent.shape), tuple(sorted((k, tuple(v.shape[1:])) for k, v in cond.items())))


@dataclass
class TrainingData:
    """``latents[i]`` (shape [C, H, W], already in the model's latent scale) with ``conds[i]``
    (network keyword arguments with a batch dimension of 1, e.g. ``{"context": [1, 77, 768]}``).

    ``uncond`` is the empty/negative conditioning used for caption dropout. Samples of different
    shapes (resolution buckets, prompt lengths) are only batched with samples of their own shape.
    """

    latents: list[torch.Tensor]
    conds: list[Cond]
    uncond: Optional[Cond] = None
    buckets: list[list[int]] = field(init=False)

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
        groups: dict[tuple, list[int]] = {}
        for i, (lat, cond) in enumerate(zip(self.latents, self.conds)):
            groups.setdefault(_signature(lat, cond), []).append(i)
        self.buckets = list(groups.values())

    def __len__(self) -> int:
        return len(self.latents)

    def draw_indices(self, batch_size: int, generator: torch.Generator) -> list[int]:
        """``batch_size`` sample indices of one bucket (chosen in proportion to its size);
        without replacement where the bucket is large enough."""
        sizes = torch.tensor([len(b) for b in self.buckets], dtype=torch.float64)
        bucket = self.buckets[int(torch.multinomial(sizes, 1, generator=generator))]
        if batch_size <= len(bucket):
            pick = torch.randperm(len(bucket), generator=generator)[:batch_size]
        else:
            pick = torch.randint(len(bucket), (batch_size,), generator=generator)
        return [bucket[int(i)] for i in pick]

    def batch(self, indices: list[int], dropout: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Cond]:
        """Stack the samples; where ``dropout[j]`` is true, sample j gets ``uncond``."""
        x0 = torch.stack([self.latents[i] for i in indices])
        conds = []
        for j, i in enumerate(indices):
            use_uncond = dropout is not None and bool(dropout[j]) and self.uncond is not None
            conds.append(self.uncond if use_uncond else self.conds[i])
        keys = conds[0].keys()
        return x0, {k: torch.cat([c[k] for c in conds]) for k in keys}
