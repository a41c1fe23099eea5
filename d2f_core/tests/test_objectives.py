"""Training objectives (docs/MATH.md section 6): finite losses and gradients, optimality, weights."""

from __future__ import annotations

import math

import pytest
import torch

import d2f_core
from d2f_core import GaussianMixture
from d2f_core.tests.helpers import CASES, make_d2f, mixture, optimal_network
from d2f_core.tests.nets import TinyDenoiser
from d2f_core.tests.reference import oracle_sigma_fm


@pytest.mark.parametrize("objective", d2f_core.OBJECTIVES)
@pytest.mark.parametrize("prediction,zsnr", CASES)
def test_objectives_give_finite_loss_and_gradients(
    objective: str, prediction: str, zsnr: bool, device: torch.device
) -> None:
    torch.manual_seed(0)
    d2f = make_d2f(prediction, zsnr)
    net = TinyDenoiser(channels=4).to(device)
    x0 = torch.randn(6, 4, 8, 8, device=device)
    cond = torch.randn(6, 4, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    paired = torch.randn(x0.shape, device=device) if d2f_core.get_objective(objective).paired_noise else None
    for sampling in d2f_core.TIMESTEP_SAMPLERS:
        out = d2f_core.objective_loss(
            objective, net, d2f, x0, cond, noise=paired, timestep_sampling=sampling, generator=gen
        )
        net.zero_grad()
        out.loss.backward()
        assert torch.isfinite(out.loss) and out.loss > 0 and out.per_sample.shape == (6,)
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


def test_objective_loss_is_reproducible_with_generator() -> None:
    torch.manual_seed(0)
    d2f = make_d2f("v", False)
    net = TinyDenoiser(channels=2)
    x0 = torch.randn(4, 2, 6, 6)
    a = d2f_core.objective_loss("diff2flow", net, d2f, x0, generator=torch.Generator().manual_seed(7)).loss
    b = d2f_core.objective_loss("diff2flow", net, d2f, x0, generator=torch.Generator().manual_seed(7)).loss
    c = d2f_core.objective_loss("diff2flow", net, d2f, x0, generator=torch.Generator().manual_seed(8)).loss
    assert a == b and a != c


def test_unknown_objective_and_sampler_raise() -> None:
    d2f = make_d2f("eps", False)
    with pytest.raises(ValueError, match="objective 'x0' is unknown: choose one of diff2flow, naive_fm, diffusion"):
        d2f_core.objective_loss("x0", lambda x, t: x, d2f, torch.zeros(1, 2))
    with pytest.raises(ValueError, match="timestep sampling 'beta' is unknown"):
        d2f_core.sample_training_sigmas(4, "beta")


def test_diff2flow_loss_is_velocity_mse_of_converted_output() -> None:
    """The loss is computed in velocity space from the raw output (no division of x0 by sigma)."""
    torch.manual_seed(0)
    d2f = make_d2f("eps", False)
    net = TinyDenoiser(channels=2).double()
    x0, noise = torch.randn(2, 5, 2, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.93], dtype=torch.float64)
    out = d2f_core.diff2flow_loss(net, d2f, x0, noise, sigma)
    x = (1 - sigma)[:, None, None, None] * x0 + sigma[:, None, None, None] * noise
    n = torch.sqrt(sigma**2 + (1 - sigma) ** 2)[:, None, None, None]
    e = net(x / n, d2f.timestep(sigma))
    v = (e - x) / (1 - sigma)[:, None, None, None]
    torch.testing.assert_close(out.per_sample, (v - (noise - x0)).pow(2).flatten(1).mean(1))


@pytest.mark.parametrize("prediction,zsnr", CASES)
def test_optimal_denoiser_is_the_irreducible_minimum(prediction: str, zsnr: bool) -> None:
    """With the exactly optimal denoiser the diff2flow loss does not drop under perturbations
    of its output (scale, bias, a fixed random field, each in both directions)."""
    d2f = make_d2f(prediction, zsnr)
    gmm = mixture(dim=4)
    gen = torch.Generator().manual_seed(3)
    n = 40000
    x0 = gmm.sample(n, gen)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    sigma = d2f_core.sample_training_sigmas(n, "uniform", d2f.sigma_max, generator=gen).double()
    optimal = optimal_network(gmm, d2f)
    field = torch.randn(1, 4, generator=gen, dtype=torch.float64)
    base = d2f_core.diff2flow_loss(optimal, d2f, x0, noise, sigma).loss.item()
    for delta in (-0.05, 0.05):
        for perturb in (
            lambda out, delta=delta: out * (1 + delta),
            lambda out, delta=delta: out + delta,
            lambda out, delta=delta: out + delta * field,
        ):
            loss = d2f_core.diff2flow_loss(
                lambda x, t, perturb=perturb: perturb(optimal(x, t)), d2f, x0, noise, sigma
            ).loss.item()
            assert loss > base, (delta, loss, base)


