"""Lip-sync filter: SyncNet LSE-C / LSE-D (`flashhead.eval.syncnet`) on the cropped clip.

No SyncNet weights ship with any package; when none are found (see `flashhead.eval.weights`) the stage
is skipped, with a warning and the reason in the report, instead of passing clips it never checked.
"""

from __future__ import annotations

import numpy as np

from flashhead.data.curate.config import SyncSection
from flashhead.data.curate.face_track import Rejected

_models: dict[str | None, object] = {}


def syncnet_unavailable(cfg: SyncSection) -> str | None:
    """Why the stage cannot run here, or None when the weights load."""
    from flashhead.eval.weights import MetricUnavailable

    try:
        _load(cfg)
    except MetricUnavailable as e:
        return str(e)
    return None


def _load(cfg: SyncSection):
    if cfg.weights not in _models:
        from flashhead.eval.syncnet import load_syncnet

        _models[cfg.weights] = load_syncnet(cfg.weights)
    return _models[cfg.weights]


def check_sync(crops: np.ndarray, boxes: np.ndarray, audio: np.ndarray, cfg: SyncSection) -> dict[str, float]:
    from flashhead.eval.syncnet import sync_scores

    result = sync_scores(_load(cfg), crops, audio, boxes)
    scores = {"lse_c": result.confidence, "lse_d": result.min_dist, "av_offset": float(result.offset)}
    if result.confidence < cfg.min_confidence:
        raise Rejected(f"lip sync confidence LSE-C {result.confidence:.2f} below {cfg.min_confidence:g}")
    if result.min_dist > cfg.max_distance:
        raise Rejected(f"lip sync distance LSE-D {result.min_dist:.2f} above {cfg.max_distance:g}")
    if abs(result.offset) > cfg.max_offset:
        raise Rejected(f"audio and lips {result.offset} frames apart (more than {cfg.max_offset})")
    return scores
