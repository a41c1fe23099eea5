"""The validation loss: held-out samples, fixed draws, its schedule, the training state, and a
trajectory that evaluating never changes."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import d2f_core
from training import TrainConfig, Trainer, TrainingData
from training.data import VALIDATION_SEED, hold_out
from training.files import load_training_state, save_training_state
from training.tests.helpers import assert_equal, make_run, params

VALIDATED = {"validation_split": 0.25, "validation_every": 2}


def tagged_data(n: int, extras: bool = False) -> TrainingData:
    """Samples whose latent, conditioning, unconditional conditioning and extras all carry their index."""
    return TrainingData(
        [torch.full((4, 2, 2), float(i)) for i in range(n)],
        [{"context": torch.full((1, 3, 4), float(i))} for i in range(n)],
        [{"context": torch.full((1, 3, 4), -float(i))} for i in range(n)],
        [{"noise": torch.full((4, 2, 2), 10.0 + i)} for i in range(n)] if extras else None,
    )


def test_hold_out_is_a_fixed_disjoint_split_with_each_samples_own_tensors() -> None:
    data = tagged_data(10, extras=True)
    train, held = hold_out(data, 0.3)
    ids = [int(t[0, 0, 0]) for t in held.latents]
    assert len(held) == 3 and len(train) == 7
    assert sorted(ids + [int(t[0, 0, 0]) for t in train.latents]) == list(range(10))
    assert ids == [int(t[0, 0, 0]) for t in hold_out(tagged_data(10), 0.3)[1].latents]  # the same every time
    for part in (train, held):
        for latent, cond, uncond, extra in zip(part.latents, part.conds, part.uncond, part.extras):
            i = float(latent[0, 0, 0])
            assert (
                cond["context"][0, 0, 0] == i and uncond["context"][0, 0, 0] == -i and extra["noise"][0, 0, 0] == 10 + i
            )
    assert len(hold_out(data, 0.01)[1]) == 1  # at least one
    with pytest.raises(ValueError, match="leaves none to train on"):
        hold_out(tagged_data(2), 0.9)


def test_options_that_cannot_be_evaluated_are_refused() -> None:
    with pytest.raises(ValueError, match="validation_every is 0"):
        TrainConfig(validation_split=0.2)
    with pytest.raises(ValueError, match=r"validation_split must lie in \[0, 0.9\]"):
        TrainConfig(validation_split=0.95, validation_every=1)
    with pytest.raises(ValueError, match="validation_every 3 needs validation samples"):
        make_run(TrainConfig(validation_every=3))
    trainer, net, adapters = make_run(TrainConfig(**VALIDATED), n=8)
    with pytest.raises(ValueError, match="validation data is given but validation_every is 0"):
        Trainer(net, adapters, trainer.d2f, TrainConfig(), trainer.data, validation=trainer.validation)


def expected_validation_loss(trainer: Trainer) -> float:
    """The definition, sample by sample: one draw of the objective's default distribution each, in sample
    order, from a generator seeded with VALIDATION_SEED; the mean of the per-sample losses (the training's
    loss: pseudo-Huber for reflow by default)."""
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    objective, data = trainer.objective, trainer.validation
    losses = []
    with torch.no_grad(), trainer.sampling_weights():
        for i, latent in enumerate(data.latents):
            paired = data.extras[i]["noise"][None] if objective.paired_noise else None
            noise, times = objective.draw(latent[None], trainer.d2f, generator, paired)
            losses.append(
                objective.loss(
                    trainer.network,
                    trainer.d2f,
                    latent[None],
                    noise,
                    times,
                    **trainer.config.loss_options(),
                    **data.conds[i],
                ).loss
            )
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize("objective", d2f_core.OBJECTIVES)
def test_validation_loss_is_the_objectives_loss_at_fixed_draws(objective: str) -> None:
    trainer, _, _ = make_run(TrainConfig(objective=objective, batch_size=2, **VALIDATED), "v", n=12)
    trainer.train_step()  # move the weights off their initial values
    value = trainer.validation_loss()
    assert value == pytest.approx(expected_validation_loss(trainer), rel=1e-5)
    state = trainer.generator.get_state()
    assert trainer.validation_loss() == value  # the same draws at every evaluation
    assert torch.equal(trainer.generator.get_state(), state)  # the training generator is not touched


def test_validation_draws_do_not_depend_on_seed_batch_or_timestep_sampling() -> None:
    """Curves compare between runs: another seed, batch size and timestep distribution draw the same
    validation noise and times (the same weights give the same loss)."""
    a, _, adapters_a = make_run(TrainConfig(batch_size=1, **VALIDATED), n=16)
    b, _, adapters_b = make_run(
        TrainConfig(batch_size=3, seed=9, timestep_sampling="logit_normal", logit_mean=1.0, **VALIDATED), n=16
    )
    assert_equal(params(adapters_a), params(adapters_b))
    assert len(a.validation) == 4 and a.validation_loss() == pytest.approx(b.validation_loss(), rel=1e-6)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"ema_decay": 0.9, "grad_accumulation": 2},
        pytest.param(
            {"optimizer": "AdamWScheduleFree"},
            marks=pytest.mark.skipif(importlib.util.find_spec("schedulefree") is None, reason="schedulefree missing"),
        ),
    ],
)
def test_evaluating_never_changes_the_trajectory(extra: dict) -> None:
    """The same held-out split with and without evaluations every step: bit-identical weights and losses."""
    config = TrainConfig(steps=6, batch_size=2, learning_rate=1e-2, caption_dropout=0.3, **VALIDATED, **extra)
    evaluated, _, adapters = make_run(config, n=8)
    seen = []
    evaluated.run(on_validation=lambda step, loss: seen.append((step, loss)))
    plain_config = TrainConfig(**{**config.to_dict(), "validation_split": 0.0, "validation_every": 0})
    reference, net, reference_adapters = make_run(plain_config, n=8)
    plain = Trainer(net, reference_adapters, reference.d2f, plain_config, hold_out(reference.data, 0.25)[0])
    plain.run()
    assert_equal(params(adapters), params(reference_adapters))
    assert evaluated.losses == plain.losses
    if evaluated.ema is not None:
        assert_equal(params(evaluated.ema.adapters), params(plain.ema.adapters))
    assert [s for s, _ in seen] == [0, 2, 4, 6] and seen == evaluated.validation_losses


def test_validation_uses_the_saved_weights() -> None:
    """With EMA on, the loss is the EMA weights' (what every saved LoRA holds)."""
    trainer, _, _ = make_run(TrainConfig(steps=4, learning_rate=5e-2, ema_decay=0.5, **VALIDATED), n=8)
    trainer.run()
    with_ema = trainer.validation_loss()
    ema, trainer.ema = trainer.ema, None
    raw = trainer.validation_loss()
    for adapter, averaged in zip(trainer.adapters.values(), ema.adapters.values()):
        adapter.load_state_dict(averaged.state_dict())
    assert with_ema == trainer.validation_loss() != raw


