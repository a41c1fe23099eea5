"""Fréchet distance between two feature clouds (the FID formula, on the demo classifier's features).

    FD = |mu_1 - mu_2|^2 + tr(C_1 + C_2 - 2 (C_1^{1/2} C_2 C_1^{1/2})^{1/2})

The matrix square roots are taken by eigendecomposition of symmetric positive semi-definite
matrices (no scipy): ``C_1^{1/2} C_2 C_1^{1/2}`` is symmetric PSD, and its square root has the
same trace as ``(C_1 C_2)^{1/2}`` in the usual formula, without a non-symmetric sqrtm.
"""

from __future__ import annotations

import numpy as np
import torch


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"sqrtm_psd needs a square matrix, got shape {matrix.shape}")
    sym = 0.5 * (matrix + matrix.T)  # remove round-off asymmetry before eigh
    w, v = np.linalg.eigh(sym)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_gaussians(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu1, cov1) and N(mu2, cov2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not match: mu {mu1.shape} / {mu2.shape}, cov {cov1.shape} / {cov2.shape}")
    root1 = sqrtm_psd(cov1)
    cross = sqrtm_psd(root1 @ cov2 @ root1)
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(cross))
    return max(value, 0.0)  # tiny negative values are round-off


def _as_numpy(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        return features.detach().cpu().double().numpy()
    return np.asarray(features, dtype=np.float64)


def frechet_distance(features1: torch.Tensor | np.ndarray, features2: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets [N1, D] and [N2, D]."""
    f1, f2 = _as_numpy(features1), _as_numpy(features2)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D, got {f1.shape} and {f2.shape}")
    if min(f1.shape[0], f2.shape[0]) < 2:
        raise ValueError("each feature set needs at least 2 samples for a covariance")
    if not (np.isfinite(f1).all() and np.isfinite(f2).all()):
        raise ValueError("features contain NaN or Inf (diverged samples?)")
    return frechet_distance_gaussians(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
