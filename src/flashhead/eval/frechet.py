"""The Fréchet distance between two Gaussians, the number behind FID and FVD.

    d² = ||mu1 - mu2||² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½)

The reference implementations differ only in how they take tr((S1 S2)^½): pytorch-fid and StyleGAN-V
call `scipy.linalg.sqrtm` on the non-symmetric product, torchmetrics sums the square roots of its
(complex) eigenvalues. We use the symmetric form tr((S1^½ S2 S1^½)^½) by default: the matrix is
symmetric positive semi-definite, so `eigh` gives real eigenvalues whose tiny negative round-off can be
clipped to zero — no complex arithmetic and no "imaginary component" failures on rank-deficient
covariances (fewer samples than feature dimensions). All three agree to ~1e-9 on well-conditioned
inputs; `tests/eval/test_frechet.py` checks ours against torchmetrics.

Covariances: FID (torchmetrics, pytorch-fid) uses the unbiased estimate (ddof=1); StyleGAN-V's FVD
divides by N (ddof=0). `gaussian_stats` takes `ddof` so each metric can match its reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import scipy.linalg

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance of a feature set, plus how many samples they came from."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    n: int


def gaussian_stats(features: np.ndarray, ddof: int = 1) -> GaussianStats:
    """Mean and covariance of `features` (N, D), accumulated in float64.

    Args:
        features: one row per sample.
        ddof: 1 for the unbiased covariance (FID as torchmetrics / pytorch-fid), 0 for the maximum-likelihood
            one (FVD as StyleGAN-V).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    n = x.shape[0]
    if n - ddof < 1:
        raise ValueError(f"need more than {ddof} samples for a covariance, got {n}")
    mu = x.mean(axis=0)
    centred = x - mu
    sigma = centred.T @ centred / (n - ddof)
    return GaussianStats(mu=mu, sigma=sigma, n=n)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, method: str) -> float:
    if method == "eigh":
        root1 = _psd_sqrt(sigma1)
        w = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
        return float(np.sqrt(np.clip(w, 0.0, None)).sum())
    if method == "sqrtm":
        # pytorch-fid's recipe: sqrtm of the product; on a singular product, retry with a small ridge.
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            eps = 1e-6
            log.warning("sqrtm of the covariance product is singular; adding %g to the diagonals", eps)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        return float(np.real(np.trace(covmean)))
    raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, method: str = "eigh"
) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: means, shape (D,).
        sigma1, sigma2: covariances, shape (D, D), symmetric positive semi-definite.
        method: "eigh" (default; symmetric eigen-decomposition, robust to rank deficiency) or "sqrtm"
            (scipy's matrix square root of the product, as pytorch-fid and StyleGAN-V).

    Returns:
        The distance as FID/FVD report it (the *squared* Fréchet distance), a Python float.
    """
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, sigma2 {sigma2.shape}"
        )
    diff = mu1 - mu2
    tr_covmean = _trace_sqrt_product(sigma1, sigma2, method)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_from_features(pred: np.ndarray, real: np.ndarray, ddof: int = 1, method: str = "eigh") -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N1, D) and (N2, D)."""
    a, b = gaussian_stats(pred, ddof), gaussian_stats(real, ddof)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, method=method)


def batched_features(
    items: Iterable[np.ndarray], batch_size: int, embed: Callable[[np.ndarray], np.ndarray]
) -> list[np.ndarray]:
    """Run `embed` on stacked uint8 batches of `items`; the feature blocks in order (empty if no items)."""
    feats: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    for item in items:
        batch.append(np.asarray(item, dtype=np.uint8))
        if len(batch) == batch_size:
            feats.append(embed(np.stack(batch)))
            batch.clear()
    if batch:
        feats.append(embed(np.stack(batch)))
    return feats
