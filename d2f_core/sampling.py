"""Flow-matching samplers and sigma grids.

:data:`SAMPLERS` is the registry every node combo and CLI choice reads (add a sampler there).

Convention (docs/MATH.md section 1): sigma = 1 is noise, sigma = 0 is data, ``v = eps - x0``.
A *velocity function* is ``fn(x, sigma) -> v`` with ``x`` of shape [B, ...] and ``sigma`` of
shape [B]. Samplers integrate ``dx/dsigma = v`` along a decreasing sigma grid, from noise to
data, in the style of k-diffusion: small free functions with one signature.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "VelocityFn",
    "time_shift",
    "inverse_time_shift",
    "fm_sigmas",
    "ddim_trailing_sigmas",
    "START_RULES",
    "FM_GRIDS",
    "grid_floor",
    "interpolant",
    "reflow_line_noise",
    "sample_euler",
    "sample_heun",
    "sample_ab2",
    "sample_dpmpp_2m",
    "log_snr",
    "cfg_velocity",
    "Sampler",
    "SAMPLERS",
    "get_sampler",
]

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], Any]


def time_shift(sigma: torch.Tensor | float, shift: float) -> torch.Tensor:
    """SD3's resolution shift ``shift * sigma / (1 + (shift - 1) * sigma)`` (ComfyUI
    ``time_snr_shift``). ``shift > 1`` spends more of the trajectory at high noise."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return shift * sigma / (1 + (shift - 1) * sigma)


