"""The top of an SD schedule (docs/MATH.md section 10): sigmas above sigma_max and the start rule.

Above sigma_max the network runs at timestep T-1 on ``x / n(sigma)`` and its output is read with
the table end's coefficients; with the exactly optimal Gaussian-mixture network that makes
``x0_hat`` the posterior mean of the table's last level at that input, computed here
independently from ``alphas_cumprod[-1]`` and d2f_core.GaussianMixture.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import d2f_core
from d2f_core.tests.helpers import make_d2f, mixture, optimal_network

ROOT = pathlib.Path(__file__).resolve().parents[2]


def table_end(d2f: d2f_core.Diff2Flow) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a_T, s_T)`` of the last table entry, straight from alphas_cumprod."""
    ac_end = d2f.alphas_cumprod[-1]
    return ac_end.sqrt(), (1 - ac_end).sqrt()


def above_sigmas(d2f: d2f_core.Diff2Flow) -> torch.Tensor:
    m = d2f.sigma_max
    return torch.tensor([m + 1e-9, 0.94, 0.95, 0.97, 0.99, 1 - 1e-9, 1.0], dtype=torch.float64)


def noisy_states(gmm, sigma: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x0 = gmm.sample(len(sigma), gen)
    return d2f_core.interpolant(x0, torch.randn(x0.shape, generator=gen, dtype=torch.float64), sigma)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_velocity_above_sigma_max_is_the_table_end_velocity(prediction: str) -> None:
    d2f = make_d2f(prediction, False)
    gmm = mixture()
    sigma = above_sigmas(d2f)
    x = noisy_states(gmm, sigma)
    v = d2f.velocity_fn(optimal_network(gmm, d2f))(x, sigma)
    a_t, s_t = table_end(d2f)
    n = torch.sqrt(sigma**2 + (1 - sigma) ** 2)[:, None]
    x0_table_end = gmm.posterior_mean(x / n, a_t, s_t)
    expected = (x - x0_table_end) / sigma[:, None]
    assert torch.isfinite(v).all()
    assert rel_err(v, expected) < 1e-12
    # the same data estimate for eps and v: the conversion is consistent, not model specific
    x0 = x - sigma[:, None] * v
    assert rel_err(x0, x0_table_end) < 1e-12


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_each_call_is_consistent_on_its_own(prediction: str) -> None:
    """ComfyUI calls calculate_input, timestep and calculate_denoised separately: each must give
    the table end's input / timestep / conversion above sigma_max, for any network output."""
    d2f = make_d2f(prediction, False)
    sigma = above_sigmas(d2f)
    gen = torch.Generator().manual_seed(3)
    x, out = torch.randn(2, len(sigma), 5, generator=gen, dtype=torch.float64)
    a_t, s_t = table_end(d2f)
    n = torch.sqrt(sigma**2 + (1 - sigma) ** 2)[:, None]
    assert (d2f.timestep(sigma) == d2f.num_timesteps - 1).all()
    torch.testing.assert_close(d2f.model_input(x, sigma), x / n, rtol=1e-14, atol=0)
    x_in = x / n
    x0 = (x_in - s_t * out) / a_t if prediction == "eps" else a_t * x_in - s_t * out
    torch.testing.assert_close(d2f.denoised(out, x, sigma), x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d2f.velocity(out, x, sigma), (x - x0) / sigma[:, None], rtol=1e-12, atol=1e-12)
    # network_inputs (used by velocity_fn) agrees with the separate calls
    x_in2, t = d2f.network_inputs(x, sigma)
    torch.testing.assert_close(x_in2, x_in, rtol=1e-14, atol=0)
    assert (t == d2f.num_timesteps - 1).all()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_continuous_at_sigma_max_and_unchanged_below(prediction: str) -> None:
    d2f = make_d2f(prediction, False)
    gen = torch.Generator().manual_seed(4)
    m = d2f.sigma_max
    x, out = torch.randn(2, 1, 5, generator=gen, dtype=torch.float64).expand(2, 3, 5)  # one state, three sigmas
    sigma = torch.tensor([m, m + 1e-12, m * (1 - 1e-12)], dtype=torch.float64)
    v = d2f.velocity(out, x, sigma)
    torch.testing.assert_close(v[1], v[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(v[2], v[0], rtol=1e-9, atol=1e-9)
    # inside the table the closed forms in sigma (docs/MATH.md section 3) are untouched
    s = torch.linspace(0, m, 7, dtype=torch.float64)
    x, out = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    nn = torch.sqrt(s**2 + (1 - s) ** 2)[:, None]
    s_ = s[:, None]
    if prediction == "eps":
        closed = (out - x) / (1 - s_)
    else:
        closed = (2 * s_ - 1) * x / nn**2 + out / nn
    torch.testing.assert_close(d2f.velocity(out, x, s), closed, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_model_output_from_velocity_inverts_above_sigma_max(prediction: str) -> None:
    d2f = make_d2f(prediction, False)
    sigma = above_sigmas(d2f)
    gen = torch.Generator().manual_seed(5)
    x, out = torch.randn(2, len(sigma), 4, generator=gen, dtype=torch.float64)
    v = d2f.velocity(out, x, sigma)
    torch.testing.assert_close(d2f.model_output_from_velocity(v, x, sigma), out, rtol=1e-10, atol=1e-10)


def test_eps_gradients_finite_at_pure_noise() -> None:
    """No NaN from the unused branch of the table-end switch: d v / d e = -c_o = s_T / a_T at 1."""
    d2f = make_d2f("eps", False)
    out = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    d2f.velocity(out, x, torch.tensor([0.5, 1.0], dtype=torch.float64)).sum().backward()
    a_t, s_t = table_end(d2f)
    torch.testing.assert_close(out.grad[0], torch.full((3,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(out.grad[1], (s_t / a_t).expand(3))
    assert torch.isfinite(x.grad).all()


def test_zero_terminal_snr_is_unaffected() -> None:
    """sigma_max = 1: nothing lies above the table; the closed forms hold up to sigma = 1."""
    d2f = make_d2f("v", True)
    assert d2f.sigma_max == 1.0
    gen = torch.Generator().manual_seed(6)
    s = torch.tensor([0.9, 0.99, 1 - 1e-9, 1.0], dtype=torch.float64)
    x, w = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    nn = torch.sqrt(s**2 + (1 - s) ** 2)[:, None]
    closed = (2 * s[:, None] - 1) * x / nn**2 + w / nn
    torch.testing.assert_close(d2f.velocity(w, x, s), closed, rtol=1e-14, atol=1e-14)


def test_comfyui_style_near_zero_snr_uses_the_table_end() -> None:
    """ComfyUI's own rescale leaves alphas_cumprod[-1] = 4.9e-8 (sigma_max = 0.99978): the rule
    covers the sliver above it, finite and consistent up to 1."""
    ac = d2f_core.rescale_zero_terminal_snr(d2f_core.scaled_linear())
    ac[-1] = 4.9e-8
    d2f = d2f_core.Diff2Flow(ac, "v")
    assert d2f.zero_terminal_snr and d2f.sigma_max < 1
    gen = torch.Generator().manual_seed(7)
    x, w = torch.randn(2, 2, 5, generator=gen, dtype=torch.float64)
    a_t, s_t = table_end(d2f)
    sigma = torch.tensor([0.99990, 1.0], dtype=torch.float64)
    n = torch.sqrt(sigma**2 + (1 - sigma) ** 2)[:, None]
    x0 = a_t * x / n - s_t * w
    torch.testing.assert_close(d2f.denoised(w, x, sigma), x0, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- the start rule
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_start_noise_changes_only_the_first_sigma(steps: int, shift: float) -> None:
    m = make_d2f("eps", False).sigma_max
    default = d2f_core.fm_sigmas(steps, m, shift=shift)
    noise = d2f_core.fm_sigmas(steps, m, shift=shift, start="noise")
    assert default[0].item() == pytest.approx(m, abs=1e-12) and noise[0].item() == 1.0
    assert len(noise) == len(default) == steps + 1
    assert torch.equal(noise[1:], default[1:])


def test_start_noise_is_a_no_op_where_there_is_no_gap() -> None:
    for kwargs in ({"sigma_max": 1.0}, {"sigma_max": 0.93596, "denoise": 0.6}, {"sigma_max": 1.0, "shift": 3.0}):
        torch.testing.assert_close(
            d2f_core.fm_sigmas(8, start="noise", **kwargs), d2f_core.fm_sigmas(8, **kwargs), rtol=0, atol=1e-15
        )


def test_unknown_start_rule_raises() -> None:
    with pytest.raises(ValueError, match=r"start='top' is not a start rule: use one of 'sigma_max', 'noise'"):
        d2f_core.fm_sigmas(4, 0.9, start="top")


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_start_noise_changes_only_the_first_step(prediction: str) -> None:
    """Same evaluations at the same sigmas after the first step; the first step goes from pure
    noise z at sigma = 1 to g1 z + (1 - g1) x0_T(z) (the table end's posterior mean: a DDIM
    step), where the sigma_max start gives g1 z + (1 - g1 / sigma_max) x0_T(sigma_max z / n_T)."""
    d2f = make_d2f(prediction, False)
    gmm = mixture()
    velocity = d2f.velocity_fn(optimal_network(gmm, d2f))
    z = torch.randn(64, gmm.dim, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    runs = {}
    for start in d2f_core.START_RULES:
        sigmas = d2f_core.fm_sigmas(5, d2f.sigma_max, start=start)
        seen: list[dict] = []
        out = d2f_core.sample_euler(velocity, sigmas[0].item() * z, sigmas, callback=seen.append)
        runs[start] = (sigmas, seen, out)
    (g_max, seen_max, _), (g_noise, seen_noise, out_noise) = runs["sigma_max"], runs["noise"]
    assert [s["sigma"].item() for s in seen_noise[1:]] == [s["sigma"].item() for s in seen_max[1:]]
    assert len(seen_noise) == len(seen_max) == 5
    a_t, s_t = table_end(d2f)
    g1, m = g_noise[1].item(), d2f.sigma_max
    n_t = (m**2 + (1 - m) ** 2) ** 0.5
    after_noise = g1 * z + (1 - g1) * gmm.posterior_mean(z, a_t, s_t)
    after_max = g1 * z + (1 - g1 / m) * gmm.posterior_mean(m * z / n_t, a_t, s_t)
    torch.testing.assert_close(seen_noise[1]["x"], after_noise, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seen_max[1]["x"], after_max, rtol=1e-12, atol=1e-12)
    # from there on both are the same sampler on the same grid
    torch.testing.assert_close(
        d2f_core.sample_euler(velocity, after_noise, g_max[1:]), out_noise, rtol=1e-12, atol=1e-12
    )


# ---------------------------------------------------------------------- the benchmark
def test_start_rule_benchmark_quick_prints_the_table() -> None:
    """`python benchmarks/start_rule.py --quick` from the repository root, without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/start_rule.py", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = re.findall(r"^\| (eps|v) \| (\d+) \| (.+) \|$", proc.stdout, flags=re.M)
    assert [(p, int(n)) for p, n, _ in rows] == [(p, n) for p in ("eps", "v") for n in (4, 8, 20)]
    values = {(p, int(n)): [float(c) for c in re.findall(r"(\d+\.\d+) \(", cells)] for p, n, cells in rows}
    for key, cells in values.items():
        assert len(cells) == 4 and all(0 < c < 10 for c in cells), (key, cells)
    # eps and v are both exact conversions of the same optimal network: the same samples
    for n in (4, 8, 20):
        torch.testing.assert_close(torch.tensor(values["eps", n]), torch.tensor(values["v", n]), rtol=1e-3, atol=1e-4)
    assert re.search(r"'noise' beats 'sigma_max' \(SW\) at every step count.*: (yes|no)", proc.stdout)
