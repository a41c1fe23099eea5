"""Exactness: with the exactly optimal Gaussian-mixture denoiser, the converted velocity is the
exact FM velocity (docs/MATH.md sections 4 and 7), and the data estimate is the unpatched one."""

from __future__ import annotations

import pytest
import torch

import d2f_core
from d2f_core.tests.helpers import CASES, exactness_error, make_d2f, mixture, optimal_network
from d2f_core.tests.reference import comfy_denoised, fm_to_ve


@pytest.mark.parametrize("prediction,zsnr", CASES)
def test_converted_velocity_is_exact(prediction: str, zsnr: bool) -> None:
    assert exactness_error(prediction, zsnr) < 1e-6


@pytest.mark.parametrize("prediction,zsnr", CASES)
def test_denoised_equals_unpatched_model(prediction: str, zsnr: bool) -> None:
    """The alignment changes coordinates, not predictions: x0_hat equals ComfyUI's unpatched
    EPS / V_PREDICTION denoiser fed the same raw output at the same noise level."""
    d2f = make_d2f(prediction, zsnr)
    gen = torch.Generator().manual_seed(2)
    sigma = torch.linspace(d2f.sigma_min, min(d2f.sigma_max, 1 - 1e-3), 64, dtype=torch.float64)
    x = torch.randn(64, 3, 4, 4, generator=gen, dtype=torch.float64)
    out = torch.randn(64, 3, 4, 4, generator=gen, dtype=torch.float64)
    ours = d2f.denoised(out, x, sigma)
    x_ve = x / (1 - sigma)[:, None, None, None]  # the same noisy sample in ComfyUI's VE scale
    theirs = comfy_denoised(prediction, out, x_ve, fm_to_ve(sigma))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)
    # and the velocity is consistent with it: x0_hat = x - sigma * v
    v = d2f.velocity(out, x, sigma)
    torch.testing.assert_close(x - sigma[:, None, None, None] * v, ours, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction,zsnr", CASES)
def test_model_input_is_vp_state(prediction: str, zsnr: bool) -> None:
    """x_sigma / n(sigma) = a x0 + s eps with a, s of the table at that timestep."""
    d2f = make_d2f(prediction, zsnr)
    t = torch.tensor([0.0, 17.0, 250.5, 640.25, 998.0], dtype=torch.float64)
    sigma = d2f.sigma(t)
    gen = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    x_tau = d2f.model_input(d2f_core.interpolant(x0, eps, sigma), sigma)
    ac = d2f.alphas_cumprod[t.long()]
    frac = t != t.floor()
    a, s = ac.sqrt()[:, None], (1 - ac).sqrt()[:, None]
    torch.testing.assert_close(x_tau[~frac], (a * x0 + s * eps)[~frac], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prediction,zsnr", CASES)
def test_model_output_from_velocity_inverts_velocity(prediction: str, zsnr: bool) -> None:
    d2f = make_d2f(prediction, zsnr)
    gen = torch.Generator().manual_seed(4)
    sigma = torch.rand(16, generator=gen, dtype=torch.float64) * 0.99
    x, out = torch.randn(2, 16, 3, generator=gen, dtype=torch.float64)
    v = d2f.velocity(out, x, sigma)
    torch.testing.assert_close(d2f.model_output_from_velocity(v, x, sigma), out, rtol=1e-10, atol=1e-10)


def test_exactness_check_detects_a_one_step_table_offset() -> None:
    """The check is sharp: the reference code's one-step table offset (docs/MATH.md section 8) fails it."""
    d2f = make_d2f("eps", False)
    shifted = d2f_core.Diff2Flow(torch.cat([d2f.alphas_cumprod[1:], d2f.alphas_cumprod[-1:] * 0.99]), "eps")
    gmm = mixture()
    sigma = torch.linspace(0.05, 0.9, 200, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = d2f_core.interpolant(gmm.sample(200, gen), torch.randn(200, 6, generator=gen, dtype=torch.float64), sigma)
    network = optimal_network(gmm, d2f)  # optimal for the true table
    v = shifted.velocity_fn(network)(x, sigma)
    err = ((v - gmm.fm_velocity(x, sigma)).norm(dim=1) / gmm.fm_velocity(x, sigma).norm(dim=1)).max()
    assert err > 1e-4