def inverse_time_shift(sigma: torch.Tensor | float, shift: float) -> torch.Tensor:
    """Inverse of :func:`time_shift`: ``sigma / (shift - (shift - 1) * sigma)``."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return sigma / (shift - (shift - 1) * sigma)


START_RULES = {
    "sigma_max": "from sigma_max * noise at the end of the model's schedule (SD practice)",
    "noise": "from pure noise at sigma 1; only the first step changes (closer to the data from 20 steps on in the "
    "exact test, worse at 4)",
}
"""Where sampling from pure noise starts on a schedule with ``sigma_max < 1`` (see :func:`fm_sigmas`),
each with its description (what the nodes and help pages show)."""


FM_GRIDS = {
    "uniform": "uniform in the (shifted) FM sigma from sigma_max to 0",
    "sigma_min": "the uniform grid with a node on the model's sigma_min (its least trained noise level; with "
    "few steps: uniform down to sigma_min, then one step to 0): no step straddles sigma_min, below which the "
    "network's timestep clamps to 0 and the velocity changes its form (docs/MATH.md section 14)",
}
"""The sigma grids of reflow pairs by name (:func:`grid_floor` turns one into :func:`fm_sigmas`'s
``sigma_floor``), each with its description (what the nodes and help pages show)."""


def grid_floor(grid: str, sigma_min: float) -> float:
    """The ``sigma_floor`` of :func:`fm_sigmas` for the grid ``grid`` (one of :data:`FM_GRIDS`) of a model
    whose least trained noise level is ``sigma_min`` (``Diff2Flow.sigma_min``): 0 for ``"uniform"``."""
    if grid not in FM_GRIDS:
        raise ValueError(f"grid {grid!r} is unknown: choose one of {', '.join(FM_GRIDS)}")
    return float(sigma_min) if grid == "sigma_min" else 0.0


def fm_sigmas(
    steps: int,
    sigma_max: float = 1.0,
    shift: float = 1.0,
    denoise: float = 1.0,
    start: str = "sigma_max",
    sigma_floor: float = 0.0,
) -> torch.Tensor:
    """A decreasing FM sigma grid of ``steps + 1`` values ending at 0 (float64).

    Uniform in the unshifted time ``u`` from ``denoise * u_max`` down to 0, mapped through
    :func:`time_shift`; ``u_max = inverse_time_shift(sigma_max)``, so the grid starts exactly
    at ``sigma_max`` for ``denoise = 1`` whatever the shift. With ``shift = 1`` this is
    ``linspace(denoise * sigma_max, 0, steps + 1)``. ``denoise < 1`` (img2img) runs ``steps``
    steps over the low-noise end, the same sigmas as ComfyUI's ``steps / denoise`` grid cut.

    ``sigma_floor > 0`` (:data:`FM_GRIDS` ``"sigma_min"``) puts a node exactly on ``sigma_floor``: the
    steps split between the stretches above and below it in proportion to their lengths in ``u``, at
    least one below (so with few steps the grid runs uniformly down to ``sigma_floor`` and takes one
    step from there to 0). With one step the grid is the same as without it.

    ``sigma_max`` is the model's noisiest level: 1.0 for flow models and zero-terminal-SNR
    v-models, the schedule's ``Diff2Flow.sigma_max`` (0.936 for SD) otherwise.

    ``start`` (one of :data:`START_RULES`; docs/MATH.md section 10) says where text-to-image sampling
    starts when ``sigma_max < 1``:

    - ``"sigma_max"`` (default, SD practice): the grid starts at sigma_max, the sampler at
      ``x = sigma_max * noise`` (which drops the ``(1 - sigma_max) x0`` part of that level).
    - ``"noise"``: only the first value becomes 1. The sampler starts from pure noise
      ``x = noise`` and its first step, from 1 to ``sigmas[1]``, uses the network at its table
      end (``Diff2Flow``'s rule above sigma_max); every later sigma, and the number of steps and
      network evaluations, are those of ``"sigma_max"``.

    Either way the sampler's start is ``x = sigmas[0] * noise`` (ComfyUI's flow noise scaling
    with an empty latent). ``start`` changes nothing where ``sigma_max = 1`` or ``denoise < 1``
    (img2img starts below the top of the schedule).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0 < sigma_max <= 1:
        raise ValueError(f"sigma_max must lie in (0, 1], got {sigma_max}")
    if not 0 < denoise <= 1:
        raise ValueError(f"denoise must lie in (0, 1] (1 = from pure noise), got {denoise}")
    if start not in START_RULES:
        raise ValueError(f"start={start!r} is not a start rule: use one of {', '.join(map(repr, START_RULES))}")
    if not 0 <= sigma_floor < denoise * sigma_max:
        raise ValueError(
            f"sigma_floor must lie in [0, {denoise * sigma_max:g}) (below the grid's start), got {sigma_floor}"
        )
    u_max = float(inverse_time_shift(sigma_max, shift))
    if sigma_floor > 0 and steps > 1:
        # the uniform grid with one node moved onto sigma_floor: the steps split between the two stretches by
        # their lengths in u, at least one below, so the steps shrink everywhere as steps grows
        u_top, u_floor = denoise * u_max, float(inverse_time_shift(sigma_floor, shift))
        below = min(steps - 1, max(1, round(steps * u_floor / u_top)))
        upper = torch.linspace(u_top, u_floor, steps - below + 1, dtype=torch.float64)
        lower = torch.linspace(u_floor, 0.0, below + 1, dtype=torch.float64)[1:]
        sigmas = time_shift(torch.cat([upper, lower]), shift)
        sigmas[steps - below] = sigma_floor  # exactly, not through the shift's round trip
    else:
        u = torch.linspace(denoise * u_max, 0.0, steps + 1, dtype=torch.float64)
        sigmas = time_shift(u, shift)
    sigmas[-1] = 0.0
    if start == "noise" and denoise == 1:
        sigmas[0] = 1.0
    return sigmas


def ddim_trailing_sigmas(d2f: Any, steps: int) -> torch.Tensor:
    """The FM sigmas of DDIM's "trailing" timestep spacing (``tau_i = round(T - i T / steps) - 1``,
    i = 0 .. steps-1, then the clean end), float64.

    FM Euler on the Diff2Flow-converted model along this grid IS DDIM (eta = 0) along those
    timesteps (docs/MATH.md section 4), the last step going to x0_hat as DDIM's final step.
    ``d2f`` is the model's :class:`~d2f_core.Diff2Flow` alignment.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    T = d2f.num_timesteps
    taus = torch.round(torch.arange(T, 0, -T / steps, dtype=torch.float64)) - 1
    sigmas = d2f.sigma(taus[:steps]).to(torch.float64)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def interpolant(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x_sigma = (1 - sigma) * x0 + sigma * noise`` (the FM forward process; img2img start)."""
    s = torch.as_tensor(sigma, device=x0.device, dtype=torch.promote_types(x0.dtype, torch.float32))
    if s.ndim == 1:
        s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return ((1 - s) * x0 + s * noise).to(x0.dtype)


