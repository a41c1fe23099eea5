"""Image-to-depth with a diffusion prior, the parts that are pure tensor maths (docs/MATH.md section 13).

A depth model is an ordinary SD UNet whose first convolution takes the noisy depth latent and the
clean image latent side by side (8 input channels); it is trained with the registry's objectives
(``diff2flow``, ``diffusion``, ``naive_fm``) on the image latent passed as the per-sample tensor
``"concat"``. Depth is only known up to an affine map (a monocular image fixes neither the scale
nor the offset of a depth map), so everything here is affine-invariant:

- :func:`normalize_depth`: a depth map to the VAE's range: per image, the 2 % / 98 % quantiles go
  to -1 / 1 (clipped), so the target does not depend on the scene's scale.
- :func:`depth_as_image` / :func:`image_as_depth`: one depth channel to the 3 channels a VAE
  encodes, and back (the mean of the decoded channels).
- :func:`widen_input_conv`: the 4-channel first convolution widened to take the concatenated
  image latent, so that the widened network equals the base one on duplicated input.
- :func:`fit_affine`, :func:`ensemble_depth`: least-squares scale and shift, and the ensemble of
  several predictions of one image aligned to each other before their median.
- :func:`abs_rel`, :func:`delta1`, :func:`depth_metrics`: the standard error measures, after the
  least-squares affine alignment of the prediction to the ground truth.

Time plays no part here; the objectives keep the one convention (FM sigma in [0, 1], sigma = 1 is
noise, ``x_sigma = (1 - sigma) x0 + sigma eps``).
"""

from __future__ import annotations

import torch

__all__ = [
    "DEPTH_QUANTILES",
    "normalize_depth",
    "depth_as_image",
    "image_as_depth",
    "widen_input_conv",
    "fit_affine",
    "align_affine",
    "ensemble_depth",
    "abs_rel",
    "delta1",
    "depth_metrics",
]

DEPTH_QUANTILES = (0.02, 0.98)


def _per_image(depth: torch.Tensor, name: str) -> torch.Tensor:
    """``depth`` as [B, 1, H, W] (accepts [B, H, W] and [B, 1, H, W])."""
    if depth.ndim == 3:
        depth = depth.unsqueeze(1)
    if depth.ndim != 4 or depth.shape[1] != 1:
        raise ValueError(f"{name} must have shape [B, H, W] or [B, 1, H, W], got {tuple(depth.shape)}")
    return depth


