"""Our Fréchet distance equals torchmetrics' FID on identical features (to 1e-6 relative), for FID and FVD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashhead.eval.fid import fid_from_features
from flashhead.eval.frechet import frechet_distance, frechet_distance_from_features, gaussian_stats
from flashhead.eval.fvd import fvd_from_features


def correlated(seed: int, n: int, d: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated, like real network activations
    return (rng.normal(size=(n, d)) @ mixing) * scale + shift


class _Identity(torch.nn.Module):
    """A 'feature extractor' that returns its input, so torchmetrics sees exactly our features."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.num_features = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def torchmetrics_fid_of(module, pred: np.ndarray, real: np.ndarray) -> float:
    metric = module.FrechetInceptionDistance(feature=_Identity(pred.shape[1]))
    metric.update(torch.from_numpy(real).double(), real=True)
    metric.update(torch.from_numpy(pred).double(), real=False)
    return float(metric.compute())


@pytest.mark.parametrize(
    ("n", "d", "method"),
    [(600, 64, "eigh"), (600, 64, "sqrtm"), (100, 256, "eigh"), (100, 256, "sqrtm"), (40, 64, "eigh")],
    ids=["well-conditioned-eigh", "well-conditioned-sqrtm", "rank-deficient-eigh", "rank-deficient-sqrtm", "n<d"],
)
def test_fid_equals_torchmetrics_on_identical_features(torchmetrics_fid, n, d, method):
    pred, real = correlated(1, n, d, scale=1.3, shift=0.2), correlated(2, n, d)
    ours = frechet_distance_from_features(pred, real, ddof=1, method=method)
    ref = torchmetrics_fid_of(torchmetrics_fid, pred, real)
    rel = abs(ours - ref) / abs(ref)
    print(f"FID n={n} d={d} {method}: ours {ours:.10f} torchmetrics {ref:.10f} rel {rel:.2e}")
    assert rel < 1e-6
    assert fid_from_features(pred, real) == pytest.approx(ref, rel=1e-6)


def test_fvd_frechet_step_equals_torchmetrics(torchmetrics_fid):
    # FVD (StyleGAN-V) uses covariances over N; torchmetrics' Fréchet step applied to those same statistics.
    pred, real = correlated(3, 300, 400, shift=0.1), correlated(4, 280, 400)
    a, b = gaussian_stats(pred, ddof=0), gaussian_stats(real, ddof=0)
    ref = float(
        torchmetrics_fid._compute_fid(
            torch.from_numpy(a.mu), torch.from_numpy(a.sigma), torch.from_numpy(b.mu), torch.from_numpy(b.sigma)
        )
    )
    ours = fvd_from_features(pred, real)
    rel = abs(ours - ref) / abs(ref)
    print(f"FVD step: ours {ours:.10f} torchmetrics {ref:.10f} rel {rel:.2e}")
    assert rel < 1e-6


def test_closed_form_and_identities():
    # 1-D: N(0, 1) vs N(1, 4): (0 - 1)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 2
    assert frechet_distance(np.zeros(1), np.eye(1), np.ones(1), 4 * np.eye(1)) == pytest.approx(2.0, abs=1e-12)
    x = correlated(5, 200, 32)
    assert frechet_distance_from_features(x, x) == pytest.approx(0.0, abs=1e-8)
    y = correlated(6, 200, 32, shift=0.5)
    assert frechet_distance_from_features(x, y) == pytest.approx(frechet_distance_from_features(y, x), rel=1e-9)


def test_covariance_conventions():
    x = correlated(7, 50, 8)
    assert np.allclose(gaussian_stats(x, ddof=1).sigma, np.cov(x, rowvar=False))
    assert np.allclose(gaussian_stats(x, ddof=0).sigma, np.cov(x, rowvar=False, bias=True))
    with pytest.raises(ValueError):
        gaussian_stats(x[:1], ddof=1)
