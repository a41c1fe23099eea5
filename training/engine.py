"""The training loop: fine-tuning of weight adapters under any objective of ``d2f_core.OBJECTIVES``.

Everything random (batch choice, caption dropout, noise, sigma or tau) is drawn from ONE CPU
``torch.Generator`` seeded from the config; it is part of the training state, so ``N`` steps +
resume + ``N`` steps equals ``2N`` straight steps. Noise and times come from the objective's own
``Objective.draw`` (the same draw ``d2f_core.objective_loss`` makes; the data's paired noise when it
carries one) and the loss from its ``Objective.loss`` with the config's ``loss`` / ``huber_c`` (each
sample's loss, ``d2f_core.losses``; docs/MATH.md section 6). Reflow pairs of inverted images are
mixed into every batch at ``inverted_share`` (``TrainingData.draw_indices``, from the same generator).

With ``ema_decay`` > 0 the trainer also keeps an exponential moving average of the adapter weights
(:class:`AdapterEMA`, updated after every optimizer step, part of the training state); the saved
LoRA is then the average (:meth:`Trainer.saved_adapters`).

With validation data and ``validation_every`` > 0 it computes the validation loss
(:meth:`Trainer.validation_loss`) at step 0, every ``validation_every`` steps and at the last step; the
values are part of the training state. Evaluating draws from a generator of its own and restores the
weights bit-exactly, so it never changes the trajectory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from d2f_core import Diff2Flow, get_objective
from d2f_core.lora import WeightAdapter, adapters_state_dict

from .config import TrainConfig
from .data import VALIDATION_SEED, TrainingData, inverted_share_problem
from .optimizers import OPTIMIZERS, build_optimizer

Network = Callable[..., torch.Tensor]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger("diff2flow")


class TrainingError(RuntimeError):
    """A run that cannot continue (non-finite loss, incompatible resume state)."""


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    seconds: float


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the base learning rate after ``step`` optimizer steps: linear warmup, then
    constant, cosine (to 0) or linear (to 0) decay over the remaining steps."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.lr_schedule == "constant":
            return 1.0
        span = max(1, config.steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
        if config.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - progress

    return factor


class AdapterEMA:
    """Exponential moving average of the adapter weights (``torch.optim.swa_utils.AveragedModel``).

    Rule (LDM's ``LitEma``, the reference Diff2Flow configs' EMA): the average starts as the
    initial weights, ``EMA_0 = theta_0``; after optimizer step ``t`` (t = 1, 2, ...)
    ``EMA_t = d_t * EMA_{t-1} + (1 - d_t) * theta_t`` with ``d_t = min(decay, (1 + t) / (10 + t))``
    when ``warmup`` is on and ``d_t = decay`` otherwise. Only parameters are averaged; the adapters'
    constant buffers (``alpha``) are copied. The average lives on the adapters' device.
    """

    def __init__(self, adapters: dict[str, WeightAdapter], decay: float, warmup: bool) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must lie in (0, 1) for an EMA, got {decay}")
        self.decay, self.warmup = decay, warmup
        # a ModuleList, not a ModuleDict: adapter names are module paths, and ModuleDict refuses dots
        self._source = torch.nn.ModuleList(adapters.values())
        self.averaged = AveragedModel(self._source, multi_avg_fn=self._average, use_buffers=False)
        self.averaged.requires_grad_(False)
        self.averaged.update_parameters(self._source)  # the first update copies: EMA_0 = theta_0, n_averaged = 1
        self.adapters: dict[str, WeightAdapter] = dict(zip(adapters, self.averaged.module))

    def decay_at(self, step: int) -> float:
        """``d_t`` of the update after optimizer step ``step`` (t >= 1)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    def _average(self, averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        # n_averaged counts EMA_0, so at the update after step t it equals t; the CPU buffer is read
        # instead of ``num_averaged`` (its copy on the adapters' device) to avoid a device sync
        get_ema_multi_avg_fn(self.decay_at(int(self.averaged.n_averaged)))(averaged, current, num_averaged)

    def update(self) -> None:
        """Average in the adapters' current weights (call once after each optimizer step)."""
        self.averaged.update_parameters(self._source)

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu() for k, v in self.averaged.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)


