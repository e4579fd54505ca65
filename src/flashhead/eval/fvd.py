"""FVD: the Fréchet distance between I3D features of 16-frame clips, as StyleGAN-V computes it.

StyleGAN-V's detector is a TorchScript I3D (`i3d_torchscript.pt`, Kinetics-400) called as
`detector(videos, rescale=True, resize=True, return_features=True)` on uint8 videos (B, 3, T, H, W):
the script itself rescales to [-1, 1], resizes to 224x224 and returns the 400-d features before the
softmax. Statistics are StyleGAN-V's: mean and covariance with 1/N (ddof=0), then the Fréchet distance.

Clips: every video is cut into non-overlapping 16-frame clips at its native frame rate (StyleGAN-V takes
one 16-frame clip per video; taking all of them gives the covariance more samples on short test sets —
`clips_per_video=1` restores one clip per video, the first).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from flashhead.eval.frechet import batched_features, frechet_distance, gaussian_stats
from flashhead.eval.weights import I3D, MetricUnavailable, resolve_weights

log = logging.getLogger(__name__)

CLIP_LEN = 16


def load_i3d(path: str | Path | None = None) -> torch.jit.ScriptModule:
    """StyleGAN-V's TorchScript I3D (found as `flashhead.eval.weights` describes)."""
    file = resolve_weights(I3D, path)
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format the detector ships in
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(file), map_location="cpu").eval()
    except Exception as e:
        raise MetricUnavailable(f"cannot load the I3D TorchScript {file}: {e}") from None


def video_clips(frames: np.ndarray, clip_len: int = CLIP_LEN, clips_per_video: int | None = None) -> list[np.ndarray]:
    """Non-overlapping `clip_len`-frame clips (clip_len, H, W, 3) from the start of the video."""
    n = len(frames) // clip_len
    if clips_per_video is not None:
        n = min(n, clips_per_video)
    return [frames[i * clip_len : (i + 1) * clip_len] for i in range(n)]


@torch.no_grad()
def i3d_features(
    detector, clips: Iterable[np.ndarray], batch_size: int = 4, device: str | torch.device = "cpu"
) -> np.ndarray:
    """I3D features (N, D) of uint8 RGB clips (T, H, W, 3), through StyleGAN-V's detector call."""
    detector = detector.to(device)

    def embed(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).permute(0, 4, 1, 2, 3).contiguous().to(device)  # B, 3, T, H, W
        return detector(x, rescale=True, resize=True, return_features=True).double().cpu().numpy()

    feats = batched_features(clips, batch_size, embed)
    if not feats:
        raise MetricUnavailable(f"no video has {CLIP_LEN} frames, so there is no clip to compute FVD on")
    return np.concatenate(feats)


def fvd_from_features(pred: np.ndarray, real: np.ndarray) -> float:
    """FVD from two feature sets, with StyleGAN-V's statistics (covariance over N, not N - 1)."""
    a, b = gaussian_stats(pred, ddof=0), gaussian_stats(real, ddof=0)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
