"""The multistep FM samplers (``ab2``, ``dpmpp_2m``; docs/MATH.md section 14) and the evaluation count
every sampler reports: order of convergence on the exact Gaussian-mixture velocity, exactness where the
multistep correction is exact (a test that fails when the correction is removed), straight paths, both
directions of the grid, the network evaluations a choice costs, low precision on a device."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import d2f_core
from d2f_core import GaussianMixture
from d2f_core.sampling import log_snr, sample_ab2, sample_dpmpp_2m, sample_euler

ORDERS = {"euler": 1, "heun": 2, "ab2": 2, "dpmpp_2m": 2}


def test_every_sampler_has_a_measured_order() -> None:
    assert set(ORDERS) == set(d2f_core.SAMPLERS)


def _overlapping_mixture() -> GaussianMixture:
    """Overlapping components: a smooth noise-to-data map (well-separated ones flip a few paths between
    components, and the RMS error then converges at half the order)."""
    means = torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]], dtype=torch.float64)
    return GaussianMixture(means, stds=torch.tensor([0.6, 0.7, 0.5]), weights=torch.tensor([0.3, 0.5, 0.2]))


def _log_snr_grid(steps: int, first: float = 0.9, last: float = 0.02) -> torch.Tensor:
    """Uniform in lambda = log((1 - sigma) / sigma) from ``first`` to ``last`` (every lambda finite)."""
    lam = torch.linspace(log_snr(first), log_snr(last), steps + 1, dtype=torch.float64)
    return torch.sigmoid(-lam)


@functools.cache
def _case(grid_name: str) -> tuple:
    """(grid, start, reference end points) of one convergence case: 128 noises, ``"log_snr"`` or the pairs' grid
    from sigma_max ``grid_name``; the reference is Heun at 1024 steps (its own error is below 1e-6, under 1 % of
    the smallest error measured)."""
    sigma_max = 1.0 if grid_name == "log_snr" else float(grid_name)

    def grid(steps: int) -> torch.Tensor:
        return _log_snr_grid(steps) if grid_name == "log_snr" else d2f_core.fm_sigmas(steps, sigma_max=sigma_max)

    z = torch.randn(128, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start = sigma_max * z
    return grid, start, d2f_core.sample_heun(_overlapping_mixture().fm_velocity, start, grid(1024))


def _errors(name: str, grid_name: str, steps: tuple[int, ...]) -> list[float]:
    grid, start, reference = _case(grid_name)
    velocity = _overlapping_mixture().fm_velocity
    return [float((d2f_core.SAMPLERS[name](velocity, start, grid(n)) - reference).pow(2).mean().sqrt()) for n in steps]


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_error_shrinks_at_the_samplers_order_on_a_log_snr_grid(name: str) -> None:
    """Exact mixture velocity, sigma 0.9 -> 0.02 uniform in log-SNR: each halving of the step divides the
    error by 2^order (the multistep samplers without their correction are first order: this fails)."""
    errors = _errors(name, "log_snr", (32, 64, 128))
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(p - ORDERS[name]) < 0.15 for p in orders), (errors, orders)


@pytest.mark.parametrize("sigma_max", [1.0, 0.936])
@pytest.mark.parametrize("name", sorted(ORDERS))
def test_error_shrinks_at_the_samplers_order_on_the_pairs_grid(name: str, sigma_max: float) -> None:
    """The grid pairs use (uniform in sigma down to 0) from pure noise at 1 (lambda = -inf: a flow model)
    and from SD's sigma_max. DPM-Solver++(2M)'s log-SNR steps do not shrink at the two ends of this grid,
    which costs it a logarithmic factor (observed order 1.8 at 64 -> 128 steps); the others are clean."""
    errors = _errors(name, str(sigma_max), (64, 128))
    order = math.log2(errors[0] / errors[1])
    low = ORDERS[name] - (0.25 if name == "dpmpp_2m" else 0.1)
    assert low < order < ORDERS[name] + 0.3, (errors, order)


# ------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("name", sorted(ORDERS))
@pytest.mark.parametrize("sigma_max", [1.0, 0.936])
def test_straight_paths_are_exact_for_every_sampler(name: str, sigma_max: float) -> None:
    """A point mass at mu: the exact velocity (x - mu) / sigma is constant along every (straight) path, the
    data estimate is mu everywhere, so every sampler lands on mu exactly at any step count (the reflowed
    ideal; docs/MATH.md section 12)."""
    mu = torch.tensor([[1.5, -0.5, 2.0]], dtype=torch.float64)
    gmm = GaussianMixture(mu, stds=0.0)
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for steps in (1, 2, 3, 7):
        out = d2f_core.SAMPLERS[name](gmm.fm_velocity, sigma_max * z, d2f_core.fm_sigmas(steps, sigma_max))
        torch.testing.assert_close(out, mu.expand_as(out), rtol=0, atol=1e-12)


def _after_first_step(sampler, velocity, x, sigmas) -> tuple[torch.Tensor, torch.Tensor]:
    """(the end point, the state after the first step): a multistep sampler's first step has no history."""
    seen: dict[int, torch.Tensor] = {}
    out = sampler(velocity, x, sigmas, callback=lambda info: seen.setdefault(int(info["i"]), info["x"]))
    return out, seen[1]


