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

    settings = PairSettings(shape=(D, 1, 1), sigma_max=1.0, steps=100, seed=3, batch_size=512, teacher={"exact": "gaussian"})
    generate_pairs(teacher, [{}], tmp_path / "pairs", 4096, settings, shard_size=2048)
    pairs = load_pairs(tmp_path / "pairs")
    exact = mu[None, :, None, None] + S * pairs.noise
    ode_error = (pairs.latents - exact).pow(2).mean().sqrt().item()
    assert ode_error < 0.01, ode_error  # the teacher's 100 steps follow its affine map

    # the student: v-prediction with zero terminal SNR, so sampling starts at sigma = 1 from z itself
    d2f = d2f_core.Diff2Flow(d2f_core.rescale_zero_terminal_snr(d2f_core.scaled_linear()), "v")
    net = AffineStudent().requires_grad_(False)
    modules = select_target_modules(net, "all")
    adapters = {n: make_adapter("LoRA", m.weight.shape, 64, 64.0, torch.Generator().manual_seed(0)) for n, m in modules.items()}
    attach_parametrizations(modules, adapters)
    config = TrainConfig(objective="reflow", steps=1500, batch_size=256, learning_rate=3e-3, lr_schedule="cosine", rank=64,
                         alpha=64.0, weight_decay=0.0, seed=0)
    Trainer(net, adapters, d2f, config, pairs.training_data()).run()

    z = torch.randn(2000, D, 1, 1, generator=torch.Generator().manual_seed(99))
    reference = d2f_core.sample_euler(lambda x, s: teacher(x, s, {}), z, d2f_core.fm_sigmas(100))
    before = (one_step(lambda x, s: teacher(x, s, {}), z) - reference).pow(2).mean().sqrt().item()
    with torch.no_grad():
        after = (one_step(d2f.velocity_fn(net), z) - reference).pow(2).mean().sqrt().item()
    print(f"RMS error of 1 Euler step vs the teacher's 100 steps: before reflow {before:.4f}, after {after:.4f} "
          f"(100 steps vs the exact map: {ode_error:.4f})")
    assert abs(before - S) < 0.02  # one step of the teacher lands on the mean: error s per coordinate
    assert after < 0.05 * before, (before, after)
