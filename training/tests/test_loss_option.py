"""The per-sample loss options (``loss``, ``huber_c``) and the U-shaped timestep sampling in the trainer:
the engine's loss is d2f_core's with the configured loss for the same draws, the validation loss uses the
training loss, the options are checked, part of the trajectory and resume exactly."""

from __future__ import annotations

import pytest
import torch

import d2f_core
from training import TrainConfig, TrainingError
from training.data import VALIDATION_SEED
from training.tests.helpers import assert_resume_equals_straight, make_run

LOSS_OPTIONS = [{"loss": "pseudo_huber"}, {"loss": "pseudo_huber", "huber_c": 0.3}]


def reference_loss(trainer, config: TrainConfig) -> float:
    """The first step's loss as the engine documents its draws (indices, then the objective's noise and
    times through d2f_core.objective_loss, from one generator seeded with the config's seed, with the config's
    timestep options), reduced with the config's loss as trained."""
    gen = torch.Generator().manual_seed(config.seed)
    indices = trainer.data.draw_indices(config.batch_size, gen)
    x0, cond = trainer.data.batch(indices)
    paired = trainer.data.batch_extras(indices).get("noise") if trainer.objective.paired_noise else None
    with torch.no_grad():
        out = d2f_core.objective_loss(
            config.objective,
            trainer.network,
            trainer.d2f,
            x0,
            noise=paired,
            generator=gen,
            **config.loss_options(),
            **config.timestep_options(),
            **cond,
        )
    return out.loss.item()


@pytest.mark.parametrize("objective", d2f_core.OBJECTIVES)
@pytest.mark.parametrize("options", LOSS_OPTIONS)
def test_the_engines_loss_is_d2f_cores_with_the_configured_loss(objective: str, options: dict) -> None:
    config = TrainConfig(objective=objective, steps=1, batch_size=3, seed=5, timestep_sampling="u_shaped", **options)
    trainer, _, _ = make_run(config, "v")
    expected = reference_loss(trainer, config)
    mse_config = TrainConfig(**{**config.to_dict(), "loss": "mse", "huber_c": 0.0})
    mse_trainer, _, _ = make_run(mse_config, "v")
    assert trainer.train_step() == pytest.approx(expected, rel=1e-6)
    assert mse_trainer.train_step() == pytest.approx(reference_loss(make_run(mse_config, "v")[0], mse_config), rel=1e-6)
    assert mse_trainer.losses[0] != pytest.approx(trainer.losses[0], rel=1e-3), "the loss option changes nothing"


@pytest.mark.parametrize("objective", ["diff2flow", "reflow"])
def test_the_validation_loss_uses_the_training_loss(objective: str) -> None:
    """Evaluated sample by sample at the validation draws, with the same loss and c as the training."""
    validated = {"validation_split": 0.25, "validation_every": 2}
    config = TrainConfig(objective=objective, batch_size=2, loss="pseudo_huber", huber_c=0.2, **validated)
    trainer, _, _ = make_run(config, "v", n=12)
    trainer.train_step()
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    objective_record, data = trainer.objective, trainer.validation
    losses = []
    with torch.no_grad(), trainer.sampling_weights():
        for i, latent in enumerate(data.latents):
            paired = data.extras[i]["noise"][None] if objective_record.paired_noise else None
            noise, times = objective_record.draw(latent[None], trainer.d2f, generator, paired)
            out = objective_record.loss(
                trainer.network,
                trainer.d2f,
                latent[None],
                noise,
                times,
                loss="pseudo_huber",
                huber_c=0.2,
                **data.conds[i],
            )
            losses.append(out.loss)
    value = trainer.validation_loss()
    assert value == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)
    trainer.config = TrainConfig(**{**config.to_dict(), "loss": "mse", "huber_c": 0.0})
    assert trainer.validation_loss() != pytest.approx(value, rel=1e-3), "the validation loss ignores the loss option"


