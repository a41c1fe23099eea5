"""Training data: latents with per-sample conditioning (and per-sample tensors such as reflow's
paired noise), and deterministic batch drawing."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
    """

    latents: list[torch.Tensor]
    conds: list[Cond]
    uncond: Cond | list[Cond] | None = None
    extras: list[dict[str, torch.Tensor]] | None = None
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