def reflow_line_noise(z: torch.Tensor, x0: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """``n = z - (1 - sigma_max) / sigma_max * x0``: the noise end of the FM line that passes through a
    sampler's start ``sigma_max * z`` at ``sigma_max`` and through ``x0`` at 0 (docs/MATH.md section 12;
    ``z`` itself for ``sigma_max = 1``). ``sigma_max`` is the start of the model that will sample."""
    if not 0 < sigma_max <= 1:
        raise ValueError(f"sigma_max must lie in (0, 1], got {sigma_max}")
    if sigma_max == 1.0:
        return z
    return (z - ((1 - sigma_max) / sigma_max) * x0).to(z.dtype)


def _batched(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(x.device, torch.promote_types(x.dtype, torch.float32)).expand(x.shape[0])


@torch.no_grad()
def sample_euler(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callback | None = None,
) -> torch.Tensor:
    """FM Euler: ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, sigma_i)``.

    ``x`` is the state at ``sigmas[0]`` (pure noise for text-to-image: ``noise`` itself at
    sigma 1, ``interpolant(x0, noise, sigmas[0])`` for img2img). ``callback`` receives
    ``{"i", "x", "sigma", "sigma_next", "velocity", "denoised"}`` after each step.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = velocity_fn(x, _batched(s, x))
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "velocity": v, "denoised": x - s.item() * v})
        x = (x + (s_next - s).item() * v).to(x.dtype)
    return x


@torch.no_grad()
def sample_heun(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callback | None = None,
) -> torch.Tensor:
    """FM Heun (2nd order, trapezoidal corrector); the step to sigma = 0 is plain Euler, as in
    k-diffusion (the velocity at the data end is not needed). Two evaluations per step."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        dt = (s_next - s).item()
        v = velocity_fn(x, _batched(s, x))
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "velocity": v, "denoised": x - s.item() * v})
        x_euler = x + dt * v
        if s_next.item() == 0:
            x = x_euler.to(x.dtype)
            continue
        v_next = velocity_fn(x_euler.to(x.dtype), _batched(s_next, x))
        x = (x + dt * 0.5 * (v + v_next)).to(x.dtype)
    return x