@pytest.mark.parametrize("objective", d2f_core.OBJECTIVES)
def test_the_default_loss_is_the_objectives_recommended_one(objective: str) -> None:
    """``loss = "recommended"`` (the default) trains with the objective's ``recommended_loss``: pseudo-Huber
    for reflow (it won benchmarks/results/reflow_second_generation.md), MSE for the others; a resume
    compares the loss as trained."""
    recommended = d2f_core.OBJECTIVES[objective].recommended_loss
    assert recommended == ("pseudo_huber" if objective == "reflow" else "mse")
    config = TrainConfig(objective=objective, steps=1, batch_size=3, seed=5)
    assert (config.loss, config.resolved_loss) == ("recommended", recommended)
    explicit = TrainConfig(**{**config.to_dict(), "loss": recommended})
    trainer, _, _ = make_run(config, "v")
    assert trainer.train_step() == pytest.approx(reference_loss(make_run(explicit, "v")[0], explicit), rel=1e-6)
    assert config.resume_mismatch(explicit) == "" and explicit.resume_mismatch(config) == ""
    other = "mse" if recommended == "pseudo_huber" else "pseudo_huber"
    assert config.resume_mismatch(TrainConfig(**{**config.to_dict(), "loss": other})) == (
        f"loss: saved {other!r}, now {recommended!r}"
    )


def test_the_loss_options_are_checked() -> None:
    with pytest.raises(ValueError, match="huber_c 0.1 is the c of loss pseudo_huber, but the loss is mse"):
        TrainConfig(loss="mse", huber_c=0.1)
    with pytest.raises(
        ValueError,
        match="huber_c 0.1 is the c of loss pseudo_huber, but loss recommended is mse for objective diffusion",
    ):
        TrainConfig(objective="diffusion", huber_c=0.1)
    assert TrainConfig(objective="reflow", huber_c=0.1).loss_options() == {"loss": "pseudo_huber", "huber_c": 0.1}
    with pytest.raises(ValueError, match="huber_c must be a finite number >= 0"):
        TrainConfig(loss="pseudo_huber", huber_c=-0.5)
    with pytest.raises(ValueError, match="loss='l1' is not supported: choose one of recommended, mse, pseudo_huber"):
        TrainConfig(loss="l1")
    with pytest.raises(ValueError, match="timestep_sampling='u' is not supported"):
        TrainConfig(timestep_sampling="u")
    config = TrainConfig(loss="pseudo_huber", huber_c=0.25, timestep_sampling="u_shaped")
    assert config.loss_options() == {"loss": "pseudo_huber", "huber_c": 0.25}
    assert config.timestep_options()["timestep_sampling"] == "u_shaped"


def test_the_loss_options_are_part_of_the_trajectory_and_older_states_have_the_defaults() -> None:
    saved = TrainConfig()
    assert TrainConfig(loss="pseudo_huber").resume_mismatch(saved) == "loss: saved 'mse', now 'pseudo_huber'"
    huber = TrainConfig(loss="pseudo_huber")
    assert TrainConfig(loss="pseudo_huber", huber_c=0.1).resume_mismatch(huber) == "huber_c: saved 0.0, now 0.1"
    assert TrainConfig(timestep_sampling="u_shaped").resume_mismatch(saved) == (
        "timestep_sampling: saved 'uniform', now 'u_shaped'"
    )
    older = {k: v for k, v in saved.to_dict().items() if k not in ("loss", "huber_c")}  # a state from before them
    assert TrainConfig.from_dict(older) == TrainConfig(loss="mse")  # those trained with MSE
    older_reflow = {**older, "objective": "reflow"}
    assert TrainConfig(objective="reflow").resume_mismatch(TrainConfig.from_dict(older_reflow)) == (
        "loss: saved 'mse', now 'pseudo_huber'"
    )
    a, _, _ = make_run(TrainConfig(steps=2, learning_rate=1e-3))
    a.run()
    b, _, _ = make_run(TrainConfig(steps=4, learning_rate=1e-3, loss="pseudo_huber"))
    with pytest.raises(TrainingError, match="loss: saved 'mse', now 'pseudo_huber'"):
        b.load_state_dict(a.state_dict())


def test_a_pseudo_huber_u_shaped_run_resumes_exactly(tmp_path) -> None:
    config = TrainConfig(
        steps=6,
        batch_size=2,
        learning_rate=1e-3,
        seed=3,
        loss="pseudo_huber",
        huber_c=0.05,
        timestep_sampling="u_shaped",
    )
    assert_resume_equals_straight(config, tmp_path, at=3)
