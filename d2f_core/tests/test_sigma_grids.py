"""The sigma grids of reflow pairs (``d2f_core.FM_GRIDS``, ``fm_sigmas(..., sigma_floor=...)``): the
``sigma_min`` grid has a node exactly on the model's sigma_min and otherwise follows the uniform grid,
its steps shrink everywhere as their number grows, and every sampler on it converges at its order on a
velocity whose form changes at sigma_min (a network whose timestep clamps there, docs/MATH.md section 14)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import d2f_core
from d2f_core import GaussianMixture

SIGMA_MAX, SIGMA_MIN = 0.936, 0.0283  # SD's schedule through the alignment (d2f.sigma_max, d2f.sigma_min)
ORDERS = {"euler": 1, "heun": 2, "ab2": 2, "dpmpp_2m": 2}


def test_the_grids_registry_and_their_floors() -> None:
    assert set(d2f_core.FM_GRIDS) == {"uniform", "sigma_min"} and all(d2f_core.FM_GRIDS.values())
    assert d2f_core.grid_floor("uniform", SIGMA_MIN) == 0.0
    assert d2f_core.grid_floor("sigma_min", SIGMA_MIN) == SIGMA_MIN
    with pytest.raises(ValueError, match="grid 'karras' is unknown: choose one of uniform, sigma_min"):
        d2f_core.grid_floor("karras", SIGMA_MIN)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [2, 3, 10, 12, 32, 64, 100, 1000])
def test_the_sigma_min_grid_has_a_node_on_sigma_min(steps: int, shift: float) -> None:
    plain = d2f_core.fm_sigmas(steps, SIGMA_MAX, shift=shift)
    grid = d2f_core.fm_sigmas(steps, SIGMA_MAX, shift=shift, sigma_floor=SIGMA_MIN)
    assert grid.dtype == torch.float64 and len(grid) == steps + 1
    assert grid[0] == plain[0] and grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all())
    at = int((grid == SIGMA_MIN).nonzero())
    # the steps split by the lengths of the two stretches in the unshifted time, at least one below
    u_top, u_floor = (
        float(d2f_core.inverse_time_shift(SIGMA_MAX, shift)),
        float(d2f_core.inverse_time_shift(SIGMA_MIN, shift)),
    )
    assert steps - at == min(steps - 1, max(1, round(steps * u_floor / u_top)))
    # uniform in the unshifted time within each stretch
    u = d2f_core.inverse_time_shift(grid, shift)
    for part in (u[: at + 1], u[at:]):
        torch.testing.assert_close(part[1:] - part[:-1], (part[1] - part[0]).expand(len(part) - 1))
    # a node moved, nothing else: as many steps as the uniform grid, which it equals once it is fine enough
    assert abs(at - int((plain >= SIGMA_MIN).sum()) + 1) <= 1


def test_the_sigma_min_grid_is_the_uniform_one_where_it_cannot_differ() -> None:
    assert torch.equal(d2f_core.fm_sigmas(1, SIGMA_MAX, sigma_floor=SIGMA_MIN), d2f_core.fm_sigmas(1, SIGMA_MAX))
    assert torch.equal(d2f_core.fm_sigmas(7, SIGMA_MAX, sigma_floor=0.0), d2f_core.fm_sigmas(7, SIGMA_MAX))
    # few steps: uniform down to sigma_min, then one step to 0
    grid = d2f_core.fm_sigmas(10, SIGMA_MAX, sigma_floor=SIGMA_MIN)
    torch.testing.assert_close(grid[:-1], torch.linspace(SIGMA_MAX, SIGMA_MIN, 10, dtype=torch.float64))
    for bad in (-0.1, SIGMA_MAX, 1.5):
        with pytest.raises(ValueError, match="sigma_floor must lie in"):
            d2f_core.fm_sigmas(10, SIGMA_MAX, sigma_floor=bad)


def _clamped_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact velocity of an overlapping 2-d mixture, but below SIGMA_MIN the noise estimate of level
    SIGMA_MIN (the network's timestep clamps there) with the data estimate formed from it at the true level:
    continuous in sigma, its derivative not (what the pairs' teachers do, docs/MATH.md section 5)."""
    level = torch.clamp(sigma, min=SIGMA_MIN)
    eps = _mixture().optimal_eps(x, 1 - level, level)
    x0 = (x - sigma[:, None] * eps) / (1 - sigma[:, None])
    return eps - x0


@functools.cache
def _mixture() -> GaussianMixture:
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]], dtype=torch.float64)
    return GaussianMixture(means, stds=torch.tensor([0.6, 0.7, 0.5]), weights=torch.tensor([0.3, 0.5, 0.2]))


@functools.cache
def _reference() -> tuple[torch.Tensor, torch.Tensor]:
    start = SIGMA_MAX * torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = d2f_core.fm_sigmas(2048, SIGMA_MAX, sigma_floor=SIGMA_MIN)
    return start, d2f_core.sample_heun(_clamped_velocity, start, grid)


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_every_sampler_converges_at_its_order_on_the_sigma_min_grid(name: str) -> None:
    """Halving the steps divides the error by 2^order: the stretch below sigma_min gets its share of the
    steps (a grid whose last step stayed sigma_min -> 0 at any step count stalls at that step's error)."""
    start, reference = _reference()
    errors = [
        float(
            (
                d2f_core.SAMPLERS[name](
                    _clamped_velocity, start, d2f_core.fm_sigmas(n, SIGMA_MAX, sigma_floor=SIGMA_MIN)
                )
                - reference
            )
            .pow(2)
            .mean()
            .sqrt()
        )
        for n in (64, 128, 256)
    ]
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(p - ORDERS[name]) < 0.3 for p in orders), (errors, orders)
