"""The Diff2Flow alignment: a discrete VP diffusion model seen as a flow-matching model.

Convention (``docs/MATH.md`` section 1, the one used everywhere in this package):
FM time is ``sigma`` in [0, 1], **sigma = 1 is pure noise**, the interpolant is
``x_sigma = (1 - sigma) * x0 + sigma * eps`` and the velocity is ``v = eps - x0``.
The paper's ``t = 1 - sigma`` and ``u = -v`` only appear at the borders of the project.

The diffusion side is a table ``alphas_cumprod[tau]``; with ``a = sqrt(ac)``, ``s = sqrt(1 - ac)``
and ComfyUI's VE sigma ``k = s / a``, the alignment (docs/MATH.md section 3) is

    sigma = k / (1 + k),   n(sigma) = sqrt(sigma**2 + (1 - sigma)**2) = 1 / (a + s),
    a = (1 - sigma) / n,   s = sigma / n,   x_tau = x_sigma / n.

``a``, ``s`` and ``n`` are closed-form functions of sigma; only the timestep handed to the
network comes from the table, by the exact inverse of ComfyUI's log-k interpolation.

Above the table (sigma in (sigma_max, 1], schedules without zero terminal SNR, docs/MATH.md section 10)
the network is evaluated as at its last entry: timestep T-1 on the VP input ``x / n(sigma)``, its
output converted to ``x0_hat`` with the table end's ``a_T``, ``s_T`` (the level the network was
told), and ``v = (x - x0_hat) / sigma`` at the actual sigma; finite up to sigma = 1, eps included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .schedules import alphas_cumprod_from_discrete_sigmas, rescale_zero_terminal_snr

__all__ = [
    "Diff2Flow",
    "PREDICTION_TYPES",
    "normalize_prediction",
    "ZERO_TERMINAL_SNR_THRESHOLD",
    "has_zero_terminal_snr",
    "require_v_prediction_for_zero_terminal_snr",
]

PREDICTION_TYPES = ("eps", "v")
_PREDICTION_ALIASES = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v"}

# alphas_cumprod[-1] at or below this counts as zero terminal SNR. ComfyUI's own rescale stops
# at 4.9e-8 (k = 4519) to keep its log-sigma table finite; SD's ordinary schedule ends at 4.7e-3.
ZERO_TERMINAL_SNR_THRESHOLD = 1e-6


def normalize_prediction(prediction: str) -> str:
    """Return ``"eps"`` or ``"v"`` for a prediction-type name, or raise ``ValueError``."""
    key = str(prediction).lower()
    if key not in _PREDICTION_ALIASES:
        raise ValueError(
            f"prediction={prediction!r} is not supported: use 'eps' (SD1.x, SDXL, SD2.x-base) "
            f"or 'v' (SD2.x-768, v-prediction fine-tunes)"
        )
    return _PREDICTION_ALIASES[key]


def has_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> bool:
    """Whether a schedule ends at (numerically) zero SNR: ``alphas_cumprod[-1] <= 1e-6``.

    True for a table rescaled by :func:`~d2f_core.rescale_zero_terminal_snr` (last entry 0) and for
    ComfyUI's own zero-SNR table (last entry 4.9e-8, kept finite for its log-sigma table).
    """
    return bool(torch.as_tensor(alphas_cumprod).flatten()[-1] <= ZERO_TERMINAL_SNR_THRESHOLD)


def require_v_prediction_for_zero_terminal_snr(prediction: str) -> None:
    """The one place of the rule "zero terminal SNR needs v-prediction" (docs/MATH.md section 9).

    At pure noise an eps network sees no data, so the velocity ``(e - x) / (1 - sigma)`` is
    undefined at sigma = 1; a v network's velocity stays finite there.
    """
    if normalize_prediction(prediction) == "eps":
        raise ValueError(
            "eps-prediction cannot be used with a zero-terminal-SNR schedule: zero terminal SNR is only valid "
            "for v-prediction models, and at pure noise (sigma = 1) an eps network carries no information about "
            "the data, so the FM velocity is undefined. Turn zero_terminal_snr off (eps models sample from "
            "their schedule's sigma_max, 0.936 for SD)."
        )


def _float_dtype_for(device: torch.device) -> torch.dtype:
    # Apple's MPS backend has no float64; everything else computes coefficients in float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _expand_like(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample coefficient of shape [] or [B] against x of shape [B, ...]."""
    if coef.ndim == 0:
        return coef
    if coef.ndim != 1 or coef.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"sigma must be a scalar or of shape [B] with B = {x.shape[0]} (the batch of x), "
            f"got shape {tuple(coef.shape)}"
        )
    return coef.reshape(coef.shape[0], *([1] * (x.ndim - 1)))


