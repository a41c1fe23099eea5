"""Options: one dataclass for the training node, the CLI and the training state (:class:`TrainConfig`),
and one for reflow pair generation (:class:`PairsConfig`).

Every field carries its own help text, choices, range and UI step (``dataclasses.field``
metadata, read through :func:`option_specs`); the Train Diff2Flow LoRA node builds its inputs and
``python -m training train`` / ``pairs`` their flags from them, so an option is declared once, here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from d2f_core import FM_GRIDS, LOSSES, OBJECTIVES, SAMPLERS, TIMESTEP_SAMPLERS
from d2f_core.lora import ALGORITHMS, TARGETS
from d2f_core.losses import check_loss

from .optimizers import OPTIMIZERS, available_optimizers

LR_SCHEDULES = ("constant", "cosine", "linear")
# the loss option's first choice: each objective's own recommendation (d2f_core.Objective.recommended_loss)
RECOMMENDED_LOSS = "recommended"
LOSS_CHOICES = {
    RECOMMENDED_LOSS: "the objective's recommended loss ("
    + ", ".join(f"{name} {o.recommended_loss}" for name, o in OBJECTIVES.items())
    + ")",
    **LOSSES,
}
# the grid_share option's value for each objective's own recommendation (d2f_core.Objective.recommended_grid_share)
RECOMMENDED_SHARE = -1.0
DTYPES = ("bf16", "fp16", "fp32")

# what a training state saved before an option existed trained with, where that is not the option's default
SAVED_BEFORE_THE_OPTION = {"loss": "mse", "grid_share": 0.0}
# options that change the trajectory of a run: a resume must match them exactly
TRAJECTORY_FIELDS = (
    "objective",
    "batch_size",
    "grad_accumulation",
    "learning_rate",
    "lr_schedule",
    "warmup_steps",
    "optimizer",
    "weight_decay",
    "rank",
    "alpha",
    "algorithm",
    "targets",
    "timestep_sampling",
    "logit_mean",
    "logit_std",
    "shift",
    "zero_terminal_snr",
    "dtype",
    "seed",
    "caption_dropout",
    "steps",
    # which samples are held out of the training data
    "validation_split",
    # not the raw weights' trajectory, but the EMA's: a resumed average must continue the same average
    "ema_decay",
    "ema_warmup",
    # how each sample's residual becomes its loss
    "loss",
    "huber_c",
    # which reflow pairs every batch is drawn from
    "inverted_share",
    "grid_share",
)


def described(choices: dict[str, str]) -> str:
    """A registry's choices as an option's help lists them: ``"name: description; name: description"``."""
    return "; ".join(f"{name}: {description}" for name, description in choices.items())


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[str] | None = None,
    min: float | None = None,
    max: float | None = None,
    step: float | None = None,
) -> Any:
    """A TrainConfig field with the metadata the node inputs and CLI flags are generated from."""
    meta = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "min": min,
        "max": max,
        "step": step,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """One training option as the node and the CLI see it."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None
    min: float | None
    max: float | None
    step: float | None


