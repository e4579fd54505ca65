"""Drift over long videos: does identity or colour wander away from the reference as time goes on?

The video is cut into windows (5 s by default). For each window we measure
- identity: mean CSIM of its frames' faces to the reference face (sampled at `identity_fps`);
- colour: mean CIE76 ΔE between each frame's mean Lab colour and the reference's mean Lab colour.
A least-squares line through the window values gives a slope per minute; a slope beyond the threshold
flags drift. Window means, not single frames, so talking motion and blinks average out; slopes, not
levels, so a constant offset (a slightly different but stable colour) is not called drift.

Frames are consumed as an iterator, so a 60 s, 1500-frame video never has to be in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from flashhead.eval.identity import cosine

log = logging.getLogger(__name__)

IDENTITY_SLOPE_LIMIT = -0.02  # CSIM per minute; flag when the identity falls faster than this
COLOUR_SLOPE_LIMIT = 2.0  # ΔE per minute; flag when the colour moves away faster than this


def mean_lab(frame: np.ndarray) -> np.ndarray:
    """Mean CIE Lab colour (L in 0..100) of an RGB frame, computed on a 64x64 thumbnail."""
    import cv2

    small = cv2.resize(np.ascontiguousarray(frame), (64, 64), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab).reshape(-1, 3).mean(0).astype(np.float64)


def slope_per_minute(times_s: np.ndarray, values: np.ndarray) -> float:
    t, v = np.asarray(times_s, np.float64), np.asarray(values, np.float64)
    ok = ~np.isnan(v)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(t[ok] / 60.0, v[ok], 1)[0])


@dataclass
class DriftResult:
    window_s: float
    window_centres_s: list[float]
    colour_delta_e: list[float]  # per window
    identity_csim: list[float] | None  # per window; None when no embedder was given
    colour_slope_per_min: float
    identity_slope_per_min: float | None
    colour_drift: bool
    identity_drift: bool | None

    def to_dict(self) -> dict:
        return asdict(self)


def drift(
    frames: Iterable[np.ndarray],
    fps: float,
    reference: np.ndarray | None = None,
    embedder=None,
    window_s: float = 5.0,
    identity_fps: float = 1.0,
    colour_fps: float = 5.0,
    identity_limit: float = IDENTITY_SLOPE_LIMIT,
    colour_limit: float = COLOUR_SLOPE_LIMIT,
) -> DriftResult:
    """Per-window identity and colour distance to the reference, and their trends.

    Args:
        frames: RGB frames in order (any iterable; consumed once).
        fps: frame rate of `frames`.
        reference: the reference RGB image; default the first frame.
        embedder: a face embedder (`DlibEmbedder`, `ArcFaceEmbedder`) for identity, or None to skip identity.
        window_s: window length in seconds; a trailing window shorter than half of this is dropped.
        identity_fps, colour_fps: how many frames per second are scored (embedding every frame is slow).
        identity_limit, colour_limit: slope thresholds (per minute) that flag drift.
    """
    per_window = max(1, int(round(window_s * fps)))
    id_step = max(1, int(round(fps / identity_fps)))
    colour_step = max(1, int(round(fps / colour_fps)))
    ref_lab = ref_emb = None
    if reference is not None:
        ref_lab = mean_lab(reference)
        ref_emb = embedder(reference) if embedder is not None else None
    colour: dict[int, list[float]] = {}
    ident: dict[int, list[float]] = {}
    n = 0
    for i, frame in enumerate(frames):
        n = i + 1
        if ref_lab is None:
            ref_lab = mean_lab(frame)
            ref_emb = embedder(frame) if embedder is not None else None
        w = i // per_window
        if i % colour_step == 0:
            colour.setdefault(w, []).append(float(np.linalg.norm(mean_lab(frame) - ref_lab)))
        if embedder is not None and ref_emb is not None and i % id_step == 0:
            e = embedder(frame)
            ident.setdefault(w, [])
            if e is not None:
                ident[w].append(cosine(e, ref_emb))
    if n == 0:
        raise ValueError("no frames")
    if embedder is not None and ref_emb is None:
        log.warning("no face in the drift reference; identity drift not measured")
    n_windows = n // per_window + (1 if n % per_window >= per_window / 2 else 0)
    n_windows = max(n_windows, 1)
    centres = [min((w + 0.5) * per_window, (w * per_window + n) / 2) / fps for w in range(n_windows)]
    colour_curve = [float(np.mean(colour[w])) if colour.get(w) else float("nan") for w in range(n_windows)]
    colour_slope = slope_per_minute(np.array(centres), np.array(colour_curve))
    identity_curve = identity_slope = identity_flag = None
    if embedder is not None and ref_emb is not None:
        identity_curve = [float(np.mean(ident[w])) if ident.get(w) else float("nan") for w in range(n_windows)]
        identity_slope = slope_per_minute(np.array(centres), np.array(identity_curve))
        identity_flag = bool(identity_slope < identity_limit)
    return DriftResult(
        window_s=window_s,
        window_centres_s=centres,
        colour_delta_e=colour_curve,
        identity_csim=identity_curve,
        colour_slope_per_min=colour_slope,
        identity_slope_per_min=identity_slope,
        colour_drift=bool(colour_slope > colour_limit),
        identity_drift=identity_flag,
    )


def ping_pong(frames: np.ndarray, n_out: int) -> Iterable[np.ndarray]:
    """Frames played forwards, backwards, forwards ... until `n_out` frames (a short clip made long, no jumps)."""
    if len(frames) < 2:
        raise ValueError("need at least two frames")
    period = 2 * (len(frames) - 1)
    for i in range(n_out):
        k = i % period
        yield frames[k if k < len(frames) else period - k]
