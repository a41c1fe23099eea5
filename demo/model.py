"""A tiny class-conditional diffusion UNet, shaped and called like a Stable Diffusion UNet.

``TinyUNet(x [B, 1, 16, 16], timestep [B], context=[B, T, D]) -> eps or v`` (the raw output of a
diffusion model on SD's 1000-step schedule, diffusion time ``tau`` in 0..999). The class label
reaches the network only through cross-attention on ``context`` tokens, as a prompt does in SD;
:class:`ClassEncoder` (frozen during fine-tuning, like SD's text encoder) turns labels into
those tokens, with :data:`NULL_CLASS` as the empty prompt for classifier-free guidance.

Its attention layers carry SD's module names (``attn1`` self-attention, ``attn2``
cross-attention with ``to_q/to_k/to_v/to_out.0``, ``ff.net.0.proj`` / ``ff.net.2``), so
``d2f_core.lora.select_target_modules`` finds them by the same patterns as in a real UNet.

Once converted with ``d2f_core.Diff2Flow`` the model is a flow-matching model in the project's
convention (docs/MATH.md section 1): sigma in [0, 1], ``x_sigma = (1 - sigma) x0 + sigma noise``,
velocity ``noise - x0``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the "empty prompt": caption dropout in training, uncond in CFG


@dataclass(frozen=True)
class UNetConfig:
    """Sizes of the tiny UNet. Images are pixel-unshuffled 2x2 first (16x16x1 -> 8x8x4), so the
    convolutions run at 8x8 and 4x4: a quarter of the cost for the same receptive field."""

    image_size: int = 16
    channels: int = 1
    base: int = 24  # channels at 8x8 (48 at 4x4, where the attention blocks are)
    context_tokens: int = 2
    context_dim: int = 32
    heads: int = 4

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) diffusion timesteps ``t`` of shape [B] (SD's)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(min(8, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention with SD's layer names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``)."""

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.to_q(x).view(b, n, h, d // h).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], h, d // h).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 2) -> None:
        super().__init__()
        # net.0.proj / net.2 as in SD's GEGLU-less FeedForward layout
        self.net = nn.Sequential(_Proj(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Proj(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention on the context tokens, feed-forward (SD's BasicTransformerBlock)."""

    def __init__(self, dim: int, context_dim: int, heads: int) -> None:
        super().__init__()
        self.norm_in = nn.GroupNorm(8, dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads)
        self.attn2 = Attention(dim, context_dim, heads)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        t = self.norm_in(x).flatten(2).transpose(1, 2)
        n1 = self.norm1(t)
        t = t + self.attn1(n1, n1)
        t = t + self.attn2(self.norm2(t), context)
        t = t + self.ff(self.norm3(t))
        return x + t.transpose(1, 2).reshape(b, c, hh, ww)


class ClassEncoder(nn.Module):
    """Class label (0..9, or :data:`NULL_CLASS`) -> ``context`` tokens [B, tokens, dim]."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(NUM_CLASSES + 1, config.context_tokens * config.context_dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.ndim != 1 or ((labels < 0) | (labels > NULL_CLASS)).any():
            raise ValueError(
                f"class labels must be a 1-D tensor of values in 0..{NULL_CLASS} ({NULL_CLASS} = null class)"
            )
        return self.embedding(labels).view(-1, self.config.context_tokens, self.config.context_dim)


class TinyUNet(nn.Module):
    """``net(x, timestep, context) -> raw eps / v output``. ``context`` is required: the UNet knows
    no labels, as in SD; pass the :class:`ClassEncoder` tokens (of :data:`NULL_CLASS` for "no class")."""

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = config
        c, e = config.base, 4 * config.base
        cin = config.channels * 4  # after the 2x2 pixel unshuffle
        self.time_embed = nn.Sequential(nn.Linear(c, e), nn.SiLU(), nn.Linear(e, e))
        self.conv_in = nn.Conv2d(cin, c, 3, padding=1)
        self.down1 = ResBlock(c, c, e)
        self.downsample = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.down2 = ResBlock(2 * c, 2 * c, e)
        self.attn_down = TransformerBlock(2 * c, config.context_dim, config.heads)
        self.up2 = ResBlock(4 * c, 2 * c, e)
        self.attn_up = TransformerBlock(2 * c, config.context_dim, config.heads)
        self.upsample = nn.Conv2d(2 * c, c, 3, padding=1)
        self.up1 = ResBlock(2 * c, c, e)
        self.norm_out = nn.GroupNorm(8, c)
        self.conv_out = nn.Conv2d(c, cin, 3, padding=1)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            raise ValueError(
                "TinyUNet needs context tokens (ClassEncoder output); use the null class for unconditional"
            )
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timestep, self.config.base))
        h0 = self.conv_in(F.pixel_unshuffle(x, 2))
        h1 = self.down1(h0, emb)
        h2 = self.down2(self.downsample(h1), emb)
        h = self.attn_down(h2, context)
        h = self.attn_up(self.up2(torch.cat([h, h2], 1), emb), context)
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up1(torch.cat([h, h1], 1), emb)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), 2)
