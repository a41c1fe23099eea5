"""Per-sample regression losses by name (docs/MATH.md section 6).

Every objective compares a prediction with a target (a velocity, or eps / v for the diffusion
objective) and reduces the difference to one number per sample with the loss chosen here; the
batch loss is the mean of those numbers. :data:`LOSSES` is the registry (name -> description):
the training option ``loss``, the node's combo and the CLI's choices read it.

- ``mse``: the mean of the squared residual over the sample's values (the default).
- ``pseudo_huber``: ``sqrt(|r|^2 + c^2) - c`` on the Euclidean norm of the sample's residual ``r``
  (Lee, Lin, Fanti, "Improving the Training of Rectified Flows", NeurIPS 2024, section 4.2, after
  Song and Dhariwal, "Improved Techniques for Training Consistency Models", ICLR 2024). It is
  ``|r|^2 / (2c)`` for ``|r| << c`` and ``|r| - c`` for ``|r| >> c``: past ``c`` a sample's gradient
  has a fixed size, so samples with a large residual weigh less than under MSE. Its default
  ``c = 0.00054 * sqrt(d)``, ``d`` the number of values of one sample (C*H*W of a latent), is the
  one both papers use.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "LOSSES",
    "PSEUDO_HUBER_C_PER_SQRT_DIM",
    "default_huber_c",
    "check_loss",
    "mse",
    "pseudo_huber",
    "per_sample_loss",
]

# the factor of the default c = 0.00054 * sqrt(d) (Song and Dhariwal 2024; Lee, Lin, Fanti 2024, section 4.2):
# 0.03 for a 3x32x32 image, 0.069 for a 4x64x64 SD latent
PSEUDO_HUBER_C_PER_SQRT_DIM = 0.00054

LOSSES = {
    "mse": "mean squared error of the prediction over each sample's values",
    "pseudo_huber": "sqrt(|r|^2 + c^2) - c of each sample's residual r: |r|^2 / (2c) for small residuals, the "
    "norm |r| for large ones, so outliers weigh less (Lee, Lin, Fanti 2024; c: huber_c)",
}
"""How an objective reduces its prediction's residual to one loss per sample (:func:`per_sample_loss`),
each with its description."""


def default_huber_c(dim: int) -> float:
    """The pseudo-Huber ``c`` of samples of ``dim`` values: ``0.00054 * sqrt(dim)``."""
    if dim < 1:
        raise ValueError(f"a sample needs at least one value, got {dim}")
    return PSEUDO_HUBER_C_PER_SQRT_DIM * math.sqrt(dim)


def check_loss(loss: str, huber_c: float = 0.0) -> None:
    """``ValueError`` naming the problem for an unknown ``loss`` or a ``huber_c`` that is negative, not a
    number, or given to a loss without a ``c``."""
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r} is unknown: choose one of {', '.join(LOSSES)}")
    if not huber_c >= 0 or math.isinf(huber_c):
        raise ValueError(f"huber_c must be a finite number >= 0 (0: the default c), got {huber_c}")
    if huber_c > 0 and loss != "pseudo_huber":
        raise ValueError(
            f"huber_c {huber_c:g} is the c of loss pseudo_huber, but the loss is {loss}: set loss pseudo_huber, "
            "or huber_c 0"
        )


def _compute_dtype(prediction: torch.Tensor, target: torch.Tensor) -> torch.dtype:
    # always reduce in float32 or wider: bf16/fp16 squared errors lose the small differences
    return torch.promote_types(torch.promote_types(prediction.dtype, target.dtype), torch.float32)


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean squared residual of each sample (dimension 0 is the batch), in float32 or wider."""
    compute = _compute_dtype(prediction, target)
    return (prediction.to(compute) - target.to(compute)).pow(2).flatten(1).mean(1)


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float = 0.0) -> torch.Tensor:
    """``sqrt(|r|^2 + c^2) - c`` of each sample's residual ``r = prediction - target`` (``|.|`` the
    Euclidean norm over all but dimension 0), in float32 or wider; ``c = 0``: :func:`default_huber_c`
    of the sample's number of values.

    Evaluated as ``|r|^2 / (sqrt(|r|^2 + c^2) + c)``, the same number without the cancellation of the
    difference for residuals much smaller than ``c``."""
    if not c >= 0:
        raise ValueError(f"the pseudo-Huber c must be >= 0 (0: the default), got {c}")
    compute = _compute_dtype(prediction, target)
    squared = (prediction.to(compute) - target.to(compute)).pow(2).flatten(1).sum(1)
    c = c if c > 0 else default_huber_c(prediction[0].numel())
    return squared / ((squared + c * c).sqrt() + c)


def per_sample_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss: str = "mse", huber_c: float = 0.0
) -> torch.Tensor:
    """The loss ``loss`` (a key of :data:`LOSSES`) of each sample: :func:`mse` or :func:`pseudo_huber`
    with ``c = huber_c`` (0: the default c)."""
    check_loss(loss, huber_c)
    if loss == "mse":
        return mse(prediction, target)
    return pseudo_huber(prediction, target, huber_c)