@dataclass
class TrainConfig:
    """Every option of a Diff2Flow LoRA training run (docs/MATH.md section 6 for the objectives)."""

    objective: str = option(
        "diff2flow", "; ".join(f"{o.name}: {o.description}" for o in OBJECTIVES.values()), choices=tuple(OBJECTIVES)
    )
    steps: int = option(500, "Optimizer steps in total (a resumed run continues to this many).", min=1, max=1_000_000)
    batch_size: int = option(
        1, "Latents per micro-batch: the global batch, split evenly over torchrun processes.", min=1, max=256
    )
    grad_accumulation: int = option(
        1, "Micro-batches per optimizer step (effective batch = batch_size x this).", min=1, max=1024
    )
    learning_rate: float = option(1e-4, "Peak learning rate.", min=1e-7, max=1.0, step=1e-6)
    lr_schedule: str = option(
        "constant", "Decay after warmup: constant, cosine to 0, or linear to 0.", choices=LR_SCHEDULES
    )
    warmup_steps: int = option(0, "Linear warmup steps.", min=0, max=1_000_000)
    optimizer: str = option(
        "AdamW",
        "; ".join(f"{o.name}: {o.description}" for o in OPTIMIZERS.values())
        + ". A choice whose package is missing is hidden (the node) or refused with the install "
        "command (the CLI).",
        choices=tuple(OPTIMIZERS),
    )
    weight_decay: float = option(0.01, "Weight decay (every optimizer but Adam).", min=0.0, max=1.0, step=0.001)
    rank: int = option(
        8,
        "Adapter rank (LoKr: the factor the weight's sides are split around; OFT: the block "
        "size it is chosen around, as ComfyUI's trainer).",
        min=1,
        max=512,
    )
    alpha: float = option(
        8.0,
        "Adapter alpha: LoRA / LoHa / DoRA updates are scaled by alpha / rank; OFT: the bound "
        "on the rotation's norm; LoKr: unused.",
        min=0.01,
        max=1024.0,
        step=0.01,
    )
    algorithm: str = option(
        "LoRA",
        described({name: cls.description for name, cls in ALGORITHMS.items()})
        + ". Every one saves a file stock LoraLoader loads.",
        choices=tuple(ALGORITHMS),
    )
    targets: str = option(
        "attention",
        "attention: q/k/v/out projections; attention_ff: plus feed-forward; all: every linear and convolution.",
        choices=tuple(TARGETS),
    )
    timestep_sampling: str = option(
        "uniform",
        "How training sigmas are drawn: " + described(TIMESTEP_SAMPLERS) + ".",
        choices=tuple(TIMESTEP_SAMPLERS),
    )
    logit_mean: float = option(0.0, "Mean of logit_normal timestep sampling.", min=-10.0, max=10.0, step=0.01)
    logit_std: float = option(
        1.0, "Standard deviation of logit_normal timestep sampling.", min=0.01, max=10.0, step=0.01
    )
    shift: float = option(
        3.0, "Shift of the shift timestep sampling (> 1: more high-noise steps).", min=0.01, max=100.0, step=0.01
    )
    zero_terminal_snr: bool = option(
        False,
        "Train with zero terminal SNR so the model learns pure noise (v-prediction "
        "only; a model whose schedule already has it is not rescaled again).",
    )
    dtype: str = option(
        "fp32",
        "Autocast dtype: bf16 (recommended on GPUs), fp16 with loss scaling, or fp32. Adapter weights stay fp32.",
        choices=DTYPES,
    )
    gradient_checkpointing: bool = option(
        False, "Recompute activations in the backward pass: much less memory, about 30 % slower."
    )
    seed: int = option(
        0,
        "Seed of adapter initialisation, batches, noise and timesteps (fixed: a resumed run must use the same).",
        min=0,
        max=0xFFFFFFFFFFFFFFFF,
    )
    caption_dropout: float = option(
        0.0,
        "Probability of training a sample on the empty / negative caption instead "
        "of its own (keeps classifier-free guidance working).",
        min=0.0,
        max=0.99,
        step=0.01,
    )
    ema_decay: float = option(
        0.0,
        "Keep an exponential moving average (EMA) of the adapter weights with this decay "
        "(0: off; 0.999 as the reference Diff2Flow configs). With EMA on, every saved LoRA and the "
        "LoRA / MODEL outputs are the EMA weights.",
        min=0.0,
        max=0.99999,
        step=0.0001,
    )
    ema_warmup: bool = option(
        True,
        "Ramp the EMA decay up over the first steps: optimizer step t averages with "
        "min(ema_decay, (1 + t) / (10 + t)) (LDM's LitEma), so the average does not cling to the "
        "initial weights; off: ema_decay from step 1.",
    )
    save_every: int = option(
        0, "Save the LoRA and the training state every N steps (0: only at the end).", min=0, max=1_000_000
    )
    keep_last: int = option(
        0,
        "Keep only the last N periodic saves of this run, deleting older ones after each save "
        "(0: keep all). The save the training state belongs to is never deleted.",
        min=0,
        max=1_000_000,
    )
    save_raw: bool = option(
        False,
        "With EMA on, also save the raw (non-averaged) weights next to every LoRA as "
        "<name>_raw.safetensors / <name>_<step>_raw.safetensors.",
    )
    preview_every: int = option(
        0,
        "Sample preview images with the model as it is (adapters applied; the EMA weights "
        "when EMA is on) at step 0 and every N steps (0: no previews). Previews use their own "
        "random generator: they never change the training.",
        min=0,
        max=1_000_000,
    )
    preview_seed: int = option(
        0,
        "Seed of the previews' noise: prompt i starts from the noise of seed + i (as `python -m training sample`).",
        min=0,
        max=0xFFFFFFFFFFFFFFFF,
    )
    preview_steps: int = option(
        0,
        "Sampler steps of a preview (0: the objective's recommended steps: "
        + ", ".join(f"{name} {o.steps}" for name, o in OBJECTIVES.items())
        + ").",
        min=0,
        max=1000,
    )
    preview_cfg: float = option(
        0.0,
        "Classifier-free guidance of a preview (0: the objective's recommended cfg: "
        + ", ".join(f"{name} {o.cfg:g}" for name, o in OBJECTIVES.items())
        + ").",
        min=0.0,
        max=100.0,
        step=0.1,
    )
    preview_width: int = option(512, "Preview width in pixels (a multiple of 8).", min=64, max=8192, step=8)
    preview_height: int = option(512, "Preview height in pixels (a multiple of 8).", min=64, max=8192, step=8)
    # after the previews' widgets: the node's widgets are these fields in order and saved workflows store
    # widget values by position, so an option the node gained later comes last
    validation_split: float = option(
        0.0,
        "Hold out this fraction of the training samples (at least one) for the validation loss; the same "
        "samples on every run over the same data. 0: none (or give separate validation data instead).",
        min=0.0,
        max=0.9,
        step=0.01,
    )
    validation_every: int = option(
        0,
        "Compute the validation loss at step 0, every N steps and at the last step (0: never): the "
        "objective's loss on the held-out samples at fixed noise and times (the same draws every time, so "
        "curves compare between runs and resumes), with the saved weights. It never changes the training.",
        min=0,
        max=1_000_000,
    )
    # after the validation options, for the same reason
    loss: str = option(
        RECOMMENDED_LOSS,
        "How every objective turns its prediction's residual into each sample's loss: "
        + described(LOSS_CHOICES)
        + ". The loss values (and the validation loss) are on the chosen loss's scale.",
        choices=tuple(LOSS_CHOICES),
    )
    huber_c: float = option(
        0.0,
        "c of loss pseudo_huber, sqrt(|r|^2 + c^2) - c with r the residual of one sample's C*H*W latent values: "
        "it is |r|^2 / (2c) well below c and |r| - c well above. 0: the paper's c = 0.00054 * sqrt(C*H*W) (0.069 for a 4x64x64 "
        "SD latent, 0.14 for 4x128x128 SDXL; Lee, Lin, Fanti 2024, after Song and Dhariwal 2024). Only with loss "
        "pseudo_huber.",
        min=0.0,
        max=1000.0,
        step=0.001,
    )
    # after the loss options, for the same reason
    inverted_share: float = option(
        0.0,
        "Share of every batch drawn from the reflow pairs of inverted real images (pairs --invert-cache, or the "
        "latents input of Diff2Flow Reflow Pairs); the rest from the pairs the teacher generated. 0: generated pairs "
        "only (a folder's inverted pairs are left out, with a warning); 1: inverted ones only. Refused when the pairs "
        "hold no pairs of a group it draws from.",
        min=0.0,
        max=1.0,
        step=0.01,
    )
    # last, so saved workflows keep their widget values in place
    grid_share: float = option(
        RECOMMENDED_SHARE,
        "Share of the training sigmas placed on the levels the model's recommended sampling evaluates (the nodes "
        "of its FM Euler grid at the objective's recommended steps; reflow's 2 steps: sigma_max and sigma_max / 2), "
        "the rest drawn by timestep_sampling. -1: the objective's recommended share ("
        + ", ".join(f"{name} {o.recommended_grid_share:g}" for name, o in OBJECTIVES.items())
        + "); 0: none.",
        min=-1.0,
        max=1.0,
        step=0.05,
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for spec in option_specs():
            value = getattr(self, spec.name)
            if spec.choices is not None and value not in spec.choices:
                raise ValueError(f"{spec.name}={value!r} is not supported: choose one of {', '.join(spec.choices)}")
        positive = ("steps", "batch_size", "grad_accumulation", "rank")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in (
            "warmup_steps",
            "save_every",
            "keep_last",
            "seed",
            "preview_every",
            "preview_seed",
            "preview_steps",
            "validation_every",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must lie in [0, 1), got {self.caption_dropout}")
        if not 0 <= self.validation_split <= 0.9:
            raise ValueError(
                f"validation_split must lie in [0, 0.9] (a fraction of the samples), got {self.validation_split}"
            )
        if self.validation_split > 0 and self.validation_every == 0:
            raise ValueError(
                f"validation_split {self.validation_split:g} holds samples out of training, but validation_every is 0 "
                "(never evaluated): set validation_every N, or validation_split 0"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1) (0: no EMA; 0.999 is typical), got {self.ema_decay}")
        for name in ("preview_width", "preview_height"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 64 or value % 8:
                raise ValueError(f"{name} must be a multiple of 8 and at least 64, got {value!r}")
        if self.preview_cfg < 0:
            raise ValueError(f"preview_cfg must be >= 0 (0: the objective's recommended cfg), got {self.preview_cfg}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.loss == RECOMMENDED_LOSS and self.huber_c > 0 and self.resolved_loss != "pseudo_huber":
            raise ValueError(
                f"huber_c {self.huber_c:g} is the c of loss pseudo_huber, but loss {RECOMMENDED_LOSS} is "
                f"{self.resolved_loss} for objective {self.objective}: set loss pseudo_huber, or huber_c 0"
            )
        check_loss(self.resolved_loss, self.huber_c)
        if not 0 <= self.inverted_share <= 1:
            raise ValueError(f"inverted_share must lie in [0, 1] (a share of every batch), got {self.inverted_share}")
        if self.grid_share != RECOMMENDED_SHARE and not 0 <= self.grid_share <= 1:
            raise ValueError(
                f"grid_share must lie in [0, 1] (a share of the training sigmas), or be {RECOMMENDED_SHARE:g} (the "
                f"objective's recommended share), got {self.grid_share}"
            )
        if self.resolved_grid_share > 0 and OBJECTIVES[self.objective].times != "sigma":
            raise ValueError(
                f"grid_share {self.grid_share:g} places training sigmas on the FM sampling grid, but objective "
                f"{self.objective} trains on integer diffusion timesteps: set grid_share 0"
            )
        if OPTIMIZERS[self.optimizer].schedule_free and self.lr_schedule != "constant":
            raise ValueError(
                f"optimizer {self.optimizer} replaces the learning-rate schedule: set lr_schedule constant "
                f"(warmup_steps still apply), or choose another optimizer for lr_schedule {self.lr_schedule}"
            )

    def timestep_options(self) -> dict[str, Any]:
        """The keyword arguments of ``d2f_core.Objective.draw`` that select the timestep sampling."""
        return {
            "timestep_sampling": self.timestep_sampling,
            "logit_mean": self.logit_mean,
            "logit_std": self.logit_std,
            "shift": self.shift,
            "grid_share": self.resolved_grid_share,
        }

    @property
    def resolved_loss(self) -> str:
        """The per-sample loss the run trains with: ``loss``, or the objective's recommended loss for
        ``loss = "recommended"``."""
        return OBJECTIVES[self.objective].recommended_loss if self.loss == RECOMMENDED_LOSS else self.loss

    @property
    def resolved_grid_share(self) -> float:
        """The share of the training sigmas on the sampling grid: ``grid_share``, or the objective's recommended
        share for ``grid_share = -1``."""
        if self.grid_share == RECOMMENDED_SHARE:
            return OBJECTIVES[self.objective].recommended_grid_share
        return self.grid_share

    def loss_options(self) -> dict[str, Any]:
        """The keyword arguments of an objective's loss (``d2f_core.Objective.loss``) that select each
        sample's loss: ``loss`` (resolved) and ``huber_c``."""
        return {"loss": self.resolved_loss, "huber_c": self.huber_c}

    def differences(self, other: TrainConfig) -> dict[str, tuple]:
        ignored = {"steps"}
        if self.ema_decay == other.ema_decay == 0:
            ignored.add("ema_warmup")  # no EMA on either side: its warmup changes nothing
        return {
            k: (other._as_trained(k), self._as_trained(k))
            for k in TRAJECTORY_FIELDS
            if k not in ignored and self._as_trained(k) != other._as_trained(k)
        }

    def _as_trained(self, name: str) -> Any:
        # "recommended" and the value it names train the same run
        if name == "loss":
            return self.resolved_loss
        if name == "grid_share":
            return self.resolved_grid_share
        return getattr(self, name)

    def resume_mismatch(self, saved: TrainConfig) -> str:
        """What differs from the options a training state was ``saved`` under ("" if it can continue)."""
        return ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in self.differences(saved).items())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training options: {', '.join(unknown)}")
        return cls(**{**SAVED_BEFORE_THE_OPTION, **data})


def available_choices(spec: OptionSpec) -> tuple[str, ...]:
    """The choices of an option that this installation can run (optimizers whose package is missing
    are left out: training/optimizers.py)."""
    choices = tuple(spec.choices or ())
    if choices == tuple(OPTIMIZERS):
        return available_optimizers()
    return choices


@dataclass
class PairsConfig:
    """Every option of reflow pair generation (training/pairs.py) but the files: the teacher's ODE
    solve, the per-index seed, the size and how the work is batched and sharded.

    The Diff2Flow Reflow Pairs node's widgets are these fields in this order (saved workflows store
    widget values by position): add a field at the end, never in between.
    """

    # 1000, not a quicker 256: the pairs are the student's whole training set, and a run stopped early
    # loses nothing (Cancel / Ctrl-C keep every finished shard; a rerun appends the rest)
    count: int = option(
        1000,
        "Pairs the folder should hold: a rerun with a larger count generates only the missing ones. 0: none "
        "generated, only images inverted (the node's latents input; the CLI's --invert-cache without --prompts).",
        min=0,
        max=100_000_000,
    )
    width: int = option(512, "Image width in pixels (a multiple of 8).", min=64, max=8192, step=8)
    height: int = option(512, "Image height in pixels (a multiple of 8).", min=64, max=8192, step=8)
    # 10 ab2 steps on the sigma_min grid, not the earlier 32 Euler ones: as close to the teacher's exact ODE at a
    # third of the network evaluations (benchmarks/results/pair_accuracy.md: demo model at cfg 1 and 5, exact
    # Gaussian mixture); a folder made with an earlier default appends when given its settings (its pairs.toml)
    steps: int = option(
        10,
        "Teacher ODE steps per pair, each costing the sampler's network evaluations (ab2 and euler 1; cfg runs both "
        "branches in one batch). Measured on the demo model at cfg 1 / 5 (RMS distance of the end points from the "
        "exact ODE's): ab2 on grid sigma_min at 10 steps 1.4 / 2.8 %, euler at 32 steps 1.9 / 2.9 %.",
        min=1,
        max=1000,
    )
    # from 0: guidance below 1 (0 = the unconditional teacher) is a valid teacher, as on every KSampler
    cfg: float = option(
        5.0,
        "Classifier-free guidance of the teacher (the student samples at cfg 1: the guidance is built into its pairs).",
        min=0.0,
        max=100.0,
        step=0.1,
    )
    sampler: str = option(
        "ab2",
        "The teacher's FM sampler (ab2 on grid sigma_min: Euler's 32-step accuracy at 10 network evaluations). "
        + "; ".join(f"{s.name}: {s.description}" for s in SAMPLERS.values()),
        choices=tuple(SAMPLERS),
    )
    seed: int = option(
        0, "Seed of the noise: pair i's noise comes from (seed, i) alone.", min=0, max=0xFFFFFFFFFFFFFFFF
    )
    # 8 rather than a lighter 4: a fuller GPU batch, and folders made with 8 keep appending with the default (the
    # pairs depend on it); lower it for SDXL on a small GPU (cfg != 1 doubles the UNet batch)
    batch_size: int = option(
        8,
        "Pairs per network batch (a resume or append must use the same: it decides the last bits of every pair).",
        min=1,
        max=4096,
    )
    shift: float = option(
        1.0, "SD3-style time shift of the teacher's FM sigma grid (1 = uniform).", min=0.01, max=100.0, step=0.01
    )
    shard_size: int = option(
        256,
        "Pairs per shard file, a multiple of batch_size: what an interruption can lose, and "
        "the unit of work of a torchrun process.",
        min=1,
        max=1_000_000,
    )
    lora_strength: float = option(
        1.0,
        "Strength of the teacher's LoRA (k-times reflow: the previous reflow LoRA).",
        min=-10.0,
        max=10.0,
        step=0.01,
    )
    negative: str = option("", "Negative prompt of the guidance (the empty prompt by default).")
    zero_terminal_snr: bool = option(
        False,
        "Sample the teacher with zero terminal SNR (v-prediction only; a teacher "
        "LoRA trained with it turns it on by itself).",
    )
    # sigma_min, not uniform: the uniform grid's last step straddles the teacher's sigma_min, where most of ab2's
    # error at 8-12 steps came from (benchmarks/results/pair_accuracy.md); folders and pairs.toml files from
    # before this option keep the uniform grid they ran
    grid: str = option(
        "sigma_min",
        "The teacher's sigma grid: "
        + described(FM_GRIDS)
        + ". Part of the pairs' identity: a folder made before this option ran uniform (its pairs.toml keeps it).",
        choices=tuple(FM_GRIDS),
    )

    def __post_init__(self) -> None:
        check_ranges(self)
        for name in ("width", "height"):
            if getattr(self, name) % 8:
                raise ValueError(f"{name} must be a multiple of 8, got {getattr(self, name)}")
        if self.shard_size % self.batch_size:
            raise ValueError(f"shard_size {self.shard_size} must be a multiple of batch_size {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


def check_ranges(config: Any) -> None:
    """Every option of ``config`` of its declared type, among its choices and within its range
    (``ValueError`` naming the option)."""
    for spec in option_specs(type(config)):
        value = getattr(config, spec.name)
        if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            setattr(config, spec.name, value)
        if not isinstance(value, spec.type) or (spec.type is int and isinstance(value, bool)):
            raise ValueError(f"{spec.name} must be {spec.type.__name__}, got {value!r}")
        if spec.choices is not None and value not in spec.choices:
            raise ValueError(f"{spec.name}={value!r} is not supported: choose one of {', '.join(spec.choices)}")
        if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
            raise ValueError(f"{spec.name} must lie in [{spec.min:g}, {spec.max:g}], got {value!r}")


def option_specs(cls: type = TrainConfig) -> list[OptionSpec]:
    """Every option of ``cls`` (:class:`TrainConfig` or :class:`PairsConfig`) with its type, default,
    help, choices and range, in field order."""
    specs = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else None
        meta = f.metadata
        specs.append(
            OptionSpec(
                f.name,
                type(default),
                default,
                meta.get("help", f.name),
                meta.get("choices"),
                meta.get("min"),
                meta.get("max"),
                meta.get("step"),
            )
        )
    return specs