class Diff2Flow:
    """Align a discrete VP diffusion schedule and prediction type with flow matching.

    Args:
        alphas_cumprod: the schedule table (length T, strictly decreasing, in [0, 1]).
        prediction: ``"eps"`` or ``"v"`` (SD2 ``v = a * eps - s * x0``).

    All methods take FM ``sigma`` (sigma = 1 is noise; a scalar or a tensor of shape [B]) and
    batched ``x`` of shape [B, ...]; float16, bfloat16, float32 and float64 work on any device.
    Coefficients are computed in float64 and the result is returned in the inputs' dtype.

    Raises:
        ValueError: for a malformed table, an unknown prediction type, or eps-prediction on a
            zero-terminal-SNR schedule (an eps network cannot give the velocity at pure noise).
            The per-call check of ``sigma`` (in [0, 1]) runs for sigma on the CPU; for sigma on
            an accelerator it is skipped, since it would stall its queue.

    Sigmas in ``(sigma_max, 1]`` (no zero terminal SNR) use the table-end rule of the module
    docstring: :meth:`timestep` gives T-1, :meth:`model_input` ``x / n(sigma)``, and
    :meth:`denoised` / :meth:`velocity` convert with the table end's coefficients, so each of
    them is consistent on its own (ComfyUI calls them separately).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction: str = "eps") -> None:
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).flatten()
        if ac.numel() < 2:
            raise ValueError(f"alphas_cumprod needs at least 2 entries, got {ac.numel()}")
        if not torch.isfinite(ac).all() or (ac < 0).any() or (ac > 1).any():
            raise ValueError("alphas_cumprod must be finite and lie in [0, 1]")
        if not (ac[1:] < ac[:-1]).all():
            raise ValueError("alphas_cumprod must be strictly decreasing (timestep 0 is the clean end)")
        if ac[0] >= 1:
            raise ValueError("alphas_cumprod[0] must be < 1 (timestep 0 must carry some noise)")
        self.prediction = normalize_prediction(prediction)
        self.alphas_cumprod = ac
        self.num_timesteps = int(ac.numel())
        self.zero_terminal_snr = has_zero_terminal_snr(ac)
        if self.zero_terminal_snr:
            require_v_prediction_for_zero_terminal_snr(self.prediction)
        a, s = ac.sqrt(), (1.0 - ac).sqrt()
        # FM sigma of every integer timestep (ascending), and its logit log k = log(s / a), the
        # quantity ComfyUI interpolates linearly between neighbouring timesteps.
        self._sigma_table = s / (a + s)
        self._log_k_table = 0.5 * (torch.log1p(-ac) - torch.log(ac))
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self.sigma_min = float(self._sigma_table[0])
        self.sigma_max = float(self._sigma_table[-1])

    @property
    def sigma_table(self) -> torch.Tensor:
        """FM sigma of every integer timestep 0 .. T-1 (float64, ascending)."""
        return self._sigma_table.clone()

    @classmethod
    def for_model(cls, alphas_cumprod: torch.Tensor, prediction: str, zero_terminal_snr: bool = False) -> Diff2Flow:
        """The alignment of a model with schedule ``alphas_cumprod`` and ``prediction``, optionally
        with zero terminal SNR: the one constructor the patch, the nodes, the trainer and the CLI use.

        ``zero_terminal_snr`` rescales the schedule (Lin et al., docs/MATH.md section 9) unless it
        already has zero terminal SNR (:func:`has_zero_terminal_snr`, e.g. ComfyUI's own zsnr
        schedule of ``v_pred`` + ``ztsnr`` checkpoints): rescaling such a table again would move
        every timestep of the top of the schedule, so requesting it there changes nothing.
        Raises ``ValueError`` for zero terminal SNR with eps-prediction.
        """
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if zero_terminal_snr:
            require_v_prediction_for_zero_terminal_snr(prediction)
            if not has_zero_terminal_snr(ac):
                ac = rescale_zero_terminal_snr(ac)
        return cls(ac, prediction)

    @classmethod
    def from_discrete_sigmas(
        cls, sigmas: torch.Tensor, prediction: str = "eps", zero_terminal_snr: bool = False
    ) -> Diff2Flow:
        """Build from ComfyUI's ``ModelSamplingDiscrete.sigmas`` buffer (VE ``k``, ascending)."""
        return cls.for_model(alphas_cumprod_from_discrete_sigmas(sigmas), prediction, zero_terminal_snr)

    def __repr__(self) -> str:
        return (
            f"Diff2Flow(prediction={self.prediction!r}, T={self.num_timesteps}, "
            f"sigma_min={self.sigma_min:.5f}, sigma_max={self.sigma_max:.5f}, "
            f"zero_terminal_snr={self.zero_terminal_snr})"
        )

    # ------------------------------------------------------------------ tables and time map
    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _float_dtype_for(device)
        key = (device, dtype)
        if key not in self._tables:
            self._tables[key] = (self._sigma_table.to(device, dtype), self._log_k_table.to(device, dtype))
        return self._tables[key]

    def _sigma64(self, sigma: torch.Tensor | float, device: torch.device | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=device)
        return sigma.detach().to(_float_dtype_for(sigma.device))

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The fractional diffusion timestep for FM ``sigma``.

        The exact inverse of ComfyUI's ``ModelSamplingDiscrete.sigma`` (log k linear between
        neighbouring integer timesteps) on this table, with ``k = sigma / (1 - sigma)``. Sigmas
        outside ``[sigma_min, sigma_max]`` clamp to timestep 0 or T-1 (above sigma_max the
        conversions use the table end's coefficients to match: see :meth:`denoised`). Where a
        table end is exactly 0 or 1 (zero terminal SNR: k = inf) the last segment is linear in
        sigma instead.
        Returns float32 (float64 for float64 input) of the shape of ``sigma``.
        """
        out_dtype = torch.float64 if torch.as_tensor(sigma).dtype == torch.float64 else torch.float32
        s = self._sigma64(sigma)
        tab, log_k = self._table(s.device)
        shape = s.shape
        s = s.reshape(-1).clamp(tab[0], tab[-1])
        i = (torch.searchsorted(tab, s, right=True) - 1).clamp(0, self.num_timesteps - 2)
        lo, hi, lk_lo, lk_hi = tab[i], tab[i + 1], log_k[i], log_k[i + 1]
        finite = torch.isfinite(lk_lo) & torch.isfinite(lk_hi)
        w_log = (torch.logit(s) - lk_lo) / (lk_hi - lk_lo)
        w_lin = (s - lo) / (hi - lo)
        w = torch.where(finite, w_log, w_lin).clamp(0.0, 1.0)
        return (i.to(s.dtype) + w).reshape(shape).to(out_dtype)

    def sigma(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """FM sigma of a (fractional) diffusion timestep: the inverse of :meth:`timestep`.

        Interpolates log k linearly between integer timesteps, as ComfyUI does, then
        ``sigma = k / (1 + k)``. Timesteps clamp to [0, T-1]. Returns float32 (float64 for
        float64 input).
        """
        t_in = torch.as_tensor(timestep)
        out_dtype = torch.float64 if t_in.dtype == torch.float64 else torch.float32
        t = t_in.detach().to(_float_dtype_for(t_in.device))
        tab, log_k = self._table(t.device)
        t = t.clamp(0, self.num_timesteps - 1)
        i = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - i.to(t.dtype)
        lk_lo, lk_hi = log_k[i], log_k[i + 1]
        finite = torch.isfinite(lk_lo) & torch.isfinite(lk_hi)
        by_log = torch.sigmoid(torch.where(finite, (1 - w) * lk_lo + w * lk_hi, torch.zeros_like(w)))
        by_lin = (1 - w) * tab[i] + w * tab[i + 1]
        return torch.where(finite, by_log, by_lin).to(out_dtype)

    # ------------------------------------------------------------------ closed-form coefficients
    def _checked_sigma(self, sigma: torch.Tensor | float, x: torch.Tensor, what: str) -> torch.Tensor:
        s = self._sigma64(sigma, device=x.device if not torch.is_tensor(sigma) else None)
        if s.device != x.device:
            s = s.to(x.device)
        if s.device.type != "cpu":
            # reading a result back from an accelerator stalls its queue once per sampling step:
            # the range checks run where they are free (sigma on the CPU, as every test and the
            # samplers' float grids have it) and are skipped on accelerators
            return s
        bad = ~((s >= 0) & (s <= 1))
        if bool(bad.any()):
            raise ValueError(f"{what}: sigma must lie in [0, 1] (1 = pure noise), got {s[bad].flatten()[:4].tolist()}")
        return s

    def _denoised_coefficients(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_x, c_o)`` with ``x0_hat = c_x * x + c_o * out`` (float64, the shape of ``s``).

        On [0, sigma_max] the closed forms in sigma. Above sigma_max the network ran at timestep
        T-1 on ``x / n(sigma)``, so its output is read with the table end's coefficients:
        ``x0_hat = (x / n(sigma) - s_T e) / a_T`` (eps), ``a_T x / n(sigma) - s_T w`` (v).
        """
        lo = s.clamp(max=self.sigma_max)  # the level the network was told (s itself in the table)
        if self.prediction == "eps":
            c_x, c_o = 1 / (1 - lo), -lo / (1 - lo)
        else:
            n = self.noise_norm(lo)
            c_x, c_o = (1 - lo) / n**2, -lo / n
        # the table end's coefficient of x / n(sigma_max), applied to the input x / n(sigma)
        # actually fed; the ratio is exactly 1 inside the table
        return c_x * (self.noise_norm(lo) / self.noise_norm(s)), c_o

    def _above_table(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(above, hi, d_x, d_o)``: where sigma > sigma_max, sigma clamped to at least sigma_max
        (positive, so every branch stays finite), and the data-estimate coefficients there."""
        hi = s.clamp(min=self.sigma_max)
        d_x, d_o = self._denoised_coefficients(hi)
        return s > self.sigma_max, hi, d_x, d_o

    @staticmethod
    def noise_norm(sigma: torch.Tensor) -> torch.Tensor:
        """``n(sigma) = sqrt(sigma**2 + (1 - sigma)**2) = 1 / (a + s)`` (docs/MATH.md section 3)."""
        return torch.sqrt(sigma**2 + (1 - sigma) ** 2)

    def vp_coefficients(self, sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, s, n)`` in float64 for FM sigma: ``a = (1 - sigma) / n``, ``s = sigma / n``."""
        s = self._sigma64(sigma)
        n = self.noise_norm(s)
        return (1 - s) / n, s / n, n

    @staticmethod
    def _combine(c_x: torch.Tensor, x: torch.Tensor, c_o: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``c_x * x + c_o * out`` computed in at least float32, returned in the inputs' dtype."""
        result_dtype = torch.promote_types(x.dtype, out.dtype)
        compute = torch.promote_types(result_dtype, torch.float32)
        c_x, c_o = _expand_like(c_x, x).to(compute), _expand_like(c_o, x).to(compute)
        return (c_x * x.to(compute) + c_o * out.to(compute)).to(result_dtype)

    def model_input(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """What the diffusion network receives for the FM state ``x = x_sigma``: ``x / n(sigma)``
        (the VP coordinates of sigma, also above sigma_max, where the timestep is T-1)."""
        s = self._checked_sigma(sigma, x, "model_input")
        c = _expand_like(1 / self.noise_norm(s), x)
        compute = torch.promote_types(x.dtype, torch.float32)
        return (x.to(compute) * c.to(compute)).to(x.dtype)

    def velocity(self, model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """FM velocity ``v = eps - x0`` from the raw network output, in closed form.

        - eps-prediction ``e``: ``v = (e - x) / (1 - sigma)``.
        - v-prediction ``w``: ``v = (2 sigma - 1) x / n**2 + w / n``.
        - above sigma_max (no zero terminal SNR): ``v = (x - x0_hat) / sigma`` with the table-end
          data estimate of :meth:`denoised`; finite up to sigma = 1 for eps and v.

        ``x`` is the FM state ``x_sigma`` (not the network input), ``sigma`` the FM sigma.
        """
        s = self._checked_sigma(sigma, x, "velocity")
        lo = s.clamp(max=self.sigma_max)
        if self.prediction == "eps":
            c_x, c_o = -1 / (1 - lo), 1 / (1 - lo)
        else:
            n = self.noise_norm(lo)
            c_x, c_o = (2 * lo - 1) / n**2, 1 / n
        if self.sigma_max < 1:
            above, hi, d_x, d_o = self._above_table(s)
            c_x = torch.where(above, (1 - d_x) / hi, c_x)
            c_o = torch.where(above, -d_o / hi, c_o)
        return self._combine(c_x, x, c_o, model_output)

    def denoised(self, model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The data estimate ``x0_hat`` (ComfyUI's "denoised") from the raw network output.

        - eps: ``x0_hat = (x - sigma * e) / (1 - sigma)``.
        - v:   ``x0_hat = (1 - sigma) x / n**2 - sigma w / n``.
        - above sigma_max (no zero terminal SNR): the network saw ``x / n(sigma)`` at timestep
          T-1, so ``x0_hat = (x / n(sigma) - s_T e) / a_T`` (eps) or ``a_T x / n(sigma) - s_T w``
          (v) with the table end's ``a_T``, ``s_T`` (docs/MATH.md section 10).

        It equals the unpatched model's prediction at the same noise level (at sigma_max for
        sigmas above it, on the same network input), and ``x0_hat = x - sigma * velocity(...)``.
        """
        s = self._checked_sigma(sigma, x, "denoised")
        c_x, c_o = self._denoised_coefficients(s)
        return self._combine(c_x, x, c_o, model_output)

    def model_output_from_velocity(
        self, velocity: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float
    ) -> torch.Tensor:
        """Inverse of :meth:`velocity`: the raw eps or v output that yields ``velocity`` at ``x``.

        eps: ``e = x + (1 - sigma) v``; v: ``w = n v - (2 sigma - 1) x / n``; above sigma_max the
        inverse of the table-end rule, ``out = ((1 - d_x) x - sigma v) / d_o`` with
        ``x0_hat = d_x x + d_o out``.
        """
        s = self._checked_sigma(sigma, x, "model_output_from_velocity")
        lo = s.clamp(max=self.sigma_max)
        if self.prediction == "eps":
            c_x, c_v = torch.ones_like(lo), 1 - lo
        else:
            n = self.noise_norm(lo)
            c_x, c_v = -(2 * lo - 1) / n, n
        if self.sigma_max < 1:
            above, hi, d_x, d_o = self._above_table(s)
            c_x = torch.where(above, (1 - d_x) / d_o, c_x)
            c_v = torch.where(above, -hi / d_o, c_v)
        return self._combine(c_x, x, c_v, velocity)

    # ------------------------------------------------------------------ wrapping a network
    def network_inputs(self, x: torch.Tensor, sigma: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x / n(sigma), timestep(sigma))`` with the timestep expanded to shape [B]."""
        s = self._checked_sigma(sigma, x, "network_inputs")
        t = self.timestep(s).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        return self.model_input(x, s), t.expand(x.shape[0]) if t.ndim == 0 else t

    def velocity_fn(self, network: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """Turn ``network(x_tau, timestep, *args, **kwargs) -> raw eps/v`` into an FM velocity
        function ``fn(x_sigma, sigma, *args, **kwargs) -> v`` (the zero-shot FM model)."""

        def fm_velocity(x: torch.Tensor, sigma: torch.Tensor | float, *args: Any, **kwargs: Any) -> torch.Tensor:
            x_in, t = self.network_inputs(x, sigma)
            return self.velocity(network(x_in, t, *args, **kwargs), x, sigma)

        return fm_velocity
