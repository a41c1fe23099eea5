"""The training engine on a tiny pure-PyTorch model: objectives, resume, errors, schedules."""

from __future__ import annotations

import math

import pytest
import torch

import d2f_core
from d2f_core.lora import ALGORITHMS
from training import TrainConfig, TrainingError
from training.engine import lr_lambda
from training.tests.helpers import assert_resume_equals_straight, make_run


@pytest.mark.parametrize("objective", d2f_core.OBJECTIVES)
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_each_objective_overfits_a_fixed_batch(objective: str, prediction: str) -> None:
    config = TrainConfig(objective=objective, steps=80, batch_size=4, learning_rate=1e-2, rank=4, alpha=4, seed=1)
    trainer, net, _ = make_run(config, prediction)

    def fixed_loss() -> float:  # the objective on the same noise and times before and after
        x0, cond = trainer.data.batch(list(range(4)))
        paired = trainer.data.batch_extras(list(range(4))).get("noise")  # reflow's pairs (None for the others)
        gen = torch.Generator().manual_seed(99)
        with torch.no_grad():
            return (
                sum(
                    d2f_core.objective_loss(
                        objective, net, trainer.d2f, x0, noise=paired, generator=gen, **cond
                    ).loss.item()
                    for _ in range(16)
                )
                / 16
            )

    before = fixed_loss()
    losses = trainer.run().losses
    assert len(losses) == 80 and all(math.isfinite(x) for x in losses)
    after = fixed_loss()
    assert after < 0.95 * before, (objective, prediction, before, after)


def test_loss_equals_d2f_core_objective() -> None:
    """The engine's loss is d2f_core's diff2flow loss for the same draws."""
    config = TrainConfig(steps=1, batch_size=2, seed=5)
    trainer, net, _ = make_run(config, "v")
    gen = torch.Generator().manual_seed(5)
    indices = trainer.data.draw_indices(2, gen)
    x0, cond = trainer.data.batch(indices)
    expected = d2f_core.objective_loss("diff2flow", net, trainer.d2f, x0, generator=gen, **cond).loss.item()
    assert trainer.train_step() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize(
    "extra", [{}, {"grad_accumulation": 2, "lr_schedule": "cosine", "warmup_steps": 2, "caption_dropout": 0.3}]
)
def test_resume_equals_straight_run(tmp_path, algorithm: str, extra: dict) -> None:
    config = TrainConfig(steps=8, batch_size=2, learning_rate=1e-3, algorithm=algorithm, seed=3, **extra)
    assert_resume_equals_straight(config, tmp_path, at=4)


def test_resume_with_other_configuration_is_refused() -> None:
    a, _, _ = make_run(TrainConfig(steps=2, learning_rate=1e-3))
    a.run()
    b, _, _ = make_run(TrainConfig(steps=4, learning_rate=2e-3, rank=8))
    with pytest.raises(TrainingError, match="different configuration.*learning_rate: saved 0.001, now 0.002"):
        b.load_state_dict(a.state_dict())


def test_non_finite_loss_stops_with_step_and_cause() -> None:
    trainer, net, _ = make_run(TrainConfig(steps=5))
    trainer.run_steps_before_nan = 2
    original = net.forward
    calls = {"n": 0}

    def exploding(*args, **kwargs):
        calls["n"] += 1
        out = original(*args, **kwargs)
        return out * float("nan") if calls["n"] > 2 else out

    net.forward = exploding
    with pytest.raises(TrainingError, match=r"loss became nan at step 3 .*lower the learning rate"):
        trainer.run()
    assert trainer.step == 2


def test_cancel_stops_before_the_next_step() -> None:
    trainer, _, _ = make_run(TrainConfig(steps=10))

    class Cancelled(Exception):
        pass

    def cancel():
        if trainer.step == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        trainer.run(check_cancel=cancel)
    assert trainer.step == 3


