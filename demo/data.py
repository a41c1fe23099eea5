"""The demo's data: scikit-learn's bundled 8x8 digits, upsampled to 16x16, in [-1, 1].

``load_digits`` ships with scikit-learn (no download): 1797 grey images of the digits 0-9,
pixel values 0..16. They are upsampled bilinearly to 16x16 and mapped to [-1, 1], one channel,
the "latent" scale the diffusion model works in (there is no VAE at this size).

The fine-tuning *shift*: the diffusion model is pretrained on :data:`PRETRAIN_CLASSES` (0-6)
only and fine-tuned on :data:`FINETUNE_CLASSES` (7-9), digits it has never seen, addressed by
class tokens its (frozen) class encoder never learned, as a new concept is taught to SD.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
PRETRAIN_CLASSES = (0, 1, 2, 3, 4, 5, 6)
FINETUNE_CLASSES = (7, 8, 9)


def load_digits_tensor(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(images [N, 1, size, size] float32 in [-1, 1], labels [N] int64)``."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8 (the digits are 8x8), got {size!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # the demo extra installs it
        raise ImportError("the demo needs scikit-learn for its bundled digits: pip install scikit-learn") from exc
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return (images * 2 - 1).clamp(-1, 1), torch.as_tensor(digits.target, dtype=torch.long)


def select_classes(
    images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and labels whose label is in ``classes``."""
    bad = [c for c in classes if not 0 <= int(c) <= 9]
    if bad or not classes:
        raise ValueError(f"classes must be a non-empty list of digits 0..9, got {list(classes)}")
    mask = torch.isin(labels, torch.as_tensor(list(classes)))
    return images[mask], labels[mask]


def split_halves(x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint random halves of ``x`` (for the data-vs-data floor of a metric)."""
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    half = x.shape[0] // 2
    return x[perm[:half]], x[perm[half : 2 * half]]
