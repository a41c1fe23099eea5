"""Reflow on a case with a known answer (docs/MATH.md section 12): Gaussian data N(mu, s^2 I).

The teacher is the exact FM velocity of that data (``d2f_core.GaussianMixture`` with one
component). Its ODE maps the noise z to ``mu + s z``: the pairs come from 100 Euler steps of it
(training/pairs.py). Before reflow, one Euler step of the teacher lands on the data mean ``mu``
(error ``s`` per coordinate). A small v-prediction network, converted by the alignment and
trained with the ``reflow`` objective on the pairs through ``training.Trainer``, learns the
straight field, and its single Euler step lands on the teacher's 100-step result.

Measured (CPU, the seeds below): RMS error of 1 Euler step vs the teacher's 100 steps 0.492 before
reflow, 0.017 after (1500 training steps); the 100-step result itself is 0.007 from the exact map
``mu + s z`` (Euler's discretisation error).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import d2f_core
from d2f_core.lora import attach_parametrizations, make_adapter, select_target_modules
from d2f_core.tests.nets import timestep_embedding
from training import TrainConfig, Trainer
from training.pairs import PairSettings, generate_pairs, load_pairs

pytestmark = pytest.mark.slow  # trains students to convergence (1500 steps): 15-21 s on 2 cores

D, S = 8, 0.5  # dimensions, data standard deviation (not 1, so the teacher's map is not the identity)


class AffineStudent(nn.Module):
    """``w = alpha(t) * x_in + beta(t)``: a v-prediction network whose family holds the reflowed field
    of Gaussian data (linear in x with a scalar slope); alpha and beta come from an MLP of the
    timestep embedding. Data shaped [B, D, 1, 1] as latents."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1 + D))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.mlp(timestep_embedding(t, 32))
        return out[:, :1, None, None] * x + out[:, 1:, None, None]


