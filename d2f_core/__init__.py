"""d2f_core: the mathematics of Diff2Flow in pure PyTorch (no ComfyUI import, ever).

One time convention throughout (``docs/MATH.md`` section 1): flow-matching sigma in
[0, 1] with **sigma = 1 pure noise**, ``x_sigma = (1 - sigma) x0 + sigma eps`` and velocity
``v = eps - x0`` (ComfyUI's CONST model sampling, SD3, Flux). The paper's ``t = 1 - sigma`` and
``u = -v`` are translated at the project's borders only.

Modules:
    schedules        discrete VP schedules (alphas_cumprod tables), zero terminal SNR
    alignment        :class:`Diff2Flow`: time map, network input, velocity, data estimate
    sampling         FM sigma grids, the sampler registry (Euler, Heun), classifier-free guidance
    objectives       the objective registry (diff2flow / naive_fm / diffusion), timestep samplers,
                     validation loss
    losses           the per-sample losses every objective can take (mse, pseudo_huber)
    inversion        the probability-flow ODE run backwards, image -> noise (reflow's inverted pairs)
    gaussian_mixture exactly optimal denoiser of a Gaussian mixture (for tests and benchmarks)
    metrics          sliced Wasserstein distance
    depth            image-to-depth: depth normalisation, the widened first convolution, affine
                     alignment, the ensemble, AbsRel / delta1
"""

from . import depth, schedules
from .alignment import PREDICTION_TYPES, Diff2Flow, normalize_prediction
from .gaussian_mixture import GaussianMixture
from .inversion import INVERTIBLE_SAMPLERS, check_invertible, invert
from .losses import LOSSES, per_sample_loss, pseudo_huber
from .metrics import sliced_wasserstein
from .objectives import (
    OBJECTIVES,
    TIMESTEP_SAMPLERS,
    Objective,
    ObjectiveOutput,
    diff2flow_loss,
    diffusion_loss,
    fm_validation_loss,
    get_objective,
    naive_fm_loss,
    naive_fm_velocity_fn,
    objective_loss,
    place_on_sampling_grid,
    sample_training_sigmas,
    u_shaped_quantile,
    validation_sigmas,
)
from .sampling import (
    FM_GRIDS,
    SAMPLERS,
    START_RULES,
    Sampler,
    cfg_velocity,
    ddim_trailing_sigmas,
    fm_sigmas,
    get_sampler,
    grid_floor,
    interpolant,
    inverse_time_shift,
    reflow_line_noise,
    sample_euler,
    sample_heun,
    time_shift,
)
from .schedules import cosine, linear, rescale_zero_terminal_snr, scaled_linear

__version__ = "0.1.0"

__all__ = [
    "Diff2Flow",
    "FM_GRIDS",
    "GaussianMixture",
    "INVERTIBLE_SAMPLERS",
    "Objective",
    "ObjectiveOutput",
    "OBJECTIVES",
    "LOSSES",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "Sampler",
    "START_RULES",
    "TIMESTEP_SAMPLERS",
    "cfg_velocity",
    "check_invertible",
    "cosine",
    "depth",
    "ddim_trailing_sigmas",
    "diff2flow_loss",
    "diffusion_loss",
    "fm_sigmas",
    "fm_validation_loss",
    "get_objective",
    "get_sampler",
    "grid_floor",
    "interpolant",
    "invert",
    "inverse_time_shift",
    "linear",
    "naive_fm_loss",
    "reflow_line_noise",
    "naive_fm_velocity_fn",
    "normalize_prediction",
    "objective_loss",
    "per_sample_loss",
    "pseudo_huber",
    "rescale_zero_terminal_snr",
    "sample_euler",
    "sample_heun",
    "sample_training_sigmas",
    "scaled_linear",
    "sliced_wasserstein",
    "schedules",
    "time_shift",
    "u_shaped_quantile",
    "place_on_sampling_grid",
    "validation_sigmas",
]