def test_v_loss_weight_identity() -> None:
    """|v - v_true|^2 = (a + s)^2 |w - w_true|^2 for v-prediction (weight between 1 and 2)."""
    d2f = make_d2f("v", False)
    gen = torch.Generator().manual_seed(0)
    sigma = torch.rand(32, generator=gen, dtype=torch.float64) * d2f.sigma_max
    x0, noise, w = torch.randn(3, 32, 6, generator=gen, dtype=torch.float64)
    x = d2f_core.interpolant(x0, noise, sigma)
    a, s, _ = d2f.vp_coefficients(sigma)
    w_true = a[:, None] * noise - s[:, None] * x0
    lhs = (d2f.velocity(w, x, sigma) - (noise - x0)).pow(2).sum(1)
    rhs = (a + s) ** 2 * (w - w_true).pow(2).sum(1)
    torch.testing.assert_close(lhs, rhs)
    assert ((a + s) ** 2 >= 1 - 1e-12).all() and ((a + s) ** 2 <= 2 + 1e-12).all()


def test_eps_loss_weight_identity() -> None:
    """|v - v_true|^2 = |e - eps|^2 / (1 - sigma)^2 for eps-prediction."""
    d2f = make_d2f("eps", False)
    gen = torch.Generator().manual_seed(0)
    sigma = torch.rand(32, generator=gen, dtype=torch.float64) * d2f.sigma_max
    x0, noise, e = torch.randn(3, 32, 6, generator=gen, dtype=torch.float64)
    x = d2f_core.interpolant(x0, noise, sigma)
    lhs = (d2f.velocity(e, x, sigma) - (noise - x0)).pow(2).sum(1)
    torch.testing.assert_close(lhs, (e - noise).pow(2).sum(1) / (1 - sigma) ** 2)


def test_diffusion_loss_targets() -> None:
    d2f_eps, d2f_v = make_d2f("eps", False), make_d2f("v", False)
    x0, noise = torch.randn(2, 3, 5, dtype=torch.float64)
    tau = torch.tensor([0, 500, 999])
    seen = {}

    def net(x_tau, t):
        seen["x"], seen["t"] = x_tau, t
        return torch.zeros_like(x_tau)

    out = d2f_core.diffusion_loss(net, d2f_eps, x0, noise, tau)
    ac = d2f_eps.alphas_cumprod[tau][:, None]
    torch.testing.assert_close(seen["x"], ac.sqrt() * x0 + (1 - ac).sqrt() * noise)
    torch.testing.assert_close(seen["t"], tau.float())
    torch.testing.assert_close(out.target, noise)
    out_v = d2f_core.diffusion_loss(net, d2f_v, x0, noise, tau)
    torch.testing.assert_close(out_v.target, ac.sqrt() * noise - (1 - ac).sqrt() * x0)


def test_naive_fm_feeds_interpolant_at_T_sigma() -> None:
    seen = {}

    def net(x, t):
        seen["x"], seen["t"] = x, t
        return x

    x0, noise = torch.randn(2, 2, 3, dtype=torch.float64)
    sigma = torch.tensor([0.25, 0.5])
    d2f_core.naive_fm_loss(net, x0, noise, sigma)
    torch.testing.assert_close(seen["t"], torch.tensor([250.0, 500.0]))
    torch.testing.assert_close(seen["x"], d2f_core.interpolant(x0, noise, sigma))


