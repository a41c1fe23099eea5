"""Shared cases for the d2f_core tests: the model types every check covers and the exactly
optimal Gaussian-mixture network (docs/MATH.md section 7)."""

from __future__ import annotations

import torch

import d2f_core
from d2f_core import GaussianMixture
from d2f_core.tests.reference import oracle_sigma_fm

# (prediction, zero terminal SNR): the three cases every exactness check covers.
CASES = [("eps", False), ("v", False), ("v", True)]


def make_d2f(prediction: str, zsnr: bool) -> d2f_core.Diff2Flow:
    ac = d2f_core.scaled_linear()
    if zsnr:
        ac = d2f_core.rescale_zero_terminal_snr(ac)
    return d2f_core.Diff2Flow(ac, prediction)


def mixture(dim: int = 6, seed: int = 0) -> GaussianMixture:
    gen = torch.Generator().manual_seed(seed)
    means = 2.0 * torch.randn(3, dim, generator=gen, dtype=torch.float64)
    return GaussianMixture(means, stds=torch.tensor([0.3, 0.6, 0.9]), weights=torch.tensor([0.5, 0.3, 0.2]))


def optimal_network(gmm: GaussianMixture, d2f: d2f_core.Diff2Flow):
    """The exactly optimal diffusion network at timestep t, its noise level read off the table by
    the reference interpolation (not by d2f_core)."""

    def network(x_tau: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = oracle_sigma_fm(d2f.alphas_cumprod, t)
        n = torch.sqrt(sigma**2 + (1 - sigma) ** 2)
        a, s = (1 - sigma) / n, sigma / n
        if d2f.prediction == "eps":
            return gmm.optimal_eps(x_tau, a, s)
        return gmm.optimal_v(x_tau, a, s)

    return network


def sigma_grid(d2f: d2f_core.Diff2Flow) -> torch.Tensor:
    dense = torch.linspace(d2f.sigma_min, d2f.sigma_max, 2001, dtype=torch.float64)
    return torch.cat([dense, d2f.sigma(torch.arange(d2f.num_timesteps, dtype=torch.float64))])


def exactness_error(prediction: str, zsnr: bool, dtype: torch.dtype = torch.float64) -> float:
    """Worst relative error |v - v_exact| / |v_exact| over sigma in [sigma_min, sigma_max]; the
    FM state and the network output are rounded to ``dtype`` before the conversion."""
    d2f = make_d2f(prediction, zsnr)
    gmm = mixture()
    sigma = sigma_grid(d2f)
    gen = torch.Generator().manual_seed(1)
    x0 = gmm.sample(len(sigma), gen)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    x = d2f_core.interpolant(x0, eps, sigma)
    network = optimal_network(gmm, d2f)
    v = d2f.velocity_fn(lambda x_in, t: network(x_in, t).to(dtype))(x.to(dtype), sigma.to(dtype))
    v_exact = gmm.fm_velocity(x, sigma)
    return float(((v - v_exact).norm(dim=1) / v_exact.norm(dim=1)).max())


# the native tensor names (ComfyUI 0.8.0 comfy/weight_adapter) each adapter algorithm saves per adapted layer
NATIVE_KEYS = {
    "LoRA": {"lora_up.weight", "lora_down.weight", "alpha"},
    "LoHa": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "LoKr": {"lokr_w1", "lokr_w2"},
    "OFT": {"oft_blocks", "alpha"},
    "DoRA": {"lora_up.weight", "lora_down.weight", "alpha", "dora_scale"},
    "Full": {"diff"},
}
