"""Training objectives by name, and timestep samplers (docs/MATH.md section 6).

:data:`OBJECTIVES` is the registry: one :class:`Objective` record per objective holds how times
and noise are drawn, the loss, and how a model trained with it is sampled. Nodes, the CLI, the
demo, the loaders and the benchmarks read it; nothing else branches on objective names.


Convention: FM sigma in [0, 1], sigma = 1 is noise, ``x_sigma = (1 - sigma) x0 + sigma eps``,
target velocity ``v = eps - x0``. A *network* is ``network(x_in, timestep, *args, **kwargs)``
returning its raw output (eps or v for a diffusion model, the velocity for naive FM).

- ``diff2flow``: FM interpolant, network fed ``x_sigma / n(sigma)`` at ``timestep(sigma)``, its
  raw output converted to velocity in closed form, loss ``|v_hat - (eps - x0)|^2``.
- ``naive_fm``: the same interpolant fed directly, at timestep ``T * sigma``, output taken as
  the velocity (fine-tuning a diffusion model as FM without the alignment).
- ``diffusion``: integer ``tau`` uniform, ``x_tau = a x0 + s eps``, target eps or v.
- ``reflow``: the ``diff2flow`` loss on the teacher's (noise, image) pairs: the noise ``z`` comes
  with the data, and the line runs from the student's own start ``sigma_max * z`` to ``x0``:
  ``x_sigma = (1 - sigma) x0 + sigma n``, target ``n - x0``, ``n`` = :func:`reflow_line_noise`
  (docs/MATH.md sections 6 and 12).

A share of the training sigmas can sit on the nodes of the objective's own sampling grid (``grid_share`` of
:meth:`Objective.draw`, :func:`place_on_sampling_grid`): the levels its recommended few-step sampling evaluates.

Every loss function takes the keywords ``loss`` and ``huber_c``: how the prediction's residual becomes
one number per sample (:data:`d2f_core.losses.LOSSES`: ``mse``, the default, or ``pseudo_huber``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .alignment import Diff2Flow
from .losses import LOSSES, per_sample_loss
from .losses import mse as _mse
from .sampling import ddim_trailing_sigmas, fm_sigmas, interpolant, reflow_line_noise, time_shift

__all__ = [
    "ObjectiveOutput",
    "Objective",
    "OBJECTIVES",
    "get_objective",
    "TIMESTEP_SAMPLERS",
    "sample_training_sigmas",
    "U_SHAPED_A",
    "u_shaped_quantile",
    "place_on_sampling_grid",
    "diff2flow_loss",
    "naive_fm_loss",
    "diffusion_loss",
    "objective_loss",
    "evaluate_objective",
    "naive_fm_velocity_fn",
    "validation_sigmas",
    "fm_validation_loss",
]

TIMESTEP_SAMPLERS = {
    "uniform": "every noise level equally often",
    "logit_normal": "sigmoid(logit_mean + logit_std * z), z standard normal: more weight in the middle (SD3)",
    "shift": "uniform, then the time shift: more high-noise steps for shift > 1",
    "u_shaped": "density proportional to cosh(4 (u - 1/2)): the nearly clean and the nearly pure-noise ends 3.8x as "
    "often as the middle (reflow: Lee, Lin, Fanti 2024, with their a = 4)",
}
"""How training sigmas are drawn (:func:`sample_training_sigmas`), each with its description."""
Network = Callable[..., torch.Tensor]


@dataclass
class ObjectiveOutput:
    """One training-loss evaluation.

    ``loss`` is the batch mean of ``per_sample``, each sample's loss (``mse``: the mean over all but the
    batch dimension; :data:`d2f_core.losses.LOSSES`),
    ``time`` the FM sigma (FM objectives) or integer tau (diffusion) of each sample, and
    ``prediction`` / ``target`` the compared quantities (velocity, or raw eps/v for diffusion).
    """

    loss: torch.Tensor
    per_sample: torch.Tensor
    time: torch.Tensor
    prediction: torch.Tensor
    target: torch.Tensor


# the U-shaped density's a (Lee, Lin, Fanti 2024, section 4.1 and their code: a = 4)
U_SHAPED_A = 4.0


def u_shaped_quantile(p: torch.Tensor, a: float = U_SHAPED_A) -> torch.Tensor:
    """The inverse CDF of the U-shaped density ``a cosh(a (u - 1/2)) / (2 sinh(a / 2))`` on [0, 1] at ``p``
    in [0, 1] (floating point; float64 recommended).

    The CDF is ``F(u) = 1/2 + sinh(a (u - 1/2)) / (2 sinh(a / 2))``, so ``F^-1(p) = 1/2 + asinh((2p - 1)
    sinh(a / 2)) / a``. That form loses the small values near the ends to cancellation; this evaluates
    the lower half as ``log1p`` of a ratio of positive terms (docs/MATH.md section 6) and the upper half by
    the symmetry ``F^-1(1 - p) = 1 - F^-1(p)``: ``p > 0`` gives ``u > 0``, and ``p = 1`` gives ``u = 1``.
    """
    if not a > 0:
        raise ValueError(f"the U-shaped density's a must be > 0, got {a}")
    s, c = math.sinh(a / 2), math.cosh(a / 2)
    q = torch.minimum(p, 1 - p)  # F^-1 of the lower half, [0, 1/2]
    w = (1 - 2 * q) * s
    r = (1 + w * w).sqrt()
    # exp(a u) = exp(a / 2) / (w + r) and exp(a / 2) - (w + r) = 2q (s + s^2 (2 - 2q) / (c + r)): no cancellation
    low = torch.log1p(2 * q * (s + s * s * (2 - 2 * q) / (c + r)) / (w + r)) / a
    return torch.where(p <= 0.5, low, 1 - low)


def sample_training_sigmas(
    batch: int,
    method: str = "uniform",
    sigma_max: float = 1.0,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 3.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``batch`` FM sigmas in ``(0, sigma_max]`` (float32 on ``device``).

    ``u`` in (0, 1) is drawn by ``method`` and scaled by ``sigma_max`` (eps models train on
    ``(0, Diff2Flow.sigma_max]``, docs/MATH.md section 5):

    - ``uniform``: ``u ~ U(0, 1)``;
    - ``logit_normal``: ``u = sigmoid(logit_mean + logit_std * z)``, ``z ~ N(0, 1)`` (SD3);
    - ``shift``: ``u = time_shift(U(0, 1), shift)`` (more weight on high noise for shift > 1);
    - ``u_shaped``: density proportional to ``cosh(a (u - 1/2))``, ``a =`` :data:`U_SHAPED_A` (Lee, Lin,
      Fanti 2024), drawn exactly by its inverse CDF (:func:`u_shaped_quantile`) from one uniform per sample.

    Random numbers come from ``generator`` (on its own device) and are then moved to ``device``.
    """
    if method not in TIMESTEP_SAMPLERS:
        raise ValueError(f"timestep sampling {method!r} is unknown: choose one of {', '.join(TIMESTEP_SAMPLERS)}")
    if not 0 < sigma_max <= 1:
        raise ValueError(f"sigma_max must lie in (0, 1], got {sigma_max}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if method == "logit_normal":
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        z = torch.randn(batch, generator=generator, device=gen_device, dtype=torch.float64)
        u = torch.sigmoid(logit_mean + logit_std * z)
    else:
        # 1 - U[0, 1) lies in (0, 1]: sigma = 0 (a clean sample) teaches nothing.
        u = 1.0 - torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64)
        if method == "shift":
            u = time_shift(u, shift)
        elif method == "u_shaped":
            u = u_shaped_quantile(u)
    return (u * sigma_max).to(device=device if device is not None else gen_device, dtype=torch.float32)


