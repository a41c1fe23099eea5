"""Inverting the probability-flow ODE: from an image to the noise a sampler maps to it.

Sampling integrates ``dx/dsigma = v(x, sigma)`` along a decreasing sigma grid from ``sigmas[0]`` to
0 (docs/MATH.md section 1). Inversion integrates the same ODE along the same grid reversed, from the
image ``x0`` at sigma = 0 up to ``sigmas[0]``, with the same sampler: its end point ``x_T`` is the
state from which sampling along ``sigmas`` returns to ``x0``, within the sampler's error (a round
trip's error shrinks at the sampler's order; docs/MATH.md section 12). Reflow's inverted pairs are
``(x_T / sigma_max, x0)``, stored like generated pairs (training/pairs.py).

Not every sampler can run backwards as it is written: one that reads sigma as a noise level (a
data-prediction or log-SNR multistep solver starts from ``log(sigma)``, infinite at sigma = 0) does
not integrate an increasing grid that starts at the data. :data:`INVERTIBLE_SAMPLERS` names those
that do, each with why; :func:`invert` refuses the others, naming them.
"""

from __future__ import annotations

import torch

from .sampling import Callback, VelocityFn, get_sampler

__all__ = ["INVERTIBLE_SAMPLERS", "check_invertible", "invert"]

INVERTIBLE_SAMPLERS: dict[str, str] = {
    "euler": "x + (sigma' - sigma) v(x, sigma) is the explicit Euler step of either direction (DDIM inversion)",
    "heun": "the trapezoidal corrector is direction-free; going up, its plain-Euler step to sigma = 0 never "
    "occurs, so every step takes two evaluations",
    "ab2": "Adams-Bashforth in sigma is direction-free; its first step (Euler) starts at the data",
    "dpmpp_2m": "its log-SNR correction needs finite lambdas: going up, the first two steps (from lambda = +inf at "
    "the data) are Euler steps, every later one its own",
}
"""The ``d2f_core.SAMPLERS`` entries that integrate an increasing grid from sigma = 0 as they are written
(the samplers inversion may use), each with the reason. A sampler added to the registry is refused
here until it is checked and listed (``d2f_core/tests/test_inversion.py`` runs every listed one at
its order and checks that every other one is refused)."""


def check_invertible(name: str) -> None:
    """A ``ValueError`` naming the samplers that can invert unless ``name`` is one of them."""
    get_sampler(name)  # an unknown name: the registry's own message
    if name not in INVERTIBLE_SAMPLERS:
        raise ValueError(
            f"sampler {name!r} cannot run the ODE backwards from the data (sigma = 0) as it is written, so it "
            f"cannot invert images: use one of {', '.join(INVERTIBLE_SAMPLERS)} for pairs with inverted images"
        )


@torch.no_grad()
def invert(
    sampler: str,
    velocity_fn: VelocityFn,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The state at ``sigmas[0]`` that ``sampler`` along ``sigmas`` maps back to ``x0``.

    ``sigmas`` is the SAMPLING grid (decreasing, from the start ``sigmas[0]`` to 0, as
    :func:`~d2f_core.fm_sigmas` gives it); the sampler integrates ``dx/dsigma = v(x, sigma)`` along
    it reversed, from ``x0`` at sigma = 0, so its first velocity is taken at the data (sigma = 0).
    ``velocity_fn(x, sigma)`` is the same function sampling uses (with CFG: the same guided one).
    Sampling from the result along ``sigmas`` returns to ``x0`` up to the sampler's error twice
    (docs/MATH.md section 12).
    """
    check_invertible(sampler)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2 or sigmas[-1] != 0 or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(
            "sigmas must be a sampling grid: decreasing to 0 (fm_sigmas(...)); inversion runs it from the end"
        )
    return get_sampler(sampler)(velocity_fn, x0, sigmas.flip(0), callback)
