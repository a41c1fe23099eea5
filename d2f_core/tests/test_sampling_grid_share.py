"""A share of the training sigmas on the sampling grid's nodes (docs/MATH.md section 6): the nodes are the
levels the objective's recommended sampling evaluates, each draw lands on one with the given probability, the
nodes are drawn equally often, and a share of 0 draws nothing (runs without it are unchanged)."""

from __future__ import annotations

import pytest
import torch

import d2f_core
from d2f_core.tests.helpers import CASES, make_d2f


@pytest.mark.parametrize("prediction,zsnr", CASES)
def test_reflows_nodes_are_its_two_step_grid_without_the_end(prediction: str, zsnr: bool) -> None:
    d2f = make_d2f(prediction, zsnr)
    reflow = d2f_core.get_objective("reflow")
    assert reflow.steps == 2
    nodes = reflow.sampling_nodes(d2f)
    torch.testing.assert_close(nodes, torch.tensor([d2f.sigma_max, d2f.sigma_max / 2], dtype=torch.float64))
    # every FM objective's nodes: the grid its own sampler walks at its recommended steps, less the final 0
    for name, objective in d2f_core.OBJECTIVES.items():
        if objective.times == "sigma":
            grid = objective.sampler_sigmas(d2f, objective.steps)
            torch.testing.assert_close(objective.sampling_nodes(d2f), grid[:-1].double(), msg=name)


def test_the_share_lands_on_the_nodes_equally_often(device: torch.device) -> None:
    nodes = torch.tensor([0.9, 0.45, 0.2], dtype=torch.float64)
    sigmas = torch.rand(40_000, generator=torch.Generator().manual_seed(0)).mul(0.8).add(0.05).to(device)
    placed = d2f_core.place_on_sampling_grid(sigmas, nodes, 0.3, torch.Generator(device=device).manual_seed(1))
    assert placed.device == sigmas.device and placed.dtype == sigmas.dtype
    on = (placed[:, None].double().cpu() - nodes[None]).abs() < 1e-6
    moved = placed != sigmas
    # the continuous draws never sit on a node: every moved draw is on one, every unmoved one is not
    assert torch.equal(on.any(1), moved.cpu())
    share = moved.double().mean().item()
    assert share == pytest.approx(0.3, abs=0.015)  # 6.5 binomial standard deviations
    counts = on.sum(0).double() / on.sum()
    torch.testing.assert_close(counts, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02, rtol=0)


def test_one_uniform_then_one_node_per_sample_from_the_generator() -> None:
    nodes = torch.tensor([1.0, 0.5], dtype=torch.float64)
    sigmas = torch.linspace(0.01, 0.99, 64)
    placed = d2f_core.place_on_sampling_grid(sigmas, nodes, 0.6, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    on_grid = torch.rand(64, generator=gen) < 0.6
    pick = torch.randint(0, 2, (64,), generator=gen)
    torch.testing.assert_close(placed, torch.where(on_grid, nodes[pick].float(), sigmas), rtol=0, atol=0)


def test_share_0_draws_nothing_and_share_1_places_every_draw() -> None:
    nodes = torch.tensor([0.7, 0.35], dtype=torch.float64)
    sigmas = torch.rand(256)
    gen = torch.Generator().manual_seed(2)
    before = gen.get_state()
    assert d2f_core.place_on_sampling_grid(sigmas, nodes, 0.0, gen) is sigmas
    assert torch.equal(gen.get_state(), before), "share 0 consumed random numbers"
    every = d2f_core.place_on_sampling_grid(sigmas, nodes, 1.0, gen)
    on = (every[:, None].double() - nodes[None]).abs() < 1e-6
    assert on.any(1).all() and on.any(0).all(), "share 1: every draw on a node, both nodes drawn"


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan")])
def test_a_share_outside_0_1_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="the sampling grid's share must lie in \\[0, 1\\]"):
        d2f_core.place_on_sampling_grid(torch.rand(4), torch.tensor([1.0]), share)


def test_an_empty_grid_is_refused() -> None:
    with pytest.raises(ValueError, match="the sampling grid needs at least one node, got shape \\(0,\\)"):
        d2f_core.place_on_sampling_grid(torch.rand(4), torch.empty(0), 0.5)


def test_draw_places_the_share_after_the_timestep_sampling(device: torch.device) -> None:
    """``Objective.draw(grid_share=...)``: noise, then the timestep sampling's sigmas, then the placement, from
    one generator (on its own device); ``grid_share = 0`` draws exactly what a draw without it does."""
    d2f = make_d2f("v", False)
    reflow = d2f_core.get_objective("reflow")
    x0, z = torch.randn(512, 4, 2, 2, device=device), torch.randn(512, 4, 2, 2, device=device)
    options = {"timestep_sampling": "shift", "shift": 6.0}

    def generator() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(3)

    plain = reflow.draw(x0, d2f, generator(), z, **options)
    zero = reflow.draw(x0, d2f, generator(), z, **options, grid_share=0.0)
    assert all(torch.equal(a, b) for a, b in zip(plain, zero))
    noise, times = reflow.draw(x0, d2f, generator(), z, **options, grid_share=0.5)
    assert torch.equal(noise, plain[0]) and times.device == plain[1].device
    gen = generator()
    sigmas = d2f_core.sample_training_sigmas(512, "shift", d2f.sigma_max, shift=6.0, generator=gen)
    expected = d2f_core.place_on_sampling_grid(sigmas, reflow.sampling_nodes(d2f), 0.5, gen)
    torch.testing.assert_close(times, expected, rtol=0, atol=0)
    on = ((times[:, None].double().cpu() - reflow.sampling_nodes(d2f)[None]).abs() < 1e-6).any(1)
    assert 0.4 < on.double().mean() < 0.6


def test_objectives_without_fm_sigmas_refuse_a_share() -> None:
    d2f = make_d2f("eps", False)
    diffusion = d2f_core.get_objective("diffusion")
    with pytest.raises(ValueError, match="objective 'diffusion' trains on integer timesteps, not FM sigmas"):
        diffusion.draw(torch.randn(2, 4, 2, 2), d2f, torch.Generator().manual_seed(0), grid_share=0.5)
    diffusion.draw(torch.randn(2, 4, 2, 2), d2f, torch.Generator().manual_seed(0), grid_share=0.0)
    with pytest.raises(
        ValueError, match="recommended_grid_share 0.5 must lie in \\[0, 1\\], and be 0 for an objective"
    ):
        d2f_core.Objective("x", "x", diffusion.loss, times="tau", recommended_grid_share=0.5)
    with pytest.raises(ValueError, match="recommended_grid_share 2 must lie"):
        d2f_core.Objective("x", "x", diffusion.loss, recommended_grid_share=2)


def test_only_reflow_recommends_a_share() -> None:
    """Reflow's recommended share is 0.5 (it lowered the FD at 1, 2 and 4 steps on 3 seeds:
    benchmarks/results/reflow_second_generation.md); the other objectives sample with 20 steps and keep 0."""
    shares = {name: o.recommended_grid_share for name, o in d2f_core.OBJECTIVES.items()}
    assert shares == {"diff2flow": 0.0, "naive_fm": 0.0, "diffusion": 0.0, "reflow": 0.5}
