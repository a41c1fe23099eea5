"""Inverting the probability-flow ODE (d2f_core/inversion.py) on the exact Gaussian-mixture teacher:
an image inverted and then sampled with the same sampler returns to itself within the sampler's error,
which shrinks at the sampler's order as the steps double (docs/MATH.md section 12)."""

from __future__ import annotations

import math

import pytest
import torch

import d2f_core
from d2f_core import GaussianMixture

MIXTURE = GaussianMixture(
    torch.tensor([[1.0, -0.5, 0.3, 2.0], [-1.0, 0.8, -0.2, -1.0], [0.2, 0.2, 1.5, 0.0]]),
    torch.tensor([0.4, 0.5, 0.3]),
)
ORDER = {"euler": 1, "heun": 2, "ab2": 2, "dpmpp_2m": 2}


def round_trip_error(sampler: str, steps: int, sigma_max: float, x0: torch.Tensor) -> float:
    """The median over images of the RMS distance of an image from sampling its inversion back (the same
    grid, the same sampler). The median, as the RMS over all images is ruled by a few whose coarse steps
    cross between the mixture's components, where the map is steep (Euler's RMS ratios scatter 1.5-3)."""
    sigmas = d2f_core.fm_sigmas(steps, sigma_max=sigma_max)
    top = d2f_core.invert(sampler, MIXTURE.fm_velocity, x0, sigmas)
    back = d2f_core.get_sampler(sampler)(MIXTURE.fm_velocity, top, sigmas)
    return (back - x0).pow(2).mean(1).sqrt().median().item()


@pytest.mark.parametrize("sigma_max", [1.0, 0.935958])
@pytest.mark.parametrize("sampler", list(ORDER))
def test_an_inverted_image_samples_back_to_itself_at_the_samplers_order(sampler: str, sigma_max: float) -> None:
    """Measured (median over 256 images of a spread of about 1, sigma_max 1) at 16 / 32 / 64 / 128 steps:
    Euler 0.107 / 0.054 / 0.027 / 0.0136, Heun 5.2e-3 / 1.2e-3 / 3.0e-4 / 7.2e-5, AB2 6.4e-3 / 1.5e-3 /
    3.6e-4 / 8.6e-5, DPM++(2M) 1.2e-2 / 1.7e-3 / 3.2e-4 / 7.4e-5 (sigma_max 0.936: Euler 0.098 / 0.049 / 0.025 /
    0.0124, Heun 4.6e-3 / 1.1e-3 / 2.6e-4 / 6.3e-5, AB2 5.9e-3 / 1.4e-3 / 3.3e-4 / 8.0e-5, DPM++(2M) 8.0e-3 /
    7.7e-4 / 1.3e-4 / 3.1e-5). Ratios per doubling 1.98-2.0 (Euler), 4.1-4.3 (Heun, AB2); DPM++(2M) shrinks
    faster at first (7.2 / 5.4, 10.4 / 6.1) and at its order from 64 steps on (4.1-4.3)."""
    x0 = MIXTURE.sample(256, torch.Generator().manual_seed(1))
    errors = [round_trip_error(sampler, steps, sigma_max, x0) for steps in (16, 32, 64, 128)]
    bound = {"euler": 0.15, "heun": 0.008, "ab2": 0.008, "dpmpp_2m": 0.015}[sampler]
    assert errors[0] < bound, errors  # within the sampler's error at 16 steps already
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    order = ORDER[sampler]
    assert all(r > 0.8 * 2**order for r in ratios), (errors, ratios)  # shrinks at least at its order
    assert 0.8 * 2**order < ratios[-1] < 1.25 * 2**order, (errors, ratios)
    # the measured order, from the last doubling
    assert math.log2(ratios[-1]) == pytest.approx(order, abs=0.2)


def test_inversion_is_the_samplers_step_on_the_reversed_grid() -> None:
    """One Euler inversion step from the data is x0 + sigma_1 * v(x0, 0) (v(x, 0) = -x for a density)."""
    x0 = MIXTURE.sample(8, torch.Generator().manual_seed(2))
    top = d2f_core.invert("euler", MIXTURE.fm_velocity, x0, d2f_core.fm_sigmas(1, sigma_max=0.5))
    torch.testing.assert_close(top, x0 + 0.5 * (-x0))
    torch.testing.assert_close(MIXTURE.fm_velocity(x0, 0.0), -x0)
    with pytest.raises(ValueError, match="needs every std > 0"):
        GaussianMixture(torch.zeros(2, 4)).fm_velocity(x0, 0.0)


def test_every_registered_sampler_inverts_or_is_refused_by_name() -> None:
    """Every SAMPLERS entry: listed as invertible (and so covered by the order test above), or refused with
    a message naming the samplers that can invert."""
    assert set(d2f_core.INVERTIBLE_SAMPLERS) <= set(d2f_core.SAMPLERS)
    assert set(d2f_core.INVERTIBLE_SAMPLERS) == set(ORDER)  # each listed one has its order tested
    x0 = MIXTURE.sample(4, torch.Generator().manual_seed(3))
    for name in d2f_core.SAMPLERS:
        if name in d2f_core.INVERTIBLE_SAMPLERS:
            assert torch.isfinite(d2f_core.invert(name, MIXTURE.fm_velocity, x0, d2f_core.fm_sigmas(4))).all()
        else:
            with pytest.raises(ValueError, match=f"sampler '{name}' cannot run the ODE backwards.*use one of euler"):
                d2f_core.invert(name, MIXTURE.fm_velocity, x0, d2f_core.fm_sigmas(4))
    fake = d2f_core.Sampler("one_way", d2f_core.sample_euler, 1, "reads sigma as a noise level")
    with pytest.MonkeyPatch.context() as patch:  # a sampler not checked for running backwards is refused
        patch.setitem(d2f_core.SAMPLERS, "one_way", fake)
        with pytest.raises(ValueError, match="sampler 'one_way' cannot run the ODE backwards.*use one of euler, heun"):
            d2f_core.invert("one_way", MIXTURE.fm_velocity, x0, d2f_core.fm_sigmas(4))
    with pytest.raises(ValueError, match="sampler 'nope' is unknown"):
        d2f_core.check_invertible("nope")
    with pytest.raises(ValueError, match="decreasing to 0"):
        d2f_core.invert("euler", MIXTURE.fm_velocity, x0, d2f_core.fm_sigmas(4).flip(0))