def test_schedule_state_and_resume(tmp_path) -> None:
    """Evaluated at 0, every N and the last step, before that step's save; the values are in the state and
    a resumed run continues them exactly."""
    config = TrainConfig(
        steps=7, batch_size=2, learning_rate=1e-2, save_every=3, validation_split=0.25, validation_every=3
    )
    straight, _, _ = make_run(config, n=8)
    saved = []
    straight.run(save=lambda t: saved.append(list(t.state_dict()["validation_losses"])))
    assert [s for s, _ in straight.validation_losses] == [0, 3, 6, 7]
    assert [[s for s, _ in state] for state in saved] == [[0, 3], [0, 3, 6]]
    half, _, _ = make_run(TrainConfig(**{**config.to_dict(), "steps": 3}), n=8)
    half.run()
    save_training_state(tmp_path / "run.d2fstate", half.state_dict())
    resumed, _, _ = make_run(config, n=8)
    resumed.load_state_dict(load_training_state(tmp_path / "run.d2fstate"))
    resumed.run()
    assert resumed.validation_losses == straight.validation_losses
    with pytest.raises(Exception, match="validation_split: saved 0.25, now 0.5"):  # another split: another run
        make_run(TrainConfig(**{**config.to_dict(), "validation_split": 0.5}), n=8)[0].load_state_dict(
            half.state_dict()
        )
