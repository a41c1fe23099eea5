"""Sample-quality metrics that need no extra dependency."""

from __future__ import annotations

import torch

__all__ = ["sliced_wasserstein"]


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point clouds of shape [N, D].

    Each of ``projections`` random unit directions (fixed by ``seed``) reduces the clouds to 1-D,
    where W2 is exact by sorting; the result is the root of the mean squared slice distance.
    """
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both have shape [N, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, _ = (x.detach().cpu().double() @ dirs).sort(0)
    py, _ = (y.detach().cpu().double() @ dirs).sort(0)
    return float((px - py).pow(2).mean().sqrt())