@torch.no_grad()
def sample_ab2(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callback | None = None,
) -> torch.Tensor:
    """FM Adams-Bashforth 2 (docs/MATH.md section 14): second order, one evaluation per step.

    Each step integrates the line through the last two velocities (in sigma) exactly:
    ``x_{i+1} = x_i + dt * (v_i + dt / (2 (sigma_i - sigma_{i-1})) * (v_i - v_{i-1}))`` with
    ``dt = sigma_{i+1} - sigma_i``; the first step, which has no earlier velocity, is Euler. The
    velocity at the data end is never needed, so the step to sigma = 0 is an ordinary step.
    Works on increasing grids too (data to noise).
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    previous: tuple[torch.Tensor, float] | None = None  # (velocity, sigma) of the last step
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = velocity_fn(x, _batched(s, x))
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "velocity": v, "denoised": x - s.item() * v})
        dt = (s_next - s).item()
        slope = v
        if previous is not None:
            slope = v + (dt / (2 * (s.item() - previous[1]))) * (v - previous[0])
        previous = (v, s.item())
        x = (x + dt * slope).to(x.dtype)
    return x


def log_snr(sigma: float) -> float:
    """``lambda = log((1 - sigma) / sigma)``: the log signal-to-noise ratio of FM level ``sigma`` (the
    time variable of DPM-Solver++; docs/MATH.md section 14). ``-inf`` at sigma = 1, ``+inf`` at 0."""
    if sigma >= 1:
        return -math.inf
    if sigma <= 0:
        return math.inf
    return math.log((1 - sigma) / sigma)


@torch.no_grad()
def sample_dpmpp_2m(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) in FM coordinates (docs/MATH.md section 14): second order, one evaluation per step.

    The data estimate ``x0_hat = x - sigma v`` is taken as linear in ``lambda = log((1 - sigma) / sigma)``
    through its last two values and the ODE's exponential-integrator form integrated exactly:
    ``x_{i+1} = x_i + dt * v_i + (1 - sigma_{i+1}) * (h + expm1(-h)) / h_prev * (x0_hat_i - x0_hat_{i-1})``
    with ``h = lambda_{i+1} - lambda_i``, ``h_prev = lambda_i - lambda_{i-1}``: an FM Euler (= DDIM) step
    plus a multistep correction. The correction needs finite lambdas, so the first step, the step to
    sigma = 0 (which returns ``x0_hat``, as k-diffusion's) and, on a grid that starts at sigma = 1 (zero
    terminal SNR, flow models), the second step are plain Euler steps. Works on increasing grids too.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    previous: tuple[torch.Tensor, float] | None = None  # (data estimate, lambda) of the last step
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = velocity_fn(x, _batched(s, x))
        denoised = x - s.item() * v
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s, "sigma_next": s_next, "velocity": v, "denoised": denoised})
        step = x + (s_next - s).item() * v
        lam, lam_next = log_snr(s.item()), log_snr(s_next.item())
        if previous is not None and math.isfinite(previous[1]) and math.isfinite(lam) and math.isfinite(lam_next):
            h, h_prev = lam_next - lam, lam - previous[1]
            step = step + ((1 - s_next.item()) * (h + math.expm1(-h)) / h_prev) * (denoised - previous[0])
        previous = (denoised, lam)
        x = step.to(x.dtype)
    return x


def cfg_velocity(
    velocity_fn: Callable[..., torch.Tensor],
    cond: Any,
    uncond: Any,
    scale: float,
) -> VelocityFn:
    """Classifier-free guidance: ``v = v_uncond + scale * (v_cond - v_uncond)``.

    ``velocity_fn(x, sigma, c)`` is evaluated once per step on the concatenated batch
    ``[cond, uncond]`` (tensors concatenated along dim 0; for dicts of tensors, such as SDXL's
    ``{"context", "y"}``, each entry is). ``scale = 1`` skips the uncond pass.
    The Diff2Flow conversion is affine in the network output, so guiding velocities equals
    guiding raw outputs or denoised estimates (docs/MATH.md section 4).
    """
    if scale == 1.0:
        return lambda x, sigma: velocity_fn(x, sigma, cond)
    if isinstance(cond, dict):
        if set(cond) != set(uncond):
            raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
    else:
        both = torch.cat([cond, uncond])

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v = velocity_fn(torch.cat([x, x]), torch.cat([sigma, sigma]), both)
        v_cond, v_uncond = v.chunk(2)
        return v_uncond + scale * (v_cond - v_uncond)

    return guided


@dataclass(frozen=True)
class Sampler:
    """One FM sampler of the registry :data:`SAMPLERS`: ``fn(velocity_fn, x, sigmas, callback)``,
    the network evaluations it spends per step, and a one-line description (node tooltips, CLI help).
    Calling the record calls ``fn``."""

    name: str
    fn: Callable[..., torch.Tensor]
    evaluations_per_step: int
    description: str
    # the step to sigma = 0 where it costs fewer (Heun's is an Euler step); None: evaluations_per_step
    final_step_evaluations: int | None = None

    def evaluations(self, steps: int) -> int:
        """The network evaluations of ``steps`` steps on a grid that ends at sigma = 0 (every FM grid of
        :func:`fm_sigmas` does): what a choice of sampler and steps costs. With cfg != 1 each evaluation
        is one network call on the doubled batch (:func:`cfg_velocity`), not two calls."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        last = self.evaluations_per_step if self.final_step_evaluations is None else self.final_step_evaluations
        return self.evaluations_per_step * (steps - 1) + last

    def __call__(
        self, velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None
    ) -> torch.Tensor:
        return self.fn(velocity_fn, x, sigmas, callback=callback)


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("euler", sample_euler, 1, "FM Euler: first order, one model evaluation per step"),
        Sampler("heun", sample_heun, 2, "FM Heun: second order, two model evaluations per step (one on the last)", 1),
        Sampler(
            "ab2",
            sample_ab2,
            1,
            "FM Adams-Bashforth 2: second order, one model evaluation per step (the velocity extrapolated "
            "from the last two steps; the first step is Euler)",
        ),
        Sampler(
            "dpmpp_2m",
            sample_dpmpp_2m,
            1,
            "DPM-Solver++(2M) in FM coordinates: second order, one model evaluation per step (the data "
            "estimate extrapolated in log-SNR; the first and last steps are Euler)",
        ),
    )
}


def get_sampler(name: str) -> Sampler:
    """The registry entry of ``name``, or a ``ValueError`` listing the known samplers."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is unknown: choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