def _valid(depth: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    valid = torch.isfinite(depth)
    if mask is not None:
        valid &= _per_image(mask, "mask").to(torch.bool)
    return valid


def normalize_depth(
    depth: torch.Tensor, mask: torch.Tensor | None = None, quantiles: tuple[float, float] = DEPTH_QUANTILES
) -> torch.Tensor:
    """Per-image affine map of ``depth`` ([B, H, W] or [B, 1, H, W]) to [-1, 1]: the ``quantiles``
    (default 2 % / 98 %) of the valid pixels (finite, inside ``mask``) go to -1 / 1, values
    beyond them are clipped. Invalid pixels become 0. Returns [B, 1, H, W] float32.

    Quantiles rather than min / max: a few outlier pixels (sky, sensor noise) must not squeeze
    the rest of the scene into a sliver of the range.
    """
    low_q, high_q = quantiles
    if not 0 <= low_q < high_q <= 1:
        raise ValueError(f"quantiles must satisfy 0 <= low < high <= 1, got {quantiles}")
    depth = _per_image(depth, "depth").to(torch.float32)
    valid = _valid(depth, mask)
    out = torch.zeros_like(depth)
    for i in range(depth.shape[0]):
        values = depth[i][valid[i]]
        if values.numel() < 2:
            raise ValueError(f"depth map {i} has fewer than 2 valid pixels: check its file and mask")
        low, high = torch.quantile(values, torch.tensor([low_q, high_q]))
        if not high > low:
            raise ValueError(
                f"depth map {i} is constant ({float(low):g}) between its {low_q:.0%} and {high_q:.0%} quantiles: "
                "a flat depth map teaches nothing; remove it from the dataset"
            )
        scaled = (depth[i] - low) / (high - low) * 2 - 1
        out[i] = torch.where(valid[i], scaled.clamp(-1, 1), torch.zeros_like(scaled))
    return out


def depth_as_image(depth: torch.Tensor) -> torch.Tensor:
    """Normalised depth [B, 1, H, W] in [-1, 1] as the 3-channel image [B, 3, H, W] a VAE encodes
    (the channel replicated)."""
    return _per_image(depth, "depth").expand(-1, 3, -1, -1).contiguous()


def image_as_depth(image: torch.Tensor) -> torch.Tensor:
    """A decoded depth image [B, 3, H, W] back to one channel [B, 1, H, W]: the channel mean
    (the VAE's round trip leaves small colour differences between the channels)."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must have shape [B, 3, H, W], got {tuple(image.shape)}")
    return image.mean(dim=1, keepdim=True)


def widen_input_conv(weight: torch.Tensor, copies: int = 2) -> torch.Tensor:
    """The first convolution's weight [O, C, kh, kw] widened to [O, copies * C, kh, kw] for an input
    of ``copies`` latents side by side: each copy holds the given weights divided by ``copies``.

    On duplicated input ``cat([x] * copies)`` the widened convolution gives exactly the given one's
    output (the bias is unchanged), so an image-conditioned model starts as its prior.
    """
    if weight.ndim < 2:
        raise ValueError(f"weight must be a convolution or linear weight, got shape {tuple(weight.shape)}")
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    return torch.cat([weight / copies] * copies, dim=1)


def fit_affine(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image least-squares ``(scale, shift)`` [B] with ``scale * pred + shift ~ target`` over the
    valid pixels (finite in both, inside ``mask``). Solved in float64 in closed form."""
    pred, target = _per_image(pred, "pred").double(), _per_image(target, "target").double()
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have one shape")
    valid = _valid(pred, mask) & torch.isfinite(target)
    scales, shifts = [], []
    for i in range(pred.shape[0]):
        p, t = pred[i][valid[i]], target[i][valid[i]]
        if p.numel() < 2:
            raise ValueError(f"image {i} has fewer than 2 valid pixels to fit a scale and shift")
        p_mean, t_mean = p.mean(), t.mean()
        var = (p - p_mean).pow(2).sum()
        scale = (p - p_mean).mul(t - t_mean).sum() / var if var > 0 else torch.zeros((), dtype=p.dtype)
        scales.append(scale)
        shifts.append(t_mean - scale * p_mean)
    return torch.stack(scales), torch.stack(shifts)


def align_affine(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``pred`` mapped by its least-squares scale and shift onto ``target`` (:func:`fit_affine`),
    [B, 1, H, W] float64."""
    scale, shift = fit_affine(pred, target, mask)
    return _per_image(pred, "pred").double() * scale.view(-1, 1, 1, 1) + shift.view(-1, 1, 1, 1)


def ensemble_depth(members: torch.Tensor, iterations: int = 3) -> torch.Tensor:
    """The ensemble of ``members`` [N, B, 1, H, W] (N predictions of each of B images, each valid up
    to its own scale and shift): every member is aligned by least squares to the current median,
    the median is recomputed, ``iterations`` times; the result is scaled to [0, 1] per image,
    [B, 1, H, W] float32.

    Starting from member 0 as the reference: members that are exact affine images of one map are
    all mapped onto member 0's scale, so their median is that map and the result is exactly its
    [0, 1] normalisation.
    """
    if members.ndim == 4:
        members = members.unsqueeze(2)
    if members.ndim != 5 or members.shape[2] != 1:
        raise ValueError(f"members must have shape [N, B, 1, H, W] or [N, B, H, W], got {tuple(members.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    members = members.double()
    reference = members[0]
    for _ in range(iterations):
        aligned = torch.stack([align_affine(m, reference) for m in members])
        reference = aligned.median(dim=0).values if members.shape[0] > 2 else aligned.mean(dim=0)
    flat = reference.flatten(1)
    low, high = flat.min(dim=1).values.view(-1, 1, 1, 1), flat.max(dim=1).values.view(-1, 1, 1, 1)
    return ((reference - low) / (high - low).clamp_min(1e-12)).float()


def _aligned_positive(
    pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prediction aligned to ``gt`` and both as flat valid-pixel lists per image, with the aligned
    prediction kept above zero (ratios need positive depth)."""
    gt = _per_image(gt, "gt").double()
    valid = _valid(gt, mask) & (gt > 0)
    aligned = align_affine(pred, gt, valid).clamp_min(1e-6)
    return aligned, valid


def abs_rel(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute relative error ``|d - d*| / d*`` per image [B], after aligning ``pred`` to the
    ground truth ``gt`` (positive depth) by least-squares scale and shift."""
    aligned, valid = _aligned_positive(pred, gt, mask)
    gt = _per_image(gt, "gt").double()
    return torch.stack([((aligned[i] - gt[i]).abs() / gt[i])[valid[i]].mean() for i in range(gt.shape[0])])


def delta1(
    pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None, threshold: float = 1.25
) -> torch.Tensor:
    """The fraction of pixels with ``max(d / d*, d* / d) < threshold`` per image [B], after the same
    alignment as :func:`abs_rel`."""
    aligned, valid = _aligned_positive(pred, gt, mask)
    gt = _per_image(gt, "gt").double()
    ratio = torch.maximum(aligned / gt, gt / aligned)
    return torch.stack([(ratio[i][valid[i]] < threshold).double().mean() for i in range(gt.shape[0])])


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """``{"abs_rel": .., "delta1": ..}``: the means over the batch of :func:`abs_rel` and :func:`delta1`."""
    return {"abs_rel": float(abs_rel(pred, gt, mask).mean()), "delta1": float(delta1(pred, gt, mask).mean())}
