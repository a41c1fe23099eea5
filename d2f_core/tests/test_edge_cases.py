"""docs/MATH.md section 5: finite everywhere a model type allows a sigma, clear errors elsewhere."""

from __future__ import annotations

import pytest
import torch

import d2f_core
from d2f_core.tests.helpers import CASES, make_d2f


def edge_sigmas(d2f: d2f_core.Diff2Flow) -> list[float]:
    m = d2f.sigma_max
    # every model type allows all of [0, 1]: above sigma_max the table-end rule applies (eps too)
    return [s for s in (0.0, 1e-6, m - 1e-6, m, m + 1e-6, 1 - 1e-6, 1.0) if s <= 1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prediction,zsnr", CASES)
def test_finite_at_edge_sigmas(prediction: str, zsnr: bool, dtype: torch.dtype, device: torch.device) -> None:
    d2f = make_d2f(prediction, zsnr)
    gen = torch.Generator().manual_seed(0)
    sigmas = edge_sigmas(d2f)
    x = torch.randn(len(sigmas), 4, 3, 3, generator=gen).to(device, dtype)
    out = torch.randn(len(sigmas), 4, 3, 3, generator=gen).to(device, dtype)
    sigma = torch.tensor(sigmas, dtype=dtype, device=device)
    t = d2f.timestep(sigma)
    assert torch.isfinite(t).all() and (t >= 0).all() and (t <= d2f.num_timesteps - 1).all()
    for result in (d2f.model_input(x, sigma), d2f.velocity(out, x, sigma), d2f.denoised(out, x, sigma)):
        assert result.dtype == dtype and result.device.type == device.type
        assert torch.isfinite(result).all(), f"non-finite at sigma in {sigmas}"
    # one sigma at a time too (scalar sigma, Python float)
    for i, s in enumerate(sigmas):
        assert torch.isfinite(d2f.velocity(out[i : i + 1], x[i : i + 1], s)).all()


def test_v_prediction_at_pure_noise_is_exact_formula() -> None:
    """At sigma = 1: n = 1, x_tau = x (pure noise), v = x + w (eps_hat = x, x0_hat = -w)."""
    d2f = make_d2f("v", True)
    x, w = torch.randn(2, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(d2f.velocity(w, x, 1.0), x + w)
    torch.testing.assert_close(d2f.denoised(w, x, 1.0), -w)


@pytest.mark.parametrize("method", ["velocity", "denoised"])
def test_eps_at_sigma_one_is_the_table_end_formula(method: str) -> None:
    """eps at sigma = 1 (where the closed form (e - x) / (1 - sigma) divides by 0; the table-end rule of
    docs/MATH.md section 10 applies instead): n(1) = 1, so the network saw x itself at timestep T-1
    and x0_hat = (x - s_T e) / a_T, v = x - x0_hat."""
    d2f = make_d2f("eps", False)
    x, e = torch.randn(2, 2, 3, dtype=torch.float64)
    a_t, s_t = d2f.alphas_cumprod[-1].sqrt(), (1 - d2f.alphas_cumprod[-1]).sqrt()
    x0_hat = (x - s_t * e) / a_t
    expected = {"denoised": x0_hat, "velocity": x - x0_hat}[method]
    torch.testing.assert_close(getattr(d2f, method)(e, x, torch.tensor([1.0, 1.0], dtype=torch.float64)), expected)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_sigma_outside_unit_interval_raises(bad: float) -> None:
    d2f = make_d2f("v", False)
    x = torch.randn(1, 3)
    with pytest.raises(ValueError, match=r"sigma must lie in \[0, 1\]"):
        d2f.velocity(x, x, torch.tensor([bad]))


def test_eps_with_zero_terminal_snr_raises() -> None:
    with pytest.raises(ValueError, match="eps-prediction cannot be used with a zero-terminal-SNR schedule"):
        d2f_core.Diff2Flow(d2f_core.rescale_zero_terminal_snr(d2f_core.scaled_linear()), "eps")


@pytest.mark.parametrize(
    "table,match",
    [
        (torch.tensor([0.9]), "at least 2"),
        (torch.tensor([0.9, 0.95]), "strictly decreasing"),
        (torch.tensor([1.0, 0.5]), "alphas_cumprod\\[0\\] must be < 1"),
        (torch.tensor([0.9, -0.1]), "lie in \\[0, 1\\]"),
        (torch.tensor([0.9, float("nan")]), "finite"),
    ],
)
def test_malformed_schedule_raises(table: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        d2f_core.Diff2Flow(table, "eps")


def test_unknown_prediction_raises() -> None:
    with pytest.raises(ValueError, match="prediction='x0' is not supported"):
        d2f_core.Diff2Flow(d2f_core.scaled_linear(), "x0")
    assert d2f_core.Diff2Flow(d2f_core.scaled_linear(), "v_prediction").prediction == "v"
    assert d2f_core.Diff2Flow(d2f_core.scaled_linear(), "epsilon").prediction == "eps"


def test_sigma_shape_mismatch_raises() -> None:
    d2f = make_d2f("v", False)
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"scalar or of shape \[B\] with B = 3"):
        d2f.velocity(x, x, torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("prediction,zsnr", CASES)
def test_low_precision_matches_float64(prediction: str, zsnr: bool, dtype: torch.dtype, device: torch.device) -> None:
    d2f = make_d2f(prediction, zsnr)
    gen = torch.Generator().manual_seed(5)
    sigma = torch.linspace(0.05, 0.9, 8, dtype=torch.float64)
    x, out = torch.randn(2, 8, 4, 4, 4, generator=gen, dtype=torch.float64)
    xd, od, sd = x.to(device, dtype), out.to(device, dtype), sigma.to(device, dtype)
    tol = {torch.float16: 2e-2, torch.bfloat16: 1.5e-1, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    v, x0 = d2f.velocity(od, xd, sd), d2f.denoised(od, xd, sd)
    assert v.dtype == dtype and x0.dtype == dtype
    # low-precision inputs are rounded before the (exact) conversion, so compare to the
    # float64 conversion of the rounded inputs: only the output rounding may differ
    ref_v = d2f.velocity(od.double().cpu(), xd.double().cpu(), sd.double().cpu())
    ref_x0 = d2f.denoised(od.double().cpu(), xd.double().cpu(), sd.double().cpu())
    torch.testing.assert_close(v.double().cpu(), ref_v, rtol=tol, atol=tol * ref_v.abs().max().item())
    torch.testing.assert_close(x0.double().cpu(), ref_x0, rtol=tol, atol=tol * ref_x0.abs().max().item())


def test_gradients_flow_through_conversion() -> None:
    d2f = make_d2f("eps", False)
    out = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(4, 3, requires_grad=True)
    d2f.velocity(out, x, torch.full((4,), 0.5)).sum().backward()
    torch.testing.assert_close(out.grad, torch.full((4, 3), 2.0))  # dv/de = 1 / (1 - sigma)
    torch.testing.assert_close(x.grad, torch.full((4, 3), -2.0))