@pytest.mark.parametrize("increasing", [False, True], ids=["noise_to_data", "data_to_noise"])
def test_ab2_is_exact_where_the_velocity_is_affine_in_sigma(increasing: bool) -> None:
    """dx/dsigma = a + b sigma (x quadratic in sigma along the path): from its second step on, Adams-Bashforth 2
    integrates it exactly, so the end point is the exact flow of the state after the first step. Euler is not
    (the test fails without the multistep correction)."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return a + b * sigma[:, None]

    sigmas = torch.tensor([0.95, 0.8, 0.7, 0.45, 0.3, 0.12, 0.0], dtype=torch.float64)
    if increasing:
        sigmas = sigmas.flip(0)
    s1, s_end = float(sigmas[1]), float(sigmas[-1])

    def exact_from(x1: torch.Tensor) -> torch.Tensor:
        return x1 + a * (s_end - s1) + b * (s_end**2 - s1**2) / 2

    x = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    out, x1 = _after_first_step(sample_ab2, velocity, x, sigmas)
    torch.testing.assert_close(out, exact_from(x1), rtol=0, atol=1e-12)
    euler, e1 = _after_first_step(sample_euler, velocity, x, sigmas)
    assert (euler - exact_from(e1)).abs().max() > 1e-2


@pytest.mark.parametrize("increasing", [False, True], ids=["noise_to_data", "data_to_noise"])
def test_dpmpp_2m_is_exact_where_the_data_estimate_is_affine_in_log_snr(increasing: bool) -> None:
    """The linear ODE dx/dsigma = (x - (A + B lambda(sigma))) / sigma: its data estimate A + B lambda is affine in
    lambda, which DPM-Solver++(2M) integrates exactly from its second step on (docs/MATH.md section 14):
    x_t = (t / s) x_s + t [e^lambda (A + B (lambda - 1))] from lambda_s to lambda_t. Euler (the step without the
    multistep correction) is not exact."""
    gen = torch.Generator().manual_seed(4)
    big_a, big_b = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        lam = torch.log((1 - sigma) / sigma)[:, None]
        return (x - (big_a + big_b * lam)) / sigma[:, None]

    sigmas = torch.tensor([0.9, 0.75, 0.7, 0.5, 0.33, 0.2, 0.08], dtype=torch.float64)
    if increasing:
        sigmas = sigmas.flip(0)
    s1, s_end = float(sigmas[1]), float(sigmas[-1])

    def primitive(sigma: float) -> torch.Tensor:
        lam = log_snr(sigma)
        return math.exp(lam) * (big_a + big_b * (lam - 1))

    def exact_from(x1: torch.Tensor) -> torch.Tensor:
        return (s_end / s1) * x1 + s_end * (primitive(s_end) - primitive(s1))

    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    out, x1 = _after_first_step(sample_dpmpp_2m, velocity, x, sigmas)
    torch.testing.assert_close(out, exact_from(x1), rtol=0, atol=1e-12)
    euler, e1 = _after_first_step(sample_euler, velocity, x, sigmas)
    assert (euler - exact_from(e1)).abs().max() > 1e-2


def test_dpmpp_2m_first_step_and_step_to_zero_are_euler() -> None:
    """Where lambda is infinite (sigma = 1 at the start, sigma = 0 at the end) there is no correction: the first
    two steps from sigma = 1 and the last step (which returns the data estimate x - sigma v) are Euler steps."""
    gmm = _overlapping_mixture()
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sigmas = d2f_core.fm_sigmas(2, 1.0)
    torch.testing.assert_close(
        sample_dpmpp_2m(gmm.fm_velocity, z, sigmas), sample_euler(gmm.fm_velocity, z, sigmas), rtol=0, atol=1e-14
    )
    seen: list[dict] = []
    out = sample_dpmpp_2m(gmm.fm_velocity, 0.9 * z, d2f_core.fm_sigmas(5, 0.9), callback=seen.append)
    torch.testing.assert_close(out, seen[-1]["denoised"], rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------ cost
@pytest.mark.parametrize("name", sorted(ORDERS))
@pytest.mark.parametrize("sigma_max", [1.0, 0.936])
def test_evaluations_are_the_velocity_calls_and_none_is_at_sigma_zero(name: str, sigma_max: float) -> None:
    """``Sampler.evaluations(steps)`` is what the sampler spends on an FM grid (the count the pairs' table and the
    nodes state), and no sampler evaluates the model at sigma = 0 (ComfyUI's flow velocity divides by sigma)."""
    sampler = d2f_core.SAMPLERS[name]
    gmm = _overlapping_mixture()
    for steps in (1, 2, 3, 10):
        called: list[float] = []

        def velocity(x: torch.Tensor, sigma: torch.Tensor, called=called) -> torch.Tensor:
            called.append(float(sigma[0]))
            return gmm.fm_velocity(x, sigma)

        sampler(velocity, torch.randn(4, 2, dtype=torch.float64), d2f_core.fm_sigmas(steps, sigma_max))
        assert len(called) == sampler.evaluations(steps), (steps, called)
        assert min(called) > 0
    with pytest.raises(ValueError, match="positive integer"):
        sampler.evaluations(0)


def test_evaluation_counts() -> None:
    assert {name: s.evaluations(10) for name, s in d2f_core.SAMPLERS.items()} == {
        "euler": 10,
        "heun": 19,
        "ab2": 10,
        "dpmpp_2m": 10,
    }


@pytest.mark.parametrize("name", ["ab2", "dpmpp_2m"])
def test_multistep_sampler_runs_on_device_in_low_precision(name: str, device: torch.device) -> None:
    gmm = _overlapping_mixture()

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return gmm.fm_velocity(x.cpu(), sigma.cpu()).to(x.device, torch.float32)

    z = torch.randn(6, 2, device=device)
    for dtype in (torch.float32, torch.bfloat16):
        out = d2f_core.SAMPLERS[name](velocity, z.to(dtype), d2f_core.fm_sigmas(6, 1.0))
        assert out.dtype == dtype and out.device.type == device.type and torch.isfinite(out).all()