def place_on_sampling_grid(
    sigmas: torch.Tensor,
    nodes: torch.Tensor,
    share: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``sigmas`` with each one replaced, with probability ``share``, by one of ``nodes`` drawn uniformly
    (docs/MATH.md section 6): the training draws of a model meant for a few-step sampler put that share of
    its steps on the very levels the sampler evaluates. One uniform per sample decides, then one integer per
    sample picks the node, from ``generator`` on its own device; ``share = 0`` draws nothing (a run without
    it draws the same random numbers as before the option existed).
    """
    if not 0 <= share <= 1:
        raise ValueError(f"the sampling grid's share must lie in [0, 1], got {share}")
    if share == 0:
        return sigmas
    if nodes.ndim != 1 or nodes.numel() == 0:
        raise ValueError(f"the sampling grid needs at least one node, got shape {tuple(nodes.shape)}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    batch = sigmas.shape[0]
    on_grid = torch.rand(batch, generator=generator, device=gen_device) < share
    pick = torch.randint(0, nodes.numel(), (batch,), generator=generator, device=gen_device)
    placed = nodes.to(gen_device, sigmas.dtype)[pick]
    return torch.where(on_grid.to(sigmas.device), placed.to(sigmas.device), sigmas)


def diff2flow_loss(
    network: Network,
    d2f: Diff2Flow,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    *args: Any,
    loss: str = "mse",
    huber_c: float = 0.0,
    **kwargs: Any,
) -> ObjectiveOutput:
    """The Diff2Flow objective: velocity MSE (or ``loss``) of the aligned diffusion network at FM ``sigma``."""
    x_sigma = interpolant(x0, noise, sigma)
    x_in, t = d2f.network_inputs(x_sigma, sigma)
    v_hat = d2f.velocity(network(x_in, t, *args, **kwargs), x_sigma, sigma)
    target = noise - x0
    per_sample = per_sample_loss(v_hat, target, loss, huber_c)
    return ObjectiveOutput(per_sample.mean(), per_sample, torch.as_tensor(sigma), v_hat, target)


def naive_fm_velocity_fn(network: Network, num_timesteps: int = 1000) -> Callable[..., torch.Tensor]:
    """The naive-FM model as a velocity function: ``network(x_sigma, T * sigma)`` is the velocity."""

    def velocity(x: torch.Tensor, sigma: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
        return network(x, num_timesteps * sigma, *args, **kwargs)

    return velocity


def naive_fm_loss(
    network: Network,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    *args: Any,
    num_timesteps: int = 1000,
    loss: str = "mse",
    huber_c: float = 0.0,
    **kwargs: Any,
) -> ObjectiveOutput:
    """Naive FM fine-tuning: no alignment, the raw output is regressed on ``eps - x0`` (MSE, or ``loss``)."""
    x_sigma = interpolant(x0, noise, sigma)
    v_hat = naive_fm_velocity_fn(network, num_timesteps)(x_sigma, sigma, *args, **kwargs)
    target = noise - x0
    per_sample = per_sample_loss(v_hat, target, loss, huber_c)
    return ObjectiveOutput(per_sample.mean(), per_sample, torch.as_tensor(sigma), v_hat, target)


def diffusion_loss(
    network: Network,
    d2f: Diff2Flow,
    x0: torch.Tensor,
    noise: torch.Tensor,
    tau: torch.Tensor,
    *args: Any,
    loss: str = "mse",
    huber_c: float = 0.0,
    **kwargs: Any,
) -> ObjectiveOutput:
    """Standard diffusion fine-tuning at integer timesteps ``tau``: eps or v MSE (or ``loss``) per the model."""
    tau = torch.as_tensor(tau, device=x0.device).long()
    ac = d2f.alphas_cumprod.to(x0.device)[tau]
    shape = (-1,) + (1,) * (x0.ndim - 1)
    compute = torch.promote_types(x0.dtype, torch.float32)
    a, s = ac.sqrt().to(compute).reshape(shape), (1 - ac).sqrt().to(compute).reshape(shape)
    x_tau = (a * x0.to(compute) + s * noise.to(compute)).to(x0.dtype)
    out = network(x_tau, tau.to(torch.float32), *args, **kwargs)
    target = noise if d2f.prediction == "eps" else (a * noise.to(compute) - s * x0.to(compute)).to(noise.dtype)
    per_sample = per_sample_loss(out, target, loss, huber_c)
    return ObjectiveOutput(per_sample.mean(), per_sample, tau, out, target)


def _naive_fm(
    network: Network,
    d2f: Diff2Flow,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    *args: Any,
    **kwargs: Any,
) -> ObjectiveOutput:
    return naive_fm_loss(network, x0, noise, sigma, *args, num_timesteps=d2f.num_timesteps, **kwargs)


def _naive_fm_velocity(network: Network, d2f: Diff2Flow) -> Callable[..., torch.Tensor]:
    return naive_fm_velocity_fn(network, d2f.num_timesteps)


def _aligned_velocity(network: Network, d2f: Diff2Flow) -> Callable[..., torch.Tensor]:
    return d2f.velocity_fn(network)


def _fm_grid(d2f: Diff2Flow, steps: int) -> torch.Tensor:
    return fm_sigmas(steps, sigma_max=d2f.sigma_max)


@dataclass(frozen=True)
class Objective:
    """Everything that makes one training objective, in one record (the registry :data:`OBJECTIVES`).

    - ``loss(network, d2f, x0, noise, times, **cond) -> ObjectiveOutput``: the loss on given noise
      and times (the network input and the compared target are the loss function's business), reduced
      per sample by the keywords ``loss`` / ``huber_c`` (:func:`d2f_core.losses.per_sample_loss`).
    - ``times``: ``"sigma"`` (FM sigma in ``(0, d2f.sigma_max]`` drawn by the timestep sampling) or
      ``"tau"`` (integer diffusion timestep, uniform).
    - ``paired_noise``: the noise of each sample comes with the data (reflow's (noise, image) pairs,
      the per-sample tensor ``"noise"``: the ``z`` the teacher started from) instead of being drawn;
      the loss is taken on the line from the trained model's own start ``d2f.sigma_max * z`` to the
      image (:func:`reflow_line_noise`), whatever the teacher's ``sigma_max`` was.
    - ``flow_model``: how a model trained with it is sampled: ``"diff2flow"`` (the aligned model,
      ``Diff2Flow.velocity_fn`` / the ComfyUI patch) or ``"naive"`` (raw output = velocity at
      ``T * sigma``, :func:`naive_fm_velocity_fn`).
    - ``velocity_fn(network, d2f)``: that sampling model as an FM velocity function;
      ``sampler_sigmas(d2f, steps)``: the sigma grid its own sampler walks (``sampling_label`` names
      it in reports).
    - ``sampler``, ``steps``, ``cfg``: the recommended sampling settings (loader and KSampler defaults).
    - ``depth_steps``: the recommended steps of an image-to-depth model trained with it (docs/MATH.md
      section 13), when they differ from ``steps`` (:meth:`recommended_steps`).
    - ``recommended_loss``: the per-sample loss (:data:`d2f_core.losses.LOSSES`) a training run uses when
      it asks for the objective's recommended one.
    - ``recommended_grid_share``: the share of the training sigmas a run that asks for the recommended one
      places on :meth:`sampling_nodes` (``times = "sigma"`` objectives only).

    A new objective is one more entry; per-sample tensors other than ``"noise"`` (for example an
    image-conditioned model's ``"concat"`` latent) reach the network as keyword arguments.
    """

    name: str
    description: str
    loss: Callable[..., ObjectiveOutput]
    velocity_fn: Callable[[Network, Diff2Flow], Callable[..., torch.Tensor]] = _aligned_velocity
    sampler_sigmas: Callable[[Diff2Flow, int], torch.Tensor] = _fm_grid
    sampling_label: str = "FM Euler"
    times: str = "sigma"
    paired_noise: bool = False
    flow_model: str = "diff2flow"
    sampler: str = "euler"
    steps: int = 20
    cfg: float = 5.0
    depth_steps: int | None = None
    recommended_loss: str = "mse"
    recommended_grid_share: float = 0.0

    def __post_init__(self) -> None:
        if self.recommended_loss not in LOSSES:
            raise ValueError(
                f"objective {self.name}: recommended_loss {self.recommended_loss!r} is not one of {', '.join(LOSSES)}"
            )
        if not 0 <= self.recommended_grid_share <= 1 or (self.recommended_grid_share and self.times != "sigma"):
            raise ValueError(
                f"objective {self.name}: recommended_grid_share {self.recommended_grid_share} must lie in [0, 1], "
                "and be 0 for an objective that does not train on FM sigmas"
            )

    def sampling_nodes(self, d2f: Diff2Flow) -> torch.Tensor:
        """The sigmas at which the recommended sampling (``steps`` steps of :attr:`sampler_sigmas`) evaluates
        the model: its grid without the final 0 (float64; reflow's 2 steps: ``sigma_max`` and ``sigma_max / 2``)."""
        if self.times != "sigma":
            raise ValueError(
                f"objective {self.name!r} trains on integer timesteps, not FM sigmas: it has no FM sampling grid "
                "to place training sigmas on (grid_share 0)"
            )
        grid = torch.as_tensor(self.sampler_sigmas(d2f, self.steps), dtype=torch.float64)
        return grid[grid > 0]

    def recommended_steps(self, task: str = "image") -> int:
        """The sampling steps to recommend for a model of ``task`` (``"image"`` or ``"depth"``) trained
        with this objective: ``depth_steps`` for a depth model where set, else ``steps``."""
        return self.depth_steps if task == "depth" and self.depth_steps is not None else self.steps

    def draw(
        self,
        x0: torch.Tensor,
        d2f: Diff2Flow,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        *,
        timestep_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 3.0,
        grid_share: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noise, times)`` for a batch shaped like ``x0``, drawn from ``generator`` on its own
        device (noise first, then times: the order every caller relies on for reproducibility).

        ``grid_share`` of the sigmas are then moved onto :meth:`sampling_nodes` (:func:`place_on_sampling_grid`).

        ``noise`` is the data's own noise when the data carries it (required for paired-noise
        objectives: the pair's ``z``, returned as the noise end of the line through ``d2f``'s own start,
        :func:`reflow_line_noise`); otherwise standard normal noise is drawn.
        """
        gen_device = generator.device if generator is not None else torch.device("cpu")
        batch = x0.shape[0]
        # first, so an objective without FM sigmas is refused before anything is drawn
        nodes = self.sampling_nodes(d2f) if grid_share else None
        if noise is None:
            if self.paired_noise:
                raise ValueError(
                    f"objective {self.name!r} trains on (noise, image) pairs, but the training data carries no "
                    "paired noise: train it on a pairs folder (generated from the teacher model)"
                )
            noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=torch.float32)
        elif tuple(noise.shape) != tuple(x0.shape):
            raise ValueError(f"paired noise of shape {tuple(noise.shape)} does not match the latents {tuple(x0.shape)}")
        elif self.paired_noise:
            # the student samples from its own start, which may differ from the teacher's (zero terminal SNR on
            # one side only): its line must pass through the state it will actually start from
            noise = reflow_line_noise(noise, x0.to(noise.device, noise.dtype), d2f.sigma_max)
        if self.times == "tau":
            times = torch.randint(0, d2f.num_timesteps, (batch,), generator=generator, device=gen_device)
        else:
            times = sample_training_sigmas(
                batch,
                timestep_sampling,
                d2f.sigma_max,
                logit_mean=logit_mean,
                logit_std=logit_std,
                shift=shift,
                generator=generator,
            )
            if nodes is not None:
                times = place_on_sampling_grid(times, nodes, grid_share, generator)
        return noise, times


OBJECTIVES: dict[str, Objective] = {
    objective.name: objective
    for objective in (
        Objective(
            "diff2flow",
            "the paper's aligned flow-matching objective: the diffusion network's output turned into an FM "
            "velocity in closed form",
            diff2flow_loss,
            # a depth map is nearly a function of its image, so the image-conditioned flow from noise to it is
            # nearly straight and few Euler steps follow it (Marigold-style depth models are sampled in 1-4
            # steps); 4, the safe end of that range (a recommendation: the Depth Estimate node's default)
            depth_steps=4,
        ),
        Objective(
            "naive_fm",
            "flow matching without the alignment: the raw output is regressed on the velocity (for comparison)",
            _naive_fm,
            velocity_fn=_naive_fm_velocity,
            sampling_label="FM Euler (raw output)",
            flow_model="naive",
        ),
        Objective(
            "diffusion",
            "the model's own eps / v loss at integer timesteps (ordinary diffusion fine-tuning, for comparison)",
            diffusion_loss,
            sampler_sigmas=ddim_trailing_sigmas,
            sampling_label="DDIM (trailing)",
            times="tau",
        ),
        Objective(
            "reflow",
            "few-step sampling: the diff2flow loss on the straight line between each (noise, image) pair of a "
            "teacher's ODE (train on a pairs folder); sample with 1-4 Euler steps at cfg 1",
            # the same loss as diff2flow: only the coupling differs (the noise is the pair's z, not drawn)
            diff2flow_loss,
            paired_noise=True,
            # 2 steps: a reflow LoRA's 2-step FD matches its teacher's 8-step FD (benchmarks/reflow.py); cfg 1: a
            # student of guided pairs has the guidance built in (docs/MATH.md section 12)
            steps=2,
            cfg=1.0,
            # pseudo-Huber beat MSE at every step count on 3 seeds, most at 1 step (FD 3.82 against 4.15;
            # benchmarks/results/reflow_second_generation.md), as in Lee, Lin, Fanti 2024
            recommended_loss="pseudo_huber",
            # half the draws on the 2-step grid (sigma_max, sigma_max / 2): a lower mean FD at every step count on 3
            # seeds (LoRA r16, 2 steps: 3.29 against 3.45), and at 1 step on all of 6 seeds at rank 128
            # (benchmarks/results/reflow_second_generation.md)
            recommended_grid_share=0.5,
        ),
    )
}


def get_objective(name: str) -> Objective:
    """The registry entry of ``name``, or a ``ValueError`` listing the known objectives."""
    if name not in OBJECTIVES:
        raise ValueError(f"objective {name!r} is unknown: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def objective_loss(
    objective: str,
    network: Network,
    d2f: Diff2Flow,
    x0: torch.Tensor,
    *args: Any,
    noise: torch.Tensor | None = None,
    timestep_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 3.0,
    generator: torch.Generator | None = None,
    loss: str = "mse",
    huber_c: float = 0.0,
    grid_share: float = 0.0,
    **kwargs: Any,
) -> ObjectiveOutput:
    """Draw noise and times (:meth:`Objective.draw`) and evaluate ``objective`` on them.

    FM objectives draw sigma in ``(0, d2f.sigma_max]`` with ``timestep_sampling``; naive FM
    uses the same range so the comparison is fair. The diffusion objective draws integer tau
    uniformly. ``generator`` makes the draws reproducible (noise is drawn before times).
    ``loss`` / ``huber_c``: each sample's loss (:data:`d2f_core.losses.LOSSES`); ``grid_share``: the share of
    the sigmas moved onto the objective's sampling grid (:meth:`Objective.draw`).
    """
    record = get_objective(objective)
    noise, times = record.draw(
        x0,
        d2f,
        generator,
        noise,
        timestep_sampling=timestep_sampling,
        logit_mean=logit_mean,
        logit_std=logit_std,
        shift=shift,
        grid_share=grid_share,
    )
    noise, times = noise.to(x0.device, x0.dtype), times.to(x0.device)
    return record.loss(network, d2f, x0, noise, times, *args, loss=loss, huber_c=huber_c, **kwargs)


def evaluate_objective(
    objective: str,
    network: Network,
    d2f: Diff2Flow,
    x0: torch.Tensor,
    noise: torch.Tensor,
    times: torch.Tensor,
    *args: Any,
    loss: str = "mse",
    huber_c: float = 0.0,
    **kwargs: Any,
) -> ObjectiveOutput:
    """``objective`` on given noise and times: FM sigmas for the ``times="sigma"`` objectives,
    integer tau for ``diffusion``; ``loss`` / ``huber_c``: each sample's loss."""
    return get_objective(objective).loss(network, d2f, x0, noise, times, *args, loss=loss, huber_c=huber_c, **kwargs)


def validation_sigmas(segments: int = 8) -> torch.Tensor:
    """The centres ``(i + 0.5) / segments`` of equal sigma segments of [0, 1] (float64)."""
    if segments < 1:
        raise ValueError(f"segments must be >= 1, got {segments}")
    return (torch.arange(segments, dtype=torch.float64) + 0.5) / segments


@torch.no_grad()
def fm_validation_loss(
    velocity_fn: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    *args: Any,
    segments: int = 8,
    seed: int = 0,
    sigmas: Sequence[float] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The comparable validation loss: FM velocity MSE at fixed sigmas with fixed noise.

    Every model is first turned into a velocity function ``velocity_fn(x_sigma, sigma, *args,
    **kwargs)`` (``Diff2Flow.velocity_fn`` for diffusion and Diff2Flow models,
    :func:`naive_fm_velocity_fn` for naive FM), so all objectives are scored on one scale.
    Noise is drawn on the CPU from ``seed``, so the loss is the same on every device.
    Returns ``{"sigmas": [..], "per_segment": [..], "mean": float}``.
    """
    grid = validation_sigmas(segments) if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    per_segment = []
    for sigma in grid:
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0.device, x0.dtype)
        s = sigma.to(x0.device, torch.float32).expand(x0.shape[0])
        v = velocity_fn(interpolant(x0, noise, s), s, *args, **kwargs)
        per_segment.append(float(_mse(v, noise - x0).mean()))
    return {"sigmas": grid.tolist(), "per_segment": per_segment, "mean": sum(per_segment) / len(per_segment)}
