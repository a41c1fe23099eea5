"""FM sigma grids, Euler / Heun samplers and classifier-free guidance."""

from __future__ import annotations

import pytest
import torch

import d2f_core
from d2f_core import GaussianMixture
from d2f_core.metrics import sliced_wasserstein
from d2f_core.tests.helpers import make_d2f
from d2f_core.tests.nets import TinyDenoiser


def test_uniform_grid() -> None:
    torch.testing.assert_close(d2f_core.fm_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    g = d2f_core.fm_sigmas(10, sigma_max=0.93596)
    assert g[0].item() == pytest.approx(0.93596) and g[-1] == 0 and len(g) == 11
    torch.testing.assert_close(g[:-1] - g[1:], torch.full((10,), 0.093596, dtype=torch.float64))


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("sigma_max", [1.0, 0.93596])
def test_shifted_grid_starts_at_sigma_max_and_decreases(shift: float, sigma_max: float) -> None:
    g = d2f_core.fm_sigmas(12, sigma_max=sigma_max, shift=shift)
    assert g[0].item() == pytest.approx(sigma_max, abs=1e-12) and g[-1] == 0
    assert (g[1:] < g[:-1]).all()


def test_shift_matches_sd3_formula_and_inverse() -> None:
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(d2f_core.time_shift(u, 3.0), 3 * u / (1 + 2 * u))
    torch.testing.assert_close(d2f_core.inverse_time_shift(d2f_core.time_shift(u, 3.0), 3.0), u)
    torch.testing.assert_close(
        d2f_core.fm_sigmas(10, shift=3.0), d2f_core.time_shift(torch.linspace(1, 0, 11, dtype=torch.float64), 3.0)
    )
    with pytest.raises(ValueError, match="shift must be > 0"):
        d2f_core.fm_sigmas(4, shift=0)


def test_denoise_grid_equals_comfyui_cut_of_longer_grid() -> None:
    """denoise = 0.5 over 10 steps is the last 11 sigmas of the 20-step grid (ComfyUI KSampler)."""
    full = d2f_core.fm_sigmas(20, sigma_max=0.9, shift=2.0)
    cut = d2f_core.fm_sigmas(10, sigma_max=0.9, shift=2.0, denoise=0.5)
    torch.testing.assert_close(cut, full[10:])


@pytest.mark.parametrize(
    "kwargs,match",
    [({"steps": 0}, "steps"), ({"steps": 4, "denoise": 0}, "denoise"), ({"steps": 4, "sigma_max": 1.2}, "sigma_max")],
)
def test_grid_rejects_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        d2f_core.fm_sigmas(**kwargs)


def _two_moons_mixture() -> GaussianMixture:
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64)
    return GaussianMixture(means, stds=torch.tensor([0.3, 0.4, 0.25]), weights=torch.tensor([0.3, 0.5, 0.2]))


def test_euler_converges_to_the_data() -> None:
    """200 FM Euler steps of the exact velocity from pure noise land on the data distribution:
    the sliced W2 distance to fresh data is at the level of data-vs-data sampling noise."""
    gmm = _two_moons_mixture()
    gen = torch.Generator().manual_seed(0)
    n = 4000
    noise = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    samples = d2f_core.sample_euler(gmm.fm_velocity, noise, d2f_core.fm_sigmas(200))
    data, data2 = gmm.sample(n, gen), gmm.sample(n, gen)
    floor = sliced_wasserstein(data, data2)
    dist = sliced_wasserstein(samples, data)
    assert dist < 0.06 and dist < 2.5 * floor + 0.02, (dist, floor)
    assert sliced_wasserstein(noise, data) > 0.5  # the metric does tell noise from data


def test_heun_is_more_accurate_than_euler_at_equal_steps() -> None:
    gmm = _two_moons_mixture()
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(512, 2, generator=gen, dtype=torch.float64)
    reference = d2f_core.sample_heun(gmm.fm_velocity, noise, d2f_core.fm_sigmas(400))
    err = {}
    for name in ("euler", "heun"):
        out = d2f_core.SAMPLERS[name](gmm.fm_velocity, noise, d2f_core.fm_sigmas(16))
        err[name] = float((out - reference).norm(dim=1).mean())
    assert err["heun"] < 0.5 * err["euler"], err