@pytest.mark.parametrize("method", d2f_core.TIMESTEP_SAMPLERS)
def test_timestep_samplers_cover_the_range(method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    s = d2f_core.sample_training_sigmas(20000, method, 0.93596, generator=gen, shift=3.0)
    assert s.dtype == torch.float32 and (s > 0).all() and (s <= 0.93596 + 1e-7).all()
    u = s.double() / 0.93596
    if method == "uniform":
        assert abs(u.mean().item() - 0.5) < 0.01
    elif method == "logit_normal":
        assert abs(torch.logit(u).mean().item()) < 0.03 and abs(torch.logit(u).std().item() - 1) < 0.03
    elif method == "shift":  # shift 3 moves the median of u to 3 * 0.5 / 2 = 0.75
        assert abs(u.median().item() - 0.75) < 0.01
    else:  # u_shaped: symmetric about 1/2, with P(u < 0.1) = F(0.1) = 0.5 + sinh(-1.6) / (2 sinh 2) = 0.1718
        assert method == "u_shaped" and abs(u.mean().item() - 0.5) < 0.01
        assert abs((u < 0.1).double().mean().item() - 0.1718) < 0.01


# ---------------------------------------------------------------------- the U-shaped timestep distribution
def u_shaped_cdf(u: torch.Tensor, a: float = 4.0) -> torch.Tensor:
    """F(u) = 1/2 + sinh(a (u - 1/2)) / (2 sinh(a / 2)): the integral of a cosh(a (u - 1/2)) / (2 sinh(a / 2))."""
    return 0.5 + torch.sinh(a * (u - 0.5)) / (2 * math.sinh(a / 2))


def test_u_shaped_quantile_inverts_the_cdf_to_the_ends() -> None:
    p = torch.linspace(0, 1, 20001, dtype=torch.float64)
    u = d2f_core.u_shaped_quantile(p)
    torch.testing.assert_close(u_shaped_cdf(u), p, rtol=0, atol=1e-15)
    closed_form = 0.5 + torch.asinh((2 * p - 1) * math.sinh(2.0)) / 4.0
    torch.testing.assert_close(u, closed_form, rtol=0, atol=1e-15)
    assert u[0] == 0 and u[-1] == 1 and (u[1:] > u[:-1]).all()
    # near 0 the closed form cancels to 0; the quantile keeps u = p / density(0) = p * 2 sinh(2) / (4 cosh(2))
    tiny = torch.tensor([2.0**-53, 1e-30, 1e-300], dtype=torch.float64)
    torch.testing.assert_close(d2f_core.u_shaped_quantile(tiny), tiny * math.tanh(2.0) / 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(d2f_core.u_shaped_quantile(1 - p), 1 - u, rtol=0, atol=1e-15)  # symmetric


def test_u_shaped_draws_follow_the_density() -> None:
    """200 000 draws with a fixed generator: the histogram of sigma / sigma_max over 40 bins passes a
    chi-square test against the cosh density (critical value of 39 degrees of freedom at the 0.1 % level:
    72.1), the Kolmogorov-Smirnov distance is within its 0.1 % bound, and the draws are far from uniform."""
    n, bins, sigma_max = 200_000, 40, 0.93596
    gen = torch.Generator().manual_seed(24)
    sigma = d2f_core.sample_training_sigmas(n, "u_shaped", sigma_max, generator=gen)
    assert sigma.dtype == torch.float32 and (sigma > 0).all() and (sigma <= sigma_max).all()
    u = (sigma.double() / sigma_max).clamp(max=1.0)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    expected = n * (u_shaped_cdf(edges[1:]) - u_shaped_cdf(edges[:-1]))
    observed = torch.histc(u, bins=bins, min=0.0, max=1.0).double()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 72.1, chi2
    ordered = u.sort().values
    ranks = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float(
        torch.maximum((ranks - u_shaped_cdf(ordered)).abs(), (ranks - 1 / n - u_shaped_cdf(ordered)).abs()).max()
    )
    assert ks < 1.95 / math.sqrt(n), ks
    assert float((ranks - ordered).abs().max()) > 0.05  # the uniform distribution is rejected by far
    # the ends 3.8x as dense as the middle
    assert observed[0] / observed[bins // 2] == pytest.approx(math.cosh(2.0), rel=0.1)


def test_u_shaped_draws_are_one_uniform_per_sample_from_the_generator() -> None:
    """Deterministic from the generator, and the generator advances exactly as for the uniform sampling (the
    draw order noise -> times that resumes and the engine tests rely on stays intact)."""
    a = d2f_core.sample_training_sigmas(64, "u_shaped", 1.0, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    b = d2f_core.sample_training_sigmas(64, "u_shaped", 1.0, generator=gen)
    assert torch.equal(a, b)
    uniform_gen = torch.Generator().manual_seed(3)
    uniform = d2f_core.sample_training_sigmas(64, "uniform", 1.0, generator=uniform_gen)
    assert torch.equal(gen.get_state(), uniform_gen.get_state())
    expected = d2f_core.u_shaped_quantile(uniform.double()).float()  # the same uniforms, through the quantile
    torch.testing.assert_close(a, expected, rtol=0, atol=2e-7)


def test_validation_loss_is_comparable_across_models() -> None:
    """The same data scored through a diffusion model (converted) and a naive-FM model: the
    exact velocity scores the irreducible loss, and both paths use the fixed grid and noise."""
    assert d2f_core.validation_sigmas(8).tolist() == [(i + 0.5) / 8 for i in range(8)]
    gmm = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), stds=0.2)
    x0 = gmm.sample(2000, torch.Generator().manual_seed(0))
    exact = d2f_core.fm_validation_loss(gmm.fm_velocity, x0)
    zero = d2f_core.fm_validation_loss(lambda x, s: torch.zeros_like(x), x0)
    assert len(exact["per_segment"]) == 8 and exact["mean"] < zero["mean"]
    assert d2f_core.fm_validation_loss(gmm.fm_velocity, x0) == exact  # fixed noise: deterministic
    d2f = make_d2f("v", False)
    converted = d2f_core.fm_validation_loss(d2f.velocity_fn(optimal_network(gmm, d2f)), x0)
    # inside [sigma_min, sigma_max] the converted optimal model scores the same per segment
    for s, a, b in zip(exact["sigmas"], exact["per_segment"], converted["per_segment"]):
        if s <= d2f.sigma_max:
            assert math.isclose(a, b, rel_tol=1e-6)
    naive = d2f_core.fm_validation_loss(d2f_core.naive_fm_velocity_fn(lambda x, t: gmm.fm_velocity(x, t / 1000)), x0)
    assert naive["per_segment"] == pytest.approx(exact["per_segment"], rel=1e-6)


@pytest.mark.parametrize("prediction,zsnr", CASES)
def test_reflow_loss_equals_a_hand_written_reference_on_the_pairs(prediction: str, zsnr: bool) -> None:
    """reflow on given pairs (z, x0): the straight line between them, target z - x0, the velocity from
    the raw output by the closed forms of docs/MATH.md section 3, written out here (not d2f_core's)."""
    torch.manual_seed(0)
    d2f = make_d2f(prediction, zsnr)
    net = TinyDenoiser(channels=2).double()
    gen = torch.Generator().manual_seed(4)
    x0, z = torch.randn(2, 5, 2, 4, 4, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.93], dtype=torch.float64)
    record = d2f_core.get_objective("reflow")
    assert record.paired_noise and record.flow_model == "diff2flow" and record.cfg == 1.0
    out = record.loss(net, d2f, x0, z, sigma)
    s4 = sigma[:, None, None, None]
    x = (1 - s4) * x0 + s4 * z
    n = torch.sqrt(s4**2 + (1 - s4) ** 2)
    raw = net(x / n, oracle_timestep(d2f, sigma))
    v = (raw - x) / (1 - s4) if prediction == "eps" else (2 * s4 - 1) * x / n**2 + raw / n
    torch.testing.assert_close(out.per_sample, (v - (z - x0)).pow(2).flatten(1).mean(1))
    torch.testing.assert_close(out.target, z - x0)
    # through the registry's draw: only sigma is drawn; the pair's z becomes the noise end of the line through
    # this model's own start sigma_max * z (z itself with zero terminal SNR; docs/MATH.md section 12)
    drawn, drawn_sigma = record.draw(x0, d2f, torch.Generator().manual_seed(1), z)
    assert drawn_sigma.shape == (5,) and (drawn_sigma <= d2f.sigma_max).all()
    sigma_max = d2f.sigma_max
    torch.testing.assert_close(drawn, z - (1 - sigma_max) / sigma_max * x0)
    torch.testing.assert_close((1 - sigma_max) * x0 + sigma_max * drawn, sigma_max * z)
    assert (drawn is z) == zsnr


def oracle_timestep(d2f: d2f_core.Diff2Flow, sigma: torch.Tensor) -> torch.Tensor:
    """The fractional timestep whose reference-interpolated noise level is ``sigma`` (bisection on
    the reference interpolation of d2f_core/tests/reference.py, not on d2f_core's inverse)."""
    low = torch.zeros_like(sigma)
    high = torch.full_like(sigma, d2f.num_timesteps - 1.0)
    for _ in range(60):
        mid = (low + high) / 2
        below = oracle_sigma_fm(d2f.alphas_cumprod, mid) < sigma
        low, high = torch.where(below, mid, low), torch.where(below, high, mid)
    return (low + high) / 2


def test_reflow_refuses_data_without_pairs() -> None:
    d2f = make_d2f("v", False)
    with pytest.raises(ValueError, match="objective 'reflow' trains on \\(noise, image\\) pairs.*pairs folder"):
        d2f_core.objective_loss("reflow", TinyDenoiser(channels=2), d2f, torch.zeros(2, 2, 4, 4))
    with pytest.raises(
        ValueError, match="paired noise of shape \\(2, 2, 4, 4\\) does not match the latents \\(2, 2, 4, 2\\)"
    ):
        d2f_core.get_objective("reflow").draw(torch.zeros(2, 2, 4, 2), d2f, None, torch.zeros(2, 2, 4, 4))
