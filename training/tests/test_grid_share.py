"""The grid_share option in the trainer: its default is each objective's recommended share, the engine's loss
is d2f_core's on draws placed with the resolved share, bad values are refused naming the option, and it is part
of the trajectory (states saved before it existed trained with none on the grid)."""

from __future__ import annotations

import pytest

import d2f_core
from training import TrainConfig, TrainingError
from training.data import grid_share_problem
from training.tests.helpers import assert_resume_equals_straight, make_run
from training.tests.test_loss_option import reference_loss


@pytest.mark.parametrize("objective", d2f_core.OBJECTIVES)
def test_the_default_share_is_the_objectives_recommended_one(objective: str) -> None:
    config = TrainConfig(objective=objective)
    recommended = d2f_core.OBJECTIVES[objective].recommended_grid_share
    assert config.grid_share == -1 and config.resolved_grid_share == recommended
    assert config.timestep_options()["grid_share"] == recommended
    explicit = TrainConfig(objective=objective, grid_share=recommended)
    assert config.resume_mismatch(explicit) == "" and explicit.resume_mismatch(config) == ""


@pytest.mark.parametrize("objective,share", [("reflow", -1.0), ("reflow", 1.0), ("diff2flow", 0.5), ("naive_fm", 1.0)])
def test_the_engines_loss_is_d2f_cores_on_the_placed_draws(objective: str, share: float) -> None:
    config = TrainConfig(
        objective=objective, steps=1, batch_size=8, seed=5, timestep_sampling="shift", grid_share=share
    )
    assert config.resolved_grid_share > 0
    trainer, _, _ = make_run(config, "v")
    expected = reference_loss(trainer, config)
    assert trainer.train_step() == pytest.approx(expected, rel=1e-6)
    none = TrainConfig(**{**config.to_dict(), "grid_share": 0.0})
    assert reference_loss(make_run(none, "v")[0], none) != pytest.approx(expected, rel=1e-5), (
        "the share changes nothing"
    )


@pytest.mark.parametrize("share", [-0.5, 1.01, 2.0])
def test_a_share_outside_0_1_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match=f"grid_share must lie in \\[0, 1\\] .* or be -1 .* got {share}"):
        TrainConfig(objective="reflow", grid_share=share)


def test_diffusion_refuses_a_share_but_takes_its_recommended_none() -> None:
    with pytest.raises(
        ValueError, match="grid_share 0.5 places training sigmas on the FM sampling grid, but objective diffusion"
    ):
        TrainConfig(objective="diffusion", grid_share=0.5)
    assert TrainConfig(objective="diffusion").resolved_grid_share == 0.0


def test_the_share_is_part_of_the_trajectory_and_older_states_had_none() -> None:
    reflow = TrainConfig(objective="reflow")
    assert reflow.resume_mismatch(TrainConfig(objective="reflow", grid_share=0.0)) == "grid_share: saved 0.0, now 0.5"
    older = {k: v for k, v in reflow.to_dict().items() if k != "grid_share"}  # a state from before the option
    assert TrainConfig.from_dict(older).resolved_grid_share == 0.0
    assert reflow.resume_mismatch(TrainConfig.from_dict(older)) == "grid_share: saved 0.0, now 0.5"
    a, _, _ = make_run(TrainConfig(objective="reflow", steps=2, batch_size=2, grid_share=0.0))
    a.run()
    b, _, _ = make_run(TrainConfig(objective="reflow", steps=4, batch_size=2))
    with pytest.raises(TrainingError, match="grid_share: saved 0.0, now 0.5"):
        b.load_state_dict(a.state_dict())


def test_a_run_with_a_share_resumes_exactly(tmp_path) -> None:
    config = TrainConfig(objective="reflow", steps=6, batch_size=4, learning_rate=1e-3, seed=3, grid_share=0.5)
    assert_resume_equals_straight(config, tmp_path, at=3)


def test_a_depth_run_refuses_a_share_on_a_grid_it_does_not_sample() -> None:
    """The grid is the objective's image sampling grid: a depth model of diff2flow samples with 4 steps, not 20;
    naive_fm depth models sample with its 20, so their grid is right."""
    assert grid_share_problem(TrainConfig(objective="diff2flow", grid_share=0.5), "depth") == (
        "grid_share",
        "0.5 places training sigmas on the 20-step image sampling grid of objective diff2flow, but a depth model "
        "samples with 4 steps: set grid_share 0",
    )
    assert grid_share_problem(TrainConfig(objective="diff2flow", grid_share=0.5), "image") is None
    assert grid_share_problem(TrainConfig(objective="diff2flow"), "depth") is None  # recommends none
    assert grid_share_problem(TrainConfig(objective="naive_fm", grid_share=0.5), "depth") is None
