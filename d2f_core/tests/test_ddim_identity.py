"""Zero-shot identity: an FM Euler step of the converted model from sigma to sigma' is one DDIM
(eta = 0) step between the mapped timesteps, for ANY network (docs/MATH.md section 4)."""

from __future__ import annotations

import pytest
import torch

import d2f_core
from d2f_core.tests.helpers import CASES, make_d2f
from d2f_core.tests.nets import TinyDenoiser
from d2f_core.tests.reference import ddim_step, oracle_sigma_fm


@pytest.mark.parametrize("prediction,zsnr", CASES)
def test_fm_euler_step_equals_ddim_step(prediction: str, zsnr: bool) -> None:
    torch.manual_seed(0)
    net = TinyDenoiser(channels=2).double()
    d2f = make_d2f(prediction, zsnr)
    # the identity holds where the timestep is not clamped: sigma in [sigma_min, sigma_max]
    grid = d2f_core.fm_sigmas(7, sigma_max=d2f.sigma_max, shift=2.0)[:-1]
    grid = torch.cat([grid, torch.tensor([d2f.sigma_min], dtype=torch.float64)])
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    for sigma, sigma_next in zip(grid[:-1], grid[1:]):
        s = sigma.expand(3)
        fm = d2f_core.sample_euler(d2f.velocity_fn(net), x, torch.stack([sigma, sigma_next]))
        # DDIM, written independently in VP coordinates at the mapped timesteps
        t, t_next = d2f.timestep(s), d2f.timestep(sigma_next.expand(3))
        sig_t, sig_n = oracle_sigma_fm(d2f.alphas_cumprod, t), oracle_sigma_fm(d2f.alphas_cumprod, t_next)
        ac = ((1 - sig_t) ** 2) / ((1 - sig_t) ** 2 + sig_t**2)
        ac_next = ((1 - sig_n) ** 2) / ((1 - sig_n) ** 2 + sig_n**2)
        n = torch.sqrt(sig_t**2 + (1 - sig_t) ** 2)[:, None, None, None]
        n_next = torch.sqrt(sig_n**2 + (1 - sig_n) ** 2)[:, None, None, None]
        x_tau = x / n
        with torch.no_grad():
            out = net(x_tau, t)
        ddim = ddim_step(prediction, out, x_tau, ac, ac_next) * n_next
        torch.testing.assert_close(fm, ddim, rtol=1e-11, atol=1e-11)
        x = fm
