"""Per-sample losses (d2f_core.losses, docs/MATH.md section 6): the pseudo-Huber formula, its limits and
default c, the MSE path unchanged, and every objective taking the loss option."""

from __future__ import annotations

import math

import pytest
import torch

import d2f_core
from d2f_core.losses import LOSSES, check_loss, default_huber_c, mse, per_sample_loss, pseudo_huber
from d2f_core.objectives import evaluate_objective
from d2f_core.tests.helpers import make_d2f
from d2f_core.tests.nets import TinyDenoiser


def reference_pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(|r|^2 + c^2) - c of each sample, written out in float64."""
    r = prediction.double() - target.double()
    return (r.pow(2).sum(dim=tuple(range(1, r.ndim))) + c * c).sqrt() - c


def test_the_registry_names_mse_and_pseudo_huber() -> None:
    assert list(LOSSES) == ["mse", "pseudo_huber"] and all(LOSSES.values())
    assert d2f_core.LOSSES is LOSSES


@pytest.mark.parametrize("c", [0.01, 0.3, 5.0])
def test_pseudo_huber_is_the_formula(c: float) -> None:
    gen = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(5, 4, 6, 6, generator=gen), torch.randn(5, 4, 6, 6, generator=gen)
    prediction[1] = target[1]  # a perfect sample: loss 0
    got = pseudo_huber(prediction, target, c)
    assert got.dtype == torch.float32 and got.shape == (5,)
    torch.testing.assert_close(got.double(), reference_pseudo_huber(prediction, target, c), rtol=1e-6, atol=1e-7)
    assert got[1] == 0
    torch.testing.assert_close(per_sample_loss(prediction, target, "pseudo_huber", c), got, rtol=0, atol=0)


def test_the_default_c_is_0_00054_sqrt_of_the_values_per_sample() -> None:
    assert default_huber_c(4 * 64 * 64) == pytest.approx(0.00054 * 128)  # an SD1.5 latent at 512 px: 0.069
    assert default_huber_c(3 * 32 * 32) == pytest.approx(0.0299, abs=1e-4)  # CIFAR-10, the consistency papers' 0.03
    gen = torch.Generator().manual_seed(1)
    prediction, target = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    c = 0.00054 * math.sqrt(4 * 8 * 8)
    torch.testing.assert_close(pseudo_huber(prediction, target), pseudo_huber(prediction, target, c), rtol=0, atol=0)
    torch.testing.assert_close(
        pseudo_huber(prediction, target).double(), reference_pseudo_huber(prediction, target, c), rtol=1e-6, atol=0
    )
    assert not torch.equal(pseudo_huber(prediction, target), pseudo_huber(prediction, target, 2 * c))


def test_pseudo_huber_is_squared_error_over_2c_for_small_and_the_norm_for_large_residuals() -> None:
    """|r| << c: |r|^2 / (2c) = d * MSE / (2c), evaluated without cancellation (a difference of square roots
    would give 0 or noise here); |r| >> c: |r| - c, so |r| to the relative order c / |r|."""
    gen = torch.Generator().manual_seed(2)
    c, d = 0.05, 2 * 5 * 5
    direction = torch.randn(4, 2, 5, 5, generator=gen)
    for scale in (1e-3, 1e-6, 1e-12):
        r = direction * scale * c / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # |r| = scale * c
        small = pseudo_huber(r, torch.zeros_like(r), c)
        torch.testing.assert_close(small, d * mse(r, torch.zeros_like(r)) / (2 * c), rtol=2 * scale + 1e-6, atol=0)
        assert (small > 0).all()
    for scale in (1e3, 1e6):
        r = direction * scale * c / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        large = pseudo_huber(r, torch.zeros_like(r), c)
        torch.testing.assert_close(large, r.flatten(1).norm(dim=1), rtol=2 / scale, atol=0)


def test_pseudo_huber_gradient_has_norm_below_one_and_is_finite_at_zero() -> None:
    gen = torch.Generator().manual_seed(3)
    prediction = torch.randn(3, 4, 4, 4, generator=gen).requires_grad_(True)
    target = prediction.detach().clone()
    target[0] += 100.0  # far past c: gradient norm ~1
    pseudo_huber(prediction, target, 0.1).sum().backward()
    norms = prediction.grad.flatten(1).norm(dim=1)
    assert torch.isfinite(prediction.grad).all() and norms[0] == pytest.approx(1.0, abs=1e-4)
    assert norms[1] == 0 and norms[2] == 0  # a zero residual: no gradient (and no NaN)


def test_the_mse_path_is_the_mean_squared_error_in_float32_or_wider() -> None:
    """Bit for bit what the objectives computed before the loss option existed (stored expectations rely on it)."""
    gen = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        prediction = torch.randn(3, 4, 5, 5, generator=gen).to(dtype)
        target = torch.randn(3, 4, 5, 5, generator=gen).to(dtype)
        compute = torch.promote_types(dtype, torch.float32)
        before = (prediction.to(compute) - target.to(compute)).pow(2).flatten(1).mean(1)
        assert torch.equal(per_sample_loss(prediction, target), before)
        assert torch.equal(per_sample_loss(prediction, target, "mse", 0.0), before)
        assert per_sample_loss(prediction, target, "pseudo_huber").dtype == compute


def test_bad_losses_are_refused_by_name() -> None:
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="loss 'l1' is unknown: choose one of mse, pseudo_huber"):
        per_sample_loss(x, x, "l1")
    with pytest.raises(ValueError, match="huber_c must be a finite number >= 0"):
        check_loss("pseudo_huber", -0.1)
    with pytest.raises(ValueError, match="huber_c must be a finite number >= 0"):
        check_loss("pseudo_huber", float("nan"))
    with pytest.raises(ValueError, match="huber_c 0.1 is the c of loss pseudo_huber, but the loss is mse"):
        per_sample_loss(x, x, "mse", 0.1)


# ---------------------------------------------------------------------- every objective takes the option
def objective_case(objective: str, prediction: str = "v"):
    torch.manual_seed(0)
    d2f = make_d2f(prediction, False)
    net = TinyDenoiser(channels=4)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(6, 4, 8, 8, generator=gen)
    noise = torch.randn(6, 4, 8, 8, generator=gen)
    if d2f_core.get_objective(objective).times == "tau":
        times = torch.randint(0, d2f.num_timesteps, (6,), generator=gen)
    else:
        times = d2f_core.sample_training_sigmas(6, "uniform", d2f.sigma_max, generator=gen)
    return net, d2f, x0, noise, times


@pytest.mark.parametrize("objective", d2f_core.OBJECTIVES)
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_every_objective_reduces_its_residual_with_the_loss_option(objective: str, prediction: str) -> None:
    """The same prediction and target, reduced by MSE (the default), by the pseudo-Huber loss with the default
    c and with huber_c: each per-sample loss is the chosen loss of the objective's own (prediction, target)."""
    net, d2f, x0, noise, times = objective_case(objective, prediction)
    with torch.no_grad():
        default = evaluate_objective(objective, net, d2f, x0, noise, times)
        huber = evaluate_objective(objective, net, d2f, x0, noise, times, loss="pseudo_huber")
        huber_c = evaluate_objective(objective, net, d2f, x0, noise, times, loss="pseudo_huber", huber_c=0.5)
    torch.testing.assert_close(default.per_sample, mse(default.prediction, default.target), rtol=0, atol=0)
    torch.testing.assert_close(huber.prediction, default.prediction, rtol=0, atol=0)  # only the reduction changes
    torch.testing.assert_close(
        huber.per_sample.double(),
        reference_pseudo_huber(default.prediction, default.target, default_huber_c(4 * 8 * 8)),
        rtol=1e-6,
        atol=0,
    )
    torch.testing.assert_close(
        huber_c.per_sample.double(), reference_pseudo_huber(default.prediction, default.target, 0.5), rtol=1e-6, atol=0
    )
    assert huber.loss == huber.per_sample.mean() and huber_c.loss == huber_c.per_sample.mean()
    assert len({float(default.loss), float(huber.loss), float(huber_c.loss)}) == 3


@pytest.mark.parametrize("objective", d2f_core.OBJECTIVES)
def test_objective_loss_passes_the_loss_option_and_it_trains(objective: str) -> None:
    """objective_loss draws as always and reduces with the chosen loss; the pseudo-Huber loss has gradients."""
    net, d2f, x0, noise, _ = objective_case(objective)
    paired = noise if d2f_core.get_objective(objective).paired_noise else None

    def draw(**loss):
        gen = torch.Generator().manual_seed(6)
        return d2f_core.objective_loss(objective, net, d2f, x0, noise=paired, generator=gen, **loss)

    default, huber = draw(), draw(loss="pseudo_huber", huber_c=0.2)
    torch.testing.assert_close(huber.time, default.time, rtol=0, atol=0)
    torch.testing.assert_close(
        huber.per_sample.double(), reference_pseudo_huber(default.prediction, default.target, 0.2), rtol=1e-5, atol=0
    )
    huber.loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]  # (no conditioning: c_proj has none)
    assert len(grads) >= 6 and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
