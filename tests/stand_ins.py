"""Stand-ins for a checkpoint's VAE and text encoder in the depth tests: tiny, deterministic, and with
latents that follow the image, so a depth model's image conditioning means something."""

from __future__ import annotations

import torch
from comfy_harness import CONTEXT_DIM


class StandInVae:
    """A VAE whose latent follows the image: encode = 8x8 average pooling of the image in [-1, 1] (4th channel:
    the grey level), decode = nearest upsampling of the first 3 channels back to [0, 1]. Counts its calls."""

    latent_channels = 4

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1) * 2 - 1, 8)
        return torch.cat([x, x.mean(dim=1, keepdim=True)], dim=1)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        x = torch.nn.functional.interpolate(latent[:, :3], scale_factor=8, mode="nearest")
        return ((x + 1) / 2).clamp(0, 1).movedim(1, -1)


class StandInClip:
    """Encodes any text to one fixed conditioning of the tiny models' width."""

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens_scheduled(self, tokens: str) -> list:
        gen = torch.Generator().manual_seed(len(tokens))
        return [[torch.randn(1, 77, CONTEXT_DIM, generator=gen), {}]]