def check_validation(config: TrainConfig, validation: TrainingData | None, paired_noise: bool) -> None:
    """Refuse validation data that ``config`` would not evaluate, or ``validation_every`` without any."""
    if validation is None and config.validation_every > 0:
        raise ValueError(
            f"validation_every {config.validation_every} needs validation samples: set validation_split (a "
            "fraction of the training samples to hold out) or give separate validation data, or set "
            "validation_every 0"
        )
    if validation is not None and config.validation_every == 0:
        raise ValueError(
            "validation data is given but validation_every is 0 (never evaluated): set validation_every N, or "
            "leave the validation data out"
        )
    if validation is not None and paired_noise and (validation.extras is None or "noise" not in validation.extras[0]):
        raise ValueError(
            f"objective {config.objective!r} trains on (noise, image) pairs, but the validation data carries no "
            "paired noise: hold out part of the pairs with validation_split instead"
        )


class Trainer:
    """Optimises ``adapters`` (already attached to ``network``) under ``config.objective``.

    Args:
        network: ``network(x_in, timestep, **cond) -> raw output`` with the adapters in its weights.
        adapters: the trainable adapters by module name (their parameters are optimised).
        d2f: the alignment of the base model's schedule and prediction type.
        config: the run's options. data: the training samples.
        device: where the batches go (the network's device).
        rank, world_size: data-parallel position (torchrun). Every process draws the same global
            batch, noise and times from the shared generator and trains its shard; gradients and
            losses are averaged across processes, so N processes give the 1-process result.
        validation: the held-out samples of the validation loss (``config.validation_every`` > 0).
    """

    def __init__(
        self,
        network: Network,
        adapters: dict[str, WeightAdapter],
        d2f: Diff2Flow,
        config: TrainConfig,
        data: TrainingData,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        validation: TrainingData | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} does not fit world_size {world_size}")
        if config.batch_size % world_size:
            raise ValueError(
                f"batch_size {config.batch_size} (the global batch) must be divisible by the number of processes "
                f"({world_size}): each process trains an equal shard of every batch"
            )
        if config.zero_terminal_snr and not d2f.zero_terminal_snr:
            raise ValueError("config.zero_terminal_snr is set but the alignment's schedule has no zero terminal SNR")
        self.network, self.adapters, self.d2f, self.config, self.data = network, adapters, d2f, config, data
        self.objective = get_objective(config.objective)
        if self.objective.paired_noise and (data.extras is None or "noise" not in data.extras[0]):
            raise ValueError(
                f"objective {config.objective!r} trains on (noise, image) pairs, but the training data carries no "
                "paired noise: train it on a pairs folder generated from the teacher model"
            )
        check_validation(config, validation, self.objective.paired_noise)
        mix = inverted_share_problem(config.inverted_share, data)
        if mix is not None:
            raise ValueError(f"inverted_share {mix}")
        if data.inverted_count and config.inverted_share == 0:
            log.warning(
                "the training data holds %d pairs of inverted images, which inverted_share 0 leaves out: set "
                "inverted_share (the share of every batch they make up) to train on them",
                data.inverted_count,
            )
        self.validation = validation
        self.device = torch.device(device)
        self.rank, self.world_size = rank, world_size
        self.params = [p for a in adapters.values() for p in a.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("there is nothing to train: no adapter parameters")
        self.optimizer = build_optimizer(config.optimizer, self.params, config.learning_rate, config.weight_decay)
        self.schedule_free = OPTIMIZERS[config.optimizer].schedule_free
        if self.schedule_free:
            self.optimizer.train()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.dtype == "fp16")
        if config.dtype == "fp16" and self.device.type == "cpu":
            log.warning(
                "dtype fp16 on the CPU is emulated and several times slower than fp32 (measured 4-5x): "
                "train in fp32 (or bf16) on the CPU; fp16 pays off on GPUs"
            )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.ema = AdapterEMA(adapters, config.ema_decay, config.ema_warmup) if config.ema_decay > 0 else None
        self.step = 0
        self.losses: list[float] = []
        self.validation_losses: list[tuple[int, float]] = []  # (step, loss) of every evaluation

    # ------------------------------------------------------------------ weights
    def saved_adapters(self) -> dict[str, WeightAdapter]:
        """The adapters a saved LoRA holds: the EMA's when EMA is on, the trained ones otherwise (with a
        schedule-free optimizer their saved weights are the evaluation ones: :meth:`lora_state_dict`)."""
        return self.ema.adapters if self.ema is not None else self.adapters

    @property
    def saves_raw(self) -> bool:
        """Whether the raw weights are saved next to the LoRA (``save_raw`` with EMA on; without EMA
        the LoRA already is the raw weights)."""
        return self.ema is not None and self.config.save_raw

    def lora_state_dict(self, raw: bool = False) -> dict[str, torch.Tensor]:
        """ComfyUI-native LoRA tensors of :meth:`saved_adapters` (``raw``: of the trained adapters, as
        :meth:`evaluation_weights` gives them)."""
        if raw or self.ema is None:
            with self.evaluation_weights():
                return {k: v.detach().clone() for k, v in adapters_state_dict(self.adapters).items()}
        return adapters_state_dict(self.ema.adapters)

    @contextlib.contextmanager
    def evaluation_weights(self) -> Iterator[None]:
        """The trained adapters with the weights a schedule-free optimizer evaluates (its ``eval()``
        sequence) for the time of the block; the training weights are copied back after, bit-exactly,
        so saving, previewing or averaging never changes the trajectory. Other optimizers: unchanged."""
        if not self.schedule_free:
            yield
            return
        training = [p.detach().clone() for p in self.params]
        self.optimizer.eval()
        try:
            yield
        finally:
            self.optimizer.train()
            with torch.no_grad():
                for p, t in zip(self.params, training):
                    p.copy_(t)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The mixed precision of ``config.dtype`` on the trainer's device (training and previews)."""
        dtype = AUTOCAST_DTYPES.get(self.config.dtype)
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def sampling_weights(self) -> Iterator[None]:
        """The network with :meth:`saved_adapters`' weights for the time of the block: with EMA on,
        the EMA parameters are copied into the trained adapters (the ones the network uses) and the
        raw ones copied back after, bit-exactly, whatever happens in the block; without EMA nothing
        changes. Previews sample under it."""
        if self.ema is None:
            with self.evaluation_weights():
                yield
            return
        weights = [p for adapter in self.adapters.values() for p in adapter.parameters()]
        raw = [p.detach().clone() for p in weights]
        try:
            with torch.no_grad():
                for adapter, averaged in zip(self.adapters.values(), self.ema.adapters.values()):
                    for p, a in zip(adapter.parameters(), averaged.parameters()):
                        p.copy_(a)
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(weights, raw):
                    p.copy_(r)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = {
            "format": "diff2flow-training-state/1",
            "step": self.step,
            "losses": list(self.losses),
            "validation_losses": [list(v) for v in self.validation_losses],
            "config": self.config.to_dict(),
            "adapters": {
                name: {k: v.detach().cpu() for k, v in a.state_dict().items()} for name, a in self.adapters.items()
            },
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "generator": self.generator.get_state(),
        }
        if self.ema is not None:  # only with EMA: no "ema" marks an EMA-off run (load_state_dict refuses it under EMA)
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved run; refuses a state written under different trajectory options."""
        saved = TrainConfig.from_dict(state["config"])
        listed = self.config.resume_mismatch(saved)
        if listed:
            raise TrainingError(
                f"the resume state comes from a different configuration ({listed}); use the saved settings or start a new run"
            )
        if set(state["adapters"]) != set(self.adapters):
            raise TrainingError("the resume state's adapters do not match this model's target layers")
        if self.ema is not None and "ema" not in state:
            raise TrainingError("the resume state has no EMA weights: resume it with ema_decay 0, or start a new run")
        with torch.no_grad():
            for name, adapter in self.adapters.items():
                adapter.load_state_dict(state["adapters"][name])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self.losses = list(state["losses"])
        self.validation_losses = [(int(s), float(v)) for s, v in state.get("validation_losses", [])]

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validation_loss(self) -> float:
        """The objective's mean loss over the validation samples with the saved weights
        (:meth:`sampling_weights`: the EMA's when EMA is on).

        Each sample gets its noise and time from one draw of the objective's default distribution
        (uniform; reflow: the pair's own noise) for it alone, in sample order, from a generator seeded with
        ``VALIDATION_SEED``: the same draws at every evaluation of every run over the same samples, whatever
        the seed, batch size, timestep sampling or number of processes. The loss is the training's (``loss``,
        ``huber_c``), so the two curves share a scale. The training generator is not touched. Processes share
        the batches and average the sums."""
        data = self.validation
        if data is None:
            raise ValueError("this trainer has no validation samples")
        generator = torch.Generator().manual_seed(VALIDATION_SEED)
        draws = []
        for i, latent in enumerate(data.latents):
            paired = data.extras[i]["noise"][None].float() if self.objective.paired_noise else None
            draws.append(self.objective.draw(latent[None].float(), self.d2f, generator, paired))
        size = max(1, self.config.batch_size // self.world_size)  # a training micro-batch's memory at most
        batches = [bucket[s : s + size] for bucket in data.buckets for s in range(0, len(bucket), size)]
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss x samples, samples)
        with self.sampling_weights(), self.autocast():
            for number, indices in enumerate(batches):
                if number % self.world_size != self.rank:
                    continue
                x0, cond = data.batch(indices)
                extras = data.batch_extras(indices)
                extras.pop("noise", None)  # the pair's noise is in the draw
                cond.update(extras)
                noise = torch.cat([draws[i][0] for i in indices])
                times = torch.cat([draws[i][1] for i in indices])
                out = self.objective.loss(
                    self.network,
                    self.d2f,
                    x0.float().to(self.device),
                    noise.float().to(self.device),
                    times.to(self.device),
                    **self.config.loss_options(),  # the training loss: the curves compare
                    **{k: v.to(self.device) for k, v in cond.items()},
                )
                sums[0] += out.loss.double() * len(indices)
                sums[1] += len(indices)
        self._all_reduce_mean([sums])  # a mean of both sums: their ratio is the mean over all samples
        return float(sums[0] / sums[1])

    def _validate(self, on_validation: Callable[[int, float], None] | None) -> None:
        loss = self.validation_loss()
        if not math.isfinite(loss):
            log.warning("the validation loss at step %d is %s", self.step, loss)
        self.validation_losses.append((self.step, loss))
        if on_validation is not None:
            on_validation(self.step, loss)

    # ------------------------------------------------------------------ loop
    def _micro_batch_loss(self) -> torch.Tensor:
        """This process's shard of one global micro-batch. Draw order: indices, dropout, then the
        objective's noise and times (as ``d2f_core.objective_loss`` with the same generator)."""
        cfg, gen = self.config, self.generator
        indices = self.data.draw_indices(cfg.batch_size, gen, cfg.inverted_share)
        dropout = None
        if cfg.caption_dropout > 0 and self.data.uncond is not None:
            dropout = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        x0, cond = self.data.batch(indices, dropout)
        extras = self.data.batch_extras(indices)
        # the data's noise is used only by an objective that trains on pairs (teacher samples trained
        # under diff2flow draw fresh noise, as any other data does)
        data_noise = extras.pop("noise", None)
        paired = data_noise if self.objective.paired_noise else None
        # every other per-sample tensor (an image-conditioned model's "concat" latent) is a network argument;
        # caption dropout never drops it (the image is the condition, not the caption)
        cond.update(extras)
        noise, times = self.objective.draw(x0, self.d2f, gen, paired, **cfg.timestep_options())
        shard = slice(
            self.rank * cfg.batch_size // self.world_size, (self.rank + 1) * cfg.batch_size // self.world_size
        )
        x0, noise, times = (t[shard].to(self.device) for t in (x0, noise, times))
        x0 = x0.float()
        cond = {k: v[shard].to(self.device) for k, v in cond.items()}
        with self.autocast():
            out = self.objective.loss(self.network, self.d2f, x0, noise.float(), times, **cfg.loss_options(), **cond)
        return out.loss.float()

    def _all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors across processes in one flat all-reduce (gradient synchronisation)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def train_step(self) -> float:
        """One optimizer step over ``grad_accumulation`` micro-batches; returns the mean loss."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.grad_accumulation):
            loss = self._micro_batch_loss()
            finite = torch.isfinite(loss.detach()).float().reshape(1)
            self._all_reduce_mean([finite])  # every process stops together if any one diverged
            if finite.item() < 1:
                hint = {
                    "fp16": "fp16 overflows easily: train in bf16 or fp32",
                    "bf16": "try fp32, or a lower learning rate",
                    "fp32": "lower the learning rate",
                }[cfg.dtype]
                raise TrainingError(
                    f"the loss became {loss.item() if not torch.isfinite(loss) else 'non-finite on another process'} at step {self.step + 1} (learning rate "
                    f"{self.scheduler.get_last_lr()[0]:.3g}, dtype {cfg.dtype}): {hint}. Nothing from this step was saved."
                )
            self.scaler.scale(loss / cfg.grad_accumulation).backward()
            total += loss.item() / cfg.grad_accumulation
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self._all_reduce_mean(grads)
        for p, g in zip(self.params, grads):
            p.grad = g
        reported = torch.tensor([total], dtype=torch.float64, device=self.device)
        self._all_reduce_mean([reported])
        total = reported.item()
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            with self.evaluation_weights():
                self.ema.update()
        skipped = scale is not None and self.scaler.get_scale() < scale
        with warnings.catch_warnings():
            if skipped:
                # fp16 loss scaling skipped this optimizer step (inf / NaN gradients): the step still
                # counts for the LR schedule, so torch's "scheduler before optimizer" warning is moot
                log.info(
                    "fp16 loss scaling skipped step %d (non-finite gradients); scale now %g",
                    self.step + 1,
                    self.scaler.get_scale(),
                )
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        self.step += 1
        self.losses.append(total)
        return total

    def run(
        self,
        on_step: Callable[[int, float, float], None] | None = None,
        check_cancel: Callable[[], None] | None = None,
        save: Callable[[Trainer], None] | None = None,
        preview: Callable[[Trainer], Any] | None = None,
        on_validation: Callable[[int, float], None] | None = None,
    ) -> TrainResult:
        """Train until ``config.steps``. ``on_step(step, loss, lr)`` reports progress,
        ``check_cancel()`` raises to stop (before each step), ``save(trainer)`` is called every
        ``save_every`` steps, ``preview(trainer)`` at step 0 (a run that starts there) and after
        every ``preview_every`` steps (after the save of that step; training/previews.py).
        With validation samples, the validation loss is computed at step 0 (a run that starts there),
        every ``validation_every`` steps and at the last step, before that step's save (so the state
        holds it), and reported to ``on_validation(step, loss)``.
        Exceptions propagate after the last completed save."""
        start = time.perf_counter()
        first = self.step
        previews = preview is not None and self.config.preview_every > 0
        every = self.config.validation_every if self.validation is not None else 0
        if every and self.step == 0:
            self._validate(on_validation)
        if previews and self.step == 0:
            preview(self)
        while self.step < self.config.steps:
            if check_cancel is not None:
                check_cancel()
            loss = self.train_step()
            if on_step is not None:
                on_step(self.step, loss, self.scheduler.get_last_lr()[0])
            if every and (self.step % every == 0 or self.step == self.config.steps):
                self._validate(on_validation)
            if save is not None and self.config.save_every and self.step % self.config.save_every == 0:
                save(self)
            if previews and self.step % self.config.preview_every == 0:
                preview(self)
        return TrainResult(self.step - first, list(self.losses), time.perf_counter() - start)
