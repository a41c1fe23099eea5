"""Diff2Flow metadata stored in a LoRA's safetensors header.

The header (``safetensors`` ``__metadata__``, string to string) tells a loader how the LoRA
was trained, so the model patch can be configured from it: which objective (a ``naive_fm``
LoRA needs plain flow sampling, ``diff2flow`` and ``diffusion`` LoRAs the Diff2Flow patch),
prediction type and zero terminal SNR, and how the result samples best (a ``reflow`` LoRA: few
steps at cfg 1). Keys carry the prefix ``diff2flow.``.

Compatibility within a format version: every field after the first three is optional (a file
without it parses, the field is ``None``) and keys this version does not know are ignored, so
toolkits of different versions read each other's files of the same format version (a value one does
not know, such as a new task, is refused by name).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

from .alignment import normalize_prediction
from .objectives import OBJECTIVES, get_objective

__all__ = [
    "FORMAT_VERSION",
    "PREFIX",
    "TASKS",
    "DEPTH_NORMALIZATION",
    "LoraMetadata",
    "SamplingDefaults",
    "read_lora_metadata",
]

FORMAT_VERSION = 1
PREFIX = "diff2flow."
# what a model made with the file does: "image" (text-to-image, any LoRA) or "depth" (an image-to-depth model:
# the base widened to take the image latent, d2f_host.depth, and this file's adapters on top)
TASKS = ("image", "depth")
# how a depth model's targets were normalised (d2f_core.depth.normalize_depth): per image, the 2 % / 98 %
# quantiles of the depth to -1 / 1, so its output is depth up to an unknown scale and shift
DEPTH_NORMALIZATION = "affine_q02_q98"


class SamplingDefaults(NamedTuple):
    """How a model samples by default: FM sampler name, steps and CFG scale."""

    sampler: str
    steps: int
    cfg: float


@dataclass(frozen=True)
class LoraMetadata:
    """What a Diff2Flow LoRA file records about its training (all fields but the first three
    are informational).

    ``sampler`` / ``sampling_steps`` / ``sampling_cfg`` are the recommended sampling settings (the
    objective's registry defaults when the LoRA was trained); ``teacher_cfg`` is the guidance scale
    a ``reflow`` LoRA's training pairs were generated with (the student has it built in). ``task``
    is one of :data:`TASKS`; a depth model records its targets' ``normalization``. ``optimizer`` and
    ``learning_rate`` are the training run's (training/optimizers.py names); ``loss`` is its per-sample loss
    (``d2f_core.losses.LOSSES``) and ``huber_c`` that loss's c when it was set (absent: the default c);
    ``inverted_share`` the share of every batch a ``reflow`` LoRA drew from pairs of inverted real images
    (absent: none); ``grid_share`` the share of its training sigmas placed on the nodes of its recommended sampling
    grid (absent: none; ``d2f_core.Objective.draw``); ``base_weight_dtype`` how the base UNet's weights were stored while it trained
    (``fp32``, ``bf16``, ``fp8_e4m3fn``, ...: UNETLoader's names).
    """

    objective: str
    prediction: str
    zero_terminal_snr: bool
    schedule: str = "scaled_linear"
    rank: int | None = None
    alpha: float | None = None
    algorithm: str = "LoRA"
    steps: int | None = None
    base_model_hash: str = ""
    sampler: str | None = None
    sampling_steps: int | None = None
    sampling_cfg: float | None = None
    teacher_cfg: float | None = None
    task: str = "image"
    normalization: str | None = None
    optimizer: str | None = None
    learning_rate: float | None = None
    loss: str | None = None
    huber_c: float | None = None
    inverted_share: float | None = None
    grid_share: float | None = None
    base_weight_dtype: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is unknown: expected one of {', '.join(OBJECTIVES)}")
        object.__setattr__(self, "prediction", normalize_prediction(self.prediction))
        if self.zero_terminal_snr and self.prediction == "eps":
            raise ValueError("zero terminal SNR is only valid for v-prediction (this metadata says eps)")
        if self.task not in TASKS:
            raise ValueError(
                f"task {self.task!r} is unknown: expected one of {', '.join(TASKS)} (update the Diff2Flow toolkit?)"
            )
        if self.sampling_steps is not None and self.sampling_steps < 1:
            raise ValueError(f"sampling_steps must be >= 1, got {self.sampling_steps}")

    def sampling_defaults(self) -> SamplingDefaults:
        """The sampler, steps and cfg to sample this LoRA with: what the file records, and for what
        it does not (the fields are optional) its objective's registry defaults."""
        objective = get_objective(self.objective)
        return SamplingDefaults(
            self.sampler or objective.sampler,
            self.sampling_steps if self.sampling_steps is not None else objective.steps,
            self.sampling_cfg if self.sampling_cfg is not None else objective.cfg,
        )

    def to_header(self) -> dict[str, str]:
        """The ``__metadata__`` entries (strings only, as safetensors requires)."""
        out = {}
        for key, value in asdict(self).items():
            if value is None:
                continue
            out[PREFIX + key] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return out

    @classmethod
    def from_header(cls, header: Mapping[str, str] | None) -> LoraMetadata | None:
        """Parse a safetensors header; ``None`` when it carries no Diff2Flow metadata.

        Raises ``ValueError`` for a newer format version or malformed values, naming the key.
        """
        if not header or PREFIX + "objective" not in header:
            return None
        raw = {k[len(PREFIX) :]: v for k, v in header.items() if k.startswith(PREFIX)}
        version = int(raw.get("format_version", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            raise ValueError(
                f"this LoRA's Diff2Flow metadata has format version {version}, newer than this toolkit "
                f"understands ({FORMAT_VERSION}): update the Diff2Flow toolkit"
            )
        kwargs = {}
        types = {f.name: f.type for f in fields(cls)}
        for key, value in raw.items():
            if key not in types:
                continue  # a key this version does not know (module docstring)
            try:
                if key in ("zero_terminal_snr",):
                    if value not in ("true", "false"):
                        raise ValueError(value)
                    kwargs[key] = value == "true"
                elif key in ("rank", "steps", "sampling_steps", "format_version"):
                    kwargs[key] = int(value)
                elif key in (
                    "alpha",
                    "sampling_cfg",
                    "teacher_cfg",
                    "learning_rate",
                    "huber_c",
                    "inverted_share",
                    "grid_share",
                ):
                    kwargs[key] = float(value)
                else:
                    kwargs[key] = value
            except ValueError as exc:
                raise ValueError(f"malformed Diff2Flow LoRA metadata: {PREFIX}{key} = {value!r}") from exc
        for required in ("prediction", "zero_terminal_snr"):
            if required not in kwargs:
                raise ValueError(f"malformed Diff2Flow LoRA metadata: {PREFIX}{required} is missing")
        return cls(**kwargs)


def read_lora_metadata(path: str | os.PathLike) -> LoraMetadata | None:
    """The Diff2Flow metadata of a .safetensors LoRA (``None`` for other files or plain LoRAs)."""
    if not str(path).lower().endswith(".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return LoraMetadata.from_header(f.metadata())
