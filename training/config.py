"""Training options (one dataclass for the node, the CLI and the training state)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

from d2f_core import OBJECTIVES, TIMESTEP_SAMPLERS
from d2f_core.lora import ALGORITHMS, TARGETS

OPTIMIZERS = ("AdamW", "Adam", "SGD", "AdamW8bit")
LR_SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("bf16", "fp16", "fp32")

# options that change the trajectory of a run: a resume must match them exactly
TRAJECTORY_FIELDS = (
    "objective", "batch_size", "grad_accumulation", "learning_rate", "lr_schedule", "warmup_steps",
    "optimizer", "weight_decay", "rank", "alpha", "algorithm", "targets", "timestep_sampling",
    "logit_mean", "logit_std", "shift", "zero_terminal_snr", "dtype", "seed", "caption_dropout", "steps",
)


@dataclass
class TrainConfig:
    """Every option of a Diff2Flow LoRA training run (MATH.md section 6 for the objectives)."""

    objective: str = "diff2flow"
    steps: int = 500
    batch_size: int = 1
    grad_accumulation: int = 1
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "AdamW"
    weight_decay: float = 0.01
    rank: int = 8
    alpha: float = 8.0
    algorithm: str = "LoRA"
    targets: str = "attention"
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0
    zero_terminal_snr: bool = False
    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 0
    caption_dropout: float = 0.0
    save_every: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        choices = {
            "objective": OBJECTIVES, "lr_schedule": LR_SCHEDULES, "optimizer": OPTIMIZERS,
            "algorithm": tuple(ALGORITHMS), "targets": tuple(TARGETS), "timestep_sampling": TIMESTEP_SAMPLERS,
            "dtype": DTYPES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported: choose one of {', '.join(allowed)}")
        positive = ("steps", "batch_size", "grad_accumulation", "rank")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "save_every", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must lie in [0, 1), got {self.caption_dropout}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")

    def fingerprint(self) -> str:
        """Hash of the options that determine the trajectory (checked on resume)."""
        data = {k: getattr(self, k) for k in TRAJECTORY_FIELDS if k != "steps"}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: "TrainConfig") -> dict[str, tuple]:
        return {k: (getattr(other, k), getattr(self, k)) for k in TRAJECTORY_FIELDS if k != "steps" and getattr(self, k) != getattr(other, k)}

    def resume_mismatch(self, saved: "TrainConfig") -> str:
        """What differs from the options a training state was ``saved`` under ("" if it can continue)."""
        return ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in self.differences(saved).items())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(unknown)}")
        return cls(**data)