def test_periodic_saves_and_progress_callback() -> None:
    trainer, _, _ = make_run(TrainConfig(steps=6, save_every=2))
    saved, seen = [], []
    trainer.run(on_step=lambda step, loss, lr: seen.append(step), save=lambda t: saved.append(t.step))
    assert saved == [2, 4, 6] and seen == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_training_runs(dtype: str) -> None:
    trainer, _, _ = make_run(TrainConfig(steps=3, dtype=dtype, batch_size=2))
    losses = trainer.run().losses
    assert all(math.isfinite(x) for x in losses)


def test_lr_schedules() -> None:
    cos = lr_lambda(TrainConfig(steps=10, lr_schedule="cosine", warmup_steps=2))
    assert [round(cos(s), 6) for s in (0, 1)] == [round(1 / 3, 6), round(2 / 3, 6)]
    assert cos(2) == 1.0 and cos(12) == pytest.approx(0.0) and 0 < cos(6) < 1
    lin = lr_lambda(TrainConfig(steps=10, lr_schedule="linear"))
    assert lin(0) == 1.0 and lin(5) == pytest.approx(0.5) and lin(10) == 0.0
    assert lr_lambda(TrainConfig(steps=10))(7) == 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"objective": "x0"}, "objective='x0' is not supported: choose one of diff2flow, naive_fm, diffusion"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"learning_rate": 0}, "learning_rate must be > 0"),
        ({"caption_dropout": 1.0}, r"caption_dropout must lie in \[0, 1\)"),
        ({"algorithm": "BOFT"}, "algorithm='BOFT' is not supported: choose one of LoRA, LoHa, LoKr, OFT, DoRA"),
        ({"optimizer": "Shampoo"}, "optimizer='Shampoo' is not supported"),
    ],
)
def test_config_errors_name_the_option(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_mismatched_data_is_refused() -> None:
    from training import TrainingData

    with pytest.raises(ValueError, match="no training latents"):
        TrainingData([], [])
    with pytest.raises(ValueError, match="3 latents but 2 conditionings"):
        TrainingData([torch.zeros(4, 8, 8)] * 3, [{"context": torch.zeros(1, 3, 4)}] * 2)


def test_reflow_is_refused_without_paired_noise_and_others_ignore_it() -> None:
    from training import Trainer, TrainingData

    trainer, net, adapters = make_run(TrainConfig(steps=1, batch_size=2))
    plain = TrainingData(trainer.data.latents, trainer.data.conds, trainer.data.uncond)
    with pytest.raises(ValueError, match="objective 'reflow' trains on \\(noise, image\\) pairs.*pairs folder"):
        Trainer(net, adapters, trainer.d2f, TrainConfig(objective="reflow", steps=1), plain)
    # diff2flow on data that carries pairs draws its own noise: the same loss with or without the pairs
    paired = TrainingData(
        plain.latents, plain.conds, plain.uncond, extras=[{"noise": torch.ones_like(x)} for x in plain.latents]
    )
    config = TrainConfig(steps=1, batch_size=2, seed=5)
    with_pairs = Trainer(net, adapters, trainer.d2f, config, paired).train_step()
    trainer, net, adapters = make_run(config)
    assert trainer.train_step() == pytest.approx(with_pairs, rel=1e-6)


def test_fp16_on_the_cpu_warns_and_a_skipped_step_raises_no_scheduler_warning(caplog) -> None:
    """fp16 on a CPU is emulated (several times slower than fp32): the trainer says so. Loss scaling
    skips the first steps there (the scale overflows): they still count for the LR schedule, and
    torch's "lr_scheduler.step() before optimizer.step()" warning must not reach the user."""
    import logging
    import warnings

    with caplog.at_level(logging.WARNING, logger="diff2flow"):
        trainer, _, _ = make_run(TrainConfig(steps=3, batch_size=2, dtype="fp16"))
    assert any("fp16 on the CPU" in r.getMessage() for r in caplog.records)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.run()
    assert trainer.step == 3
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]
