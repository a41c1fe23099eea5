"""The settings of an image-to-depth estimate and their checks, shared by the Depth Estimate node and
``python -m training depth`` (pure: both check their inputs here before any model is loaded).

The estimate itself runs through ComfyUI (``d2f_host.depth_estimate``); docs/MATH.md section 13 has
the ensemble. Time plays no part here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .objectives import get_objective

__all__ = [
    "DEFAULT_DEPTH_STEPS",
    "MAX_STEPS",
    "MAX_ENSEMBLE",
    "MIN_RESOLUTION",
    "LATENT_SCALE",
    "DepthSettings",
    "processing_size",
]

# a model that recommends nothing (a freshly widened one, a stock-loaded one, a Marigold conversion) samples as a
# Diff2Flow depth model: the registry's recommendation for one, the single place that number lives
DEFAULT_DEPTH_STEPS = get_objective("diff2flow").recommended_steps("depth")
MAX_STEPS = 50
MAX_ENSEMBLE = 10
MIN_RESOLUTION = 64
LATENT_SCALE = 8  # pixels per latent pixel of the SD VAEs


@dataclass(frozen=True)
class DepthSettings:
    """What one estimate runs with. ``steps`` 0 means the model's recommended steps (resolved by the
    caller before sampling); ``resolution`` is the long side the model sees, 0 = the image's own size;
    member ``m`` of every image starts from the noise of ``seed + m``."""

    steps: int = 0
    ensemble_size: int = 1
    resolution: int = 0
    seed: int = 0

    def validate(self) -> None:
        """``ValueError`` naming the setting and its range."""
        if not 0 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps must be 0 (the model's recommended) or 1-{MAX_STEPS}, got {self.steps}")
        if not 1 <= self.ensemble_size <= MAX_ENSEMBLE:
            raise ValueError(f"ensemble_size must be 1-{MAX_ENSEMBLE}, got {self.ensemble_size}")
        if self.resolution != 0 and self.resolution < MIN_RESOLUTION:
            raise ValueError(
                f"processing_resolution must be 0 (the image's own size) or at least {MIN_RESOLUTION}, "
                f"got {self.resolution}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def processing_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """``(height, width)`` the model sees: the long side scaled to ``resolution`` (0: kept), the aspect
    ratio kept, both sides rounded to the nearest multiple of 8 (at least 8)."""
    if resolution:
        scale = resolution / max(height, width)
        height, width = height * scale, width * scale
    return (
        max(LATENT_SCALE, int(round(height / LATENT_SCALE)) * LATENT_SCALE),
        max(LATENT_SCALE, int(round(width / LATENT_SCALE)) * LATENT_SCALE),
    )
