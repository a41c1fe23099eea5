"""A tiny conditional denoiser for objective and sampler tests (random weights, any T)."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class TinyDenoiser(nn.Module):
    """``net(x [B, C, H, W], timestep [B], cond [B, E] | None) -> [B, C, H, W]``."""

    def __init__(self, channels: int = 2, width: int = 16, cond_dim: int = 4) -> None:
        super().__init__()
        self.width = width
        self.t_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(cond_dim, width)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.inp.weight.dtype
        emb = self.t_proj(timestep_embedding(t, self.width).to(dtype))
        if cond is not None:
            emb = emb + self.c_proj(cond.to(dtype))
        h = torch.nn.functional.silu(self.inp(x.to(dtype)) + emb[:, :, None, None])
        h = torch.nn.functional.silu(self.mid(h))
        return self.out(h).to(x.dtype)
