"""Sample previews while training: images of the model as it is at a step, shared by the node and the CLI.

At step 0 and every ``preview_every`` steps (:meth:`training.engine.Trainer.run` decides when) a
:class:`Previewer` samples one image per prompt with the network being trained: its adapters
applied, and with EMA on the EMA weights swapped in for the time of the preview and the raw ones
restored bit-exactly after (:meth:`Trainer.sampling_weights`). It samples as a model trained with
the objective does (``Objective.velocity_fn``, ``Objective.sampler_sigmas``, the objective's
recommended sampler from ``d2f_core.SAMPLERS``), the same path as ``python -m training sample``
(:func:`sample_latent`): the FM time convention of docs/MATH.md section 1 (sigma = 1 is noise,
the sampler starts at ``x = sigmas[0] * noise``).

Previews never change the training: their noise comes from their own ``torch.Generator`` (prompt
i from seed ``preview_seed + i``), the global RNG state is restored after them, they run under
``no_grad``, and their tensors are released before training continues. A run with previews
therefore trains the same adapter weights, bit for bit, as one without.

This module never imports ComfyUI: the caller hands it the prompts as UNet keyword arguments and a
``decode(latent) -> images`` function ([B, H, W, 3] in [0, 1], ComfyUI's IMAGE layout).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from d2f_core import Objective, cfg_velocity, get_objective, get_sampler

if TYPE_CHECKING:
    from .engine import Trainer

__all__ = [
    "PreviewSettings",
    "Preview",
    "Previewer",
    "sample_latent",
    "image_grid",
    "preview_noise",
    "no_preview_image",
    "save_grid_png",
]

Cond = dict[str, torch.Tensor]
Decode = Callable[[torch.Tensor], torch.Tensor]


def no_preview_image() -> torch.Tensor:
    """The IMAGE a node outputs when previews are off: one black 1x1 image ([1, 1, 1, 3])."""
    return torch.zeros(1, 1, 1, 3)


@dataclass(frozen=True)
class PreviewSettings:
    """How a preview samples: the objective's recommended steps / cfg where the options say 0."""

    every: int
    seed: int
    steps: int
    cfg: float
    width: int
    height: int
    objective: Objective

    @classmethod
    def from_config(cls, config: Any) -> PreviewSettings:
        objective = get_objective(config.objective)
        return cls(
            config.preview_every,
            config.preview_seed,
            config.preview_steps or objective.steps,
            config.preview_cfg or objective.cfg,
            config.preview_width,
            config.preview_height,
            objective,
        )

    def describe(self) -> str:
        return (
            f"{self.objective.sampling_label} ({self.objective.sampler}), {self.steps} steps, cfg {self.cfg:g}, "
            f"seed {self.seed}, {self.width}x{self.height}"
        )


def preview_noise(seed: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """The starting noise [1, C, h, w] of the sample with ``seed``, from its own CPU generator (the
    noise ``python -m training sample`` draws for that seed)."""
    return torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(seed))