@pytest.fixture
def one_thread():
    """The network's operations are far smaller than a thread pool's synchronisation (measured: 10x
    slower with 2 threads on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_step(velocity, z: torch.Tensor) -> torch.Tensor:
    return d2f_core.sample_euler(velocity, z, d2f_core.fm_sigmas(1))


def test_reflow_straightens_gaussian_data_so_one_euler_step_is_the_ode_map(tmp_path, one_thread) -> None:
    mu = torch.randn(D, generator=torch.Generator().manual_seed(1))
    gaussian = d2f_core.GaussianMixture(mu[None], stds=S)

    def teacher(x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        return gaussian.fm_velocity(x.flatten(1), sigma).reshape(x.shape).to(x.dtype)

    settings = PairSettings(
        shape=(D, 1, 1), sigma_max=1.0, steps=100, seed=3, batch_size=512, teacher={"exact": "gaussian"}
    )
    generate_pairs(teacher, [{}], tmp_path / "pairs", 4096, settings, shard_size=2048)
    pairs = load_pairs(tmp_path / "pairs")
    exact = mu[None, :, None, None] + S * pairs.noise
    ode_error = (pairs.latents - exact).pow(2).mean().sqrt().item()
    assert ode_error < 0.01, ode_error  # the teacher's 100 steps follow its affine map

    # the student: v-prediction with zero terminal SNR, so sampling starts at sigma = 1 from z itself
    d2f = d2f_core.Diff2Flow(d2f_core.rescale_zero_terminal_snr(d2f_core.scaled_linear()), "v")
    net = AffineStudent().requires_grad_(False)
    modules = select_target_modules(net, "all")
    adapters = {
        n: make_adapter("LoRA", m.weight.shape, 64, 64.0, torch.Generator().manual_seed(0)) for n, m in modules.items()
    }
    attach_parametrizations(modules, adapters)
    config = TrainConfig(
        objective="reflow",
        steps=1500,
        batch_size=256,
        learning_rate=3e-3,
        lr_schedule="cosine",
        rank=64,
        alpha=64.0,
        weight_decay=0.0,
        seed=0,
    )
    Trainer(net, adapters, d2f, config, pairs.training_data()).run()

    z = torch.randn(2000, D, 1, 1, generator=torch.Generator().manual_seed(99))
    reference = d2f_core.sample_euler(lambda x, s: teacher(x, s, {}), z, d2f_core.fm_sigmas(100))
    before = (one_step(lambda x, s: teacher(x, s, {}), z) - reference).pow(2).mean().sqrt().item()
    with torch.no_grad():
        after = (one_step(d2f.velocity_fn(net), z) - reference).pow(2).mean().sqrt().item()
    print(
        f"RMS error of 1 Euler step vs the teacher's 100 steps: before reflow {before:.4f}, after {after:.4f} "
        f"(100 steps vs the exact map: {ode_error:.4f})"
    )
    assert abs(before - S) < 0.02  # one step of the teacher lands on the mean: error s per coordinate
    assert after < 0.05 * before, (before, after)


@pytest.mark.parametrize(
    "teacher_zsnr, student_zsnr",
    [(False, True), (True, False)],
    ids=["sd_teacher_zsnr_student", "zsnr_teacher_sd_student"],
)
def test_a_student_of_another_sigma_max_learns_the_teachers_map_from_its_own_start(
    tmp_path, one_thread, teacher_zsnr, student_zsnr
) -> None:
    """Pairs of a teacher starting at ``sigma_max_t * z`` trained into a student that starts at its own
    ``sigma_max_s * z`` (zero terminal SNR on one side only): through ``load_pairs(...).training_data()``
    and ``Trainer`` as a library user runs them, the student's 1- and 2-step samples from its own start
    land on the teacher's map ``z -> x0`` (docs/MATH.md section 12).

    Measured (CPU, the seeds below; RMS error in units of the data's spread s, 1 / 2 steps): 0.034 / 0.014
    (SD teacher, zero-terminal-SNR student) and 0.040 / 0.014 (the reverse). Lines through the teacher's
    start instead (the student's start ignored): 0.044 / 0.056 and 0.081 / 0.061."""
    mu = torch.randn(D, generator=torch.Generator().manual_seed(1))
    gaussian = d2f_core.GaussianMixture(mu[None], stds=S)

    def teacher(x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        return gaussian.fm_velocity(x.flatten(1), sigma).reshape(x.shape).to(x.dtype)

    def alignment(zsnr: bool) -> d2f_core.Diff2Flow:
        schedule = d2f_core.scaled_linear()
        return d2f_core.Diff2Flow(d2f_core.rescale_zero_terminal_snr(schedule) if zsnr else schedule, "v")

    teacher_d2f, d2f = alignment(teacher_zsnr), alignment(student_zsnr)
    settings = PairSettings(
        shape=(D, 1, 1),
        sigma_max=teacher_d2f.sigma_max,
        steps=100,
        seed=3,
        batch_size=512,
        teacher={"exact": "gaussian"},
    )
    generate_pairs(teacher, [{}], tmp_path / "pairs", 4096, settings, shard_size=2048)
    pairs = load_pairs(tmp_path / "pairs")

    net = AffineStudent().requires_grad_(False)
    modules = select_target_modules(net, "all")
    adapters = {
        n: make_adapter("LoRA", m.weight.shape, 64, 64.0, torch.Generator().manual_seed(0)) for n, m in modules.items()
    }
    attach_parametrizations(modules, adapters)
    config = TrainConfig(
        objective="reflow",
        steps=1500,
        batch_size=256,
        learning_rate=3e-3,
        lr_schedule="cosine",
        rank=64,
        alpha=64.0,
        weight_decay=0.0,
        seed=0,
        zero_terminal_snr=student_zsnr,
    )
    Trainer(net, adapters, d2f, config, pairs.training_data()).run()

    z = torch.randn(1000, D, 1, 1, generator=torch.Generator().manual_seed(99))
    # the teacher's map from the same z, as the pairs were made: 100 steps from sigma_max_t * z
    reference = d2f_core.sample_euler(
        lambda x, s: teacher(x, s, {}),
        teacher_d2f.sigma_max * z,
        d2f_core.fm_sigmas(100, sigma_max=teacher_d2f.sigma_max),
    )
    errors = {}
    with torch.no_grad():
        for steps in (1, 2):
            sampled = d2f_core.sample_euler(
                d2f.velocity_fn(net), d2f.sigma_max * z, d2f_core.fm_sigmas(steps, sigma_max=d2f.sigma_max)
            )
            errors[steps] = (sampled - reference).pow(2).mean().sqrt().item() / S
    print(
        f"student sigma_max {d2f.sigma_max:.3f}, teacher {teacher_d2f.sigma_max:.3f}: RMS error of 1 / 2 steps vs the "
        f"teacher's map, in units of the data's spread: {errors[1]:.4f} / {errors[2]:.4f}"
    )
    assert errors[1] < 0.05 and errors[2] < 0.03, errors