def test_euler_with_converted_network_and_callback() -> None:
    torch.manual_seed(0)
    d2f = make_d2f("v", False)
    net = TinyDenoiser(channels=2)
    seen = []
    x = torch.randn(2, 2, 8, 8)
    out = d2f_core.sample_euler(d2f.velocity_fn(net), x, d2f_core.fm_sigmas(5, d2f.sigma_max), callback=seen.append)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert [c["i"] for c in seen] == list(range(5))
    torch.testing.assert_close(seen[0]["denoised"], seen[0]["x"] - seen[0]["sigma"].item() * seen[0]["velocity"])


def test_img2img_start_is_the_interpolant() -> None:
    x0, noise = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    start = d2f_core.interpolant(x0, noise, 0.4)
    torch.testing.assert_close(start, 0.6 * x0 + 0.4 * noise)
    per_sample = d2f_core.interpolant(x0, noise, torch.tensor([0.4, 0.8], dtype=torch.float64))
    torch.testing.assert_close(per_sample[1], 0.2 * x0[1] + 0.8 * noise[1])


def test_cfg_combines_velocities_in_one_batched_call() -> None:
    calls = []

    def velocity(x, sigma, c):
        calls.append(x.shape[0])
        return x * c[:, None]

    x = torch.ones(3, 2)
    cond, uncond = torch.full((3,), 2.0), torch.full((3,), 0.5)
    guided = d2f_core.cfg_velocity(velocity, cond, uncond, scale=4.0)
    torch.testing.assert_close(guided(x, torch.full((3,), 0.5)), torch.full((3, 2), 0.5 + 4.0 * 1.5))
    assert calls == [6]
    plain = d2f_core.cfg_velocity(velocity, cond, uncond, scale=1.0)
    torch.testing.assert_close(plain(x, torch.full((3,), 0.5)), torch.full((3, 2), 2.0))
    assert calls == [6, 3]


def test_cfg_with_dict_conditioning_concatenates_every_entry() -> None:
    """SDXL-style conditioning (context and y) is batched entry by entry."""

    def velocity(x, sigma, c):
        return x * c["context"][:, None] + c["y"][:, None]

    x = torch.ones(2, 2)
    cond = {"context": torch.full((2,), 2.0), "y": torch.full((2,), 1.0)}
    uncond = {"context": torch.full((2,), 0.5), "y": torch.zeros(2)}
    guided = d2f_core.cfg_velocity(velocity, cond, uncond, scale=3.0)
    torch.testing.assert_close(guided(x, torch.full((2,), 0.5)), torch.full((2, 2), 0.5 + 3.0 * 2.5))
    with pytest.raises(ValueError, match="same keys"):
        d2f_core.cfg_velocity(velocity, cond, {"context": torch.zeros(2)}, scale=3.0)


def test_cfg_on_velocity_equals_cfg_on_denoised_and_raw_output() -> None:
    """The conversion is affine in the network output (docs/MATH.md section 4)."""
    d2f = make_d2f("eps", False)
    x, oc, ou = torch.randn(3, 4, 5, dtype=torch.float64)
    sigma, w = torch.full((4,), 0.6, dtype=torch.float64), 5.0
    v_cfg = d2f.velocity(ou, x, sigma) + w * (d2f.velocity(oc, x, sigma) - d2f.velocity(ou, x, sigma))
    raw_cfg = d2f.velocity(ou + w * (oc - ou), x, sigma)
    x0_cfg = d2f.denoised(ou, x, sigma) + w * (d2f.denoised(oc, x, sigma) - d2f.denoised(ou, x, sigma))
    torch.testing.assert_close(v_cfg, raw_cfg)
    torch.testing.assert_close(x - sigma[:, None] * v_cfg, x0_cfg)


def test_sampler_runs_on_device_in_low_precision(device: torch.device) -> None:
    torch.manual_seed(0)
    d2f = make_d2f("eps", False)
    net = TinyDenoiser(channels=2).to(device)
    x = torch.randn(2, 2, 8, 8, device=device)
    cond = torch.randn(2, 4, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        out = d2f_core.sample_heun(
            d2f_core.cfg_velocity(d2f.velocity_fn(net), cond, torch.zeros_like(cond), 3.0),
            x.to(dtype),
            d2f_core.fm_sigmas(4, d2f.sigma_max),
        )
        assert out.dtype == dtype and out.device.type == device.type and torch.isfinite(out).all()