def sample_latent(
    velocity: Callable[..., torch.Tensor],
    cond: Cond,
    uncond: Cond | None,
    cfg: float,
    sampler: str,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """One text-to-image sample: ``sampler`` from ``x = sigmas[0] * noise`` along ``sigmas`` with
    classifier-free guidance ``cfg`` (``uncond`` may be ``None`` only at cfg 1). ``velocity(x,
    sigma, cond)`` is an FM velocity function (docs/MATH.md section 1); ``noise`` is on the
    network's device."""
    if cfg != 1.0 and uncond is None:
        raise ValueError(f"cfg {cfg:g} needs an unconditional (negative) prompt; use cfg 1 without one")
    x = float(sigmas[0]) * noise
    return get_sampler(sampler)(cfg_velocity(velocity, cond, uncond, cfg), x, sigmas)


def image_grid(images: torch.Tensor) -> torch.Tensor:
    """Images [B, H, W, 3] as one grid [H', W', 3]: ceil(sqrt(B)) columns, black where a row is short."""
    b, h, w, c = images.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.zeros(rows * h, cols * w, c, dtype=images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    return grid


@dataclass
class Preview:
    """One preview: the ``step`` it shows, its grid [H, W, 3] in [0, 1] (CPU float32) and the
    seconds it took (sampling + decoding)."""

    step: int
    grid: torch.Tensor
    seconds: float


@dataclass
class Previewer:
    """The ``preview`` callback of :meth:`Trainer.run`: samples ``prompts`` (UNet keyword
    arguments per prompt, on the CPU) and hands each grid to ``on_preview``.

    ``uncond`` is the unconditional prompt's keyword arguments (``None``: only cfg 1 works);
    ``decode(latent) -> images`` turns the sampled latents [B, C, h, w] (the model's scale) into
    [B, H, W, 3] images in [0, 1]; ``latent_channels`` is the model's latent channel count.
    """

    settings: PreviewSettings
    prompts: list[Cond]
    uncond: Cond | None
    decode: Decode
    latent_channels: int
    on_preview: Callable[[Preview], None] | None = None
    previews: list[Preview] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("previews need at least one prompt")
        if self.settings.cfg != 1.0 and self.uncond is None:
            raise ValueError(
                f"preview cfg {self.settings.cfg:g} needs a negative (unconditional) prompt: give one, "
                "or set preview_cfg 1"
            )

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.settings.height // 8, self.settings.width // 8)

    def sample(self, trainer: Trainer) -> torch.Tensor:
        """The latents [B, C, h, w] of every prompt, sampled with ``trainer``'s network as it is now
        (EMA weights when EMA is on), on the CPU in float32."""
        s = self.settings
        device = trainer.device
        sigmas = s.objective.sampler_sigmas(trainer.d2f, s.steps)
        velocity = s.objective.velocity_fn(lambda x, t, c: trainer.network(x, t, **c), trainer.d2f)
        on = lambda kw: {k: v.to(device) for k, v in kw.items()}  # noqa: E731
        uncond = on(self.uncond) if self.uncond is not None else None
        latents = []
        with trainer.sampling_weights(), trainer.autocast(), torch.no_grad():
            for i, prompt in enumerate(self.prompts):
                noise = preview_noise(s.seed + i, self.latent_shape).to(device)
                latent = sample_latent(velocity, on(prompt), uncond, s.cfg, s.objective.sampler, sigmas, noise)
                latents.append(latent.float().cpu())
        return torch.cat(latents)

    def __call__(self, trainer: Trainer) -> Preview:
        start = time.perf_counter()
        # the global RNG is restored whatever the network does with it (dropout, a custom layer):
        # the training's own draws all come from trainer.generator, which previews never touch
        devices = [torch.cuda.current_device()] if trainer.device.type == "cuda" else []
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            latents = self.sample(trainer)
            with torch.no_grad():
                images = self.decode(latents).float().cpu().clamp(0, 1)
        preview = Preview(trainer.step, image_grid(images), time.perf_counter() - start)
        del latents, images
        if trainer.device.type == "cuda":
            torch.cuda.empty_cache()  # the sampling activations, before training allocates again
        self.previews.append(preview)
        if self.on_preview is not None:
            self.on_preview(preview)
        return preview

    def grids(self) -> torch.Tensor:
        """Every preview's grid as an IMAGE batch [N, H, W, 3] (:func:`no_preview_image` when none)."""
        return torch.stack([p.grid for p in self.previews]) if self.previews else no_preview_image()


def save_grid_png(path: Any, grid: torch.Tensor, parameters: str) -> Any:
    """A grid [H, W, 3] in [0, 1] as an 8-bit PNG (atomic write) with ``parameters`` as its text."""
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from .files import atomic_write

    pixels = (grid.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    info = PngInfo()
    info.add_text("parameters", parameters)
    return atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG", pnginfo=info))
