"""Exactly solvable data: a Gaussian mixture with its optimal denoiser (docs/MATH.md section 7).

Data ``p(x0) = sum_k pi_k N(mu_k, c_k^2 I)`` in ``D`` dimensions. At a VP noise level
``x = a x0 + s eps`` the posterior mean ``E[x0 | x]`` is known in closed form, which gives the
exactly optimal eps, v and FM-velocity predictors. Tests and benchmarks use it to check that the
Diff2Flow conversion is exact and that samplers converge. With ``c_k = 0`` and the ``mu_k`` set
to a data set this is the optimal denoiser of that data set.

FM convention: sigma = 1 is noise, ``x_sigma = (1 - sigma) x0 + sigma eps``, ``v = eps - x0``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["GaussianMixture"]


def _per_sample(c: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
    c = torch.as_tensor(c, dtype=like.dtype, device=like.device)
    return c.expand(batch) if c.ndim == 0 else c.reshape(batch)


class GaussianMixture:
    """An isotropic Gaussian mixture in D dimensions (samples are flat: shape [B, D])."""

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor | float = 0.0,
        weights: torch.Tensor | None = None,
    ) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape [K, D], got {tuple(self.means.shape)}")
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        if (self.stds < 0).any():
            raise ValueError("stds must be >= 0")
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or (w <= 0).any():
            raise ValueError("weights must be K positive numbers")
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` float64 samples of shape [n, D]."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[comp] + self.stds[comp, None] * z

    def posterior_mean(self, x: torch.Tensor, a: torch.Tensor | float, s: torch.Tensor | float) -> torch.Tensor:
        """``E[x0 | x]`` for ``x = a x0 + s eps`` (a, s scalars or shape [B]); x of shape [B, D]."""
        x = x.to(torch.float64)
        batch = x.shape[0]
        a, s = _per_sample(a, batch, x), _per_sample(s, batch, x)
        mu, c2 = self.means.to(x.device), (self.stds**2).to(x.device)
        var = a[:, None] ** 2 * c2[None, :] + s[:, None] ** 2  # [B, K]
        diff = x[:, None, :] - a[:, None, None] * mu[None]  # [B, K, D]
        logits = self.weights.to(x.device).log()[None] - diff.pow(2).sum(-1) / (2 * var) - 0.5 * self.dim * var.log()
        w = torch.softmax(logits, dim=1)
        comp_mean = mu[None] + (a[:, None] * c2[None] / var)[..., None] * diff
        return (w[..., None] * comp_mean).sum(1)

    def optimal_eps(self, x: torch.Tensor, a: torch.Tensor | float, s: torch.Tensor | float) -> torch.Tensor:
        """``E[eps | x] = (x - a E[x0 | x]) / s`` (requires s > 0)."""
        batch = x.shape[0]
        x = x.to(torch.float64)
        a_, s_ = _per_sample(a, batch, x)[:, None], _per_sample(s, batch, x)[:, None]
        return (x - a_ * self.posterior_mean(x, a, s)) / s_

    def optimal_v(self, x: torch.Tensor, a: torch.Tensor | float, s: torch.Tensor | float) -> torch.Tensor:
        """The optimal SD2 v-prediction ``a E[eps | x] - s E[x0 | x]`` (requires s > 0)."""
        batch = x.shape[0]
        x = x.to(torch.float64)
        a_, s_ = _per_sample(a, batch, x)[:, None], _per_sample(s, batch, x)[:, None]
        x0 = self.posterior_mean(x, a, s)
        return a_ * (x - a_ * x0) / s_ - s_ * x0

    def fm_velocity(self, x_sigma: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The exact FM velocity ``E[eps - x0 | x_sigma] = (x_sigma - x0*) / sigma`` with x0*
        at ``a = 1 - sigma``, ``s = sigma``.

        At sigma = 0 (where inversion starts, d2f_core/inversion.py) it is the limit ``-x``: the noise
        is independent of the data, and ``x - x0* = -sigma x / (1 - sigma) + O(sigma^2)`` (Tweedie).
        That limit needs a density (every std > 0); at a point mass the velocity has none."""
        x = x_sigma.to(torch.float64)
        sig = _per_sample(sigma, x.shape[0], x)
        at_data = sig == 0
        if bool(at_data.any()) and bool((self.stds == 0).any()):
            raise ValueError("the FM velocity at sigma = 0 needs every std > 0 (a point mass has no velocity there)")
        safe = torch.where(at_data, torch.ones_like(sig), sig)
        v = (x - self.posterior_mean(x, 1 - sig, sig)) / safe[:, None]
        return torch.where(at_data[:, None], -x, v)

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """Log density of the data distribution (components with c_k > 0 only)."""
        if (self.stds == 0).any():
            raise ValueError("log_density needs every std > 0")
        x = x.to(torch.float64)
        var = self.stds**2
        d2 = (x[:, None, :] - self.means[None]).pow(2).sum(-1)
        logp = self.weights.log() - d2 / (2 * var) - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return torch.logsumexp(logp, dim=1)
