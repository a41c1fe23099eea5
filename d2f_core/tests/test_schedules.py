"""Schedules: SD's scaled-linear table, DDPM linear, cosine, and zero-terminal-SNR rescaling."""

from __future__ import annotations

import math

import pytest
import torch

import d2f_core


def test_scaled_linear_is_sd_schedule() -> None:
    ac = d2f_core.scaled_linear()
    assert ac.dtype == torch.float64 and ac.shape == (1000,)
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(ac, torch.cumprod(1 - betas, 0), rtol=0, atol=0)
    assert ac[0].item() == pytest.approx(1 - 0.00085)
    assert ac[-1].item() == pytest.approx(0.0046601, rel=1e-4)  # k_max = 14.6146


@pytest.mark.parametrize("name", sorted(d2f_core.schedules.SCHEDULES))
def test_schedules_are_decreasing_tables(name: str) -> None:
    ac = d2f_core.schedules.SCHEDULES[name](steps=50)
    assert ac.dtype == torch.float64 and ac.shape == (50,)
    assert (ac[1:] < ac[:-1]).all() and (ac > 0).all() and (ac < 1).all()


def test_zero_terminal_snr_rescale() -> None:
    ac = d2f_core.scaled_linear()
    z = d2f_core.rescale_zero_terminal_snr(ac)
    assert z[-1].item() == 0.0
    torch.testing.assert_close(z[0], ac[0])
    assert (z[1:] < z[:-1]).all()
    # the rescale is affine in sqrt(alphas_cumprod)
    r = (z.sqrt() - z.sqrt()[-1])[:-1] / (ac.sqrt() - ac.sqrt()[-1])[:-1]
    torch.testing.assert_close(r, torch.full_like(r, r[0].item()))
    assert d2f_core.Diff2Flow(z, "v").sigma_max == 1.0


def test_discrete_sigmas_round_trip() -> None:
    ac = d2f_core.scaled_linear()
    k = ((1 - ac) / ac).sqrt()
    torch.testing.assert_close(d2f_core.schedules.alphas_cumprod_from_discrete_sigmas(k), ac, rtol=1e-14, atol=0)


def test_bad_steps_raise() -> None:
    with pytest.raises(ValueError, match="steps must be an integer >= 2"):
        d2f_core.scaled_linear(1)
