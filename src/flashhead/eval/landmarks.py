"""Face landmarks (MediaPipe Face Mesh, 468 points) and LMD, the landmark distance between two videos.

MediaPipe's legacy `solutions.face_mesh` ships its TFLite models inside the wheel, so it runs offline.
The same landmarks give the face box that crops SyncNet's input and the mouth opening of the weight-free
audio-visual offset check.

LMD here is the mean Euclidean distance, in pixels of the ground-truth frame, between corresponding
landmarks of frame t of the prediction and frame t of the ground truth — over the 40 lip landmarks
(`lmd_mouth`) and over all 468 (`lmd_face`). Frames where either face is missing are skipped and counted.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from flashhead.eval.weights import MetricUnavailable

log = logging.getLogger(__name__)

N_LANDMARKS = 468
# FACEMESH_LIPS of MediaPipe, as a sorted index list (outer and inner lip contours).
LIPS = (0, 13, 14, 17, 37, 39, 40, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 146, 178, 181, 185, 191, 267, 269, 270,
        291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 375, 402, 405, 409, 415)  # fmt: skip
UPPER_LIP_INNER, LOWER_LIP_INNER = 13, 14
FOREHEAD, CHIN = 10, 152


class FaceMesh:
    """One face's 468 landmarks per RGB frame, in pixels, or None where no face is found."""

    def __init__(self, static: bool = True) -> None:
        try:
            import mediapipe as mp
        except ImportError:
            raise MetricUnavailable("landmarks need mediapipe (pip install 'flashhead[eval]')") from None
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=static, max_num_faces=1, refine_landmarks=False, min_detection_confidence=0.5
        )

    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        h, w = frame.shape[:2]
        with warnings.catch_warnings():  # mediapipe 0.10.x trips protobuf's GetPrototype deprecation per call
            warnings.filterwarnings("ignore", message=".*GetPrototype", category=UserWarning)
            result = self._mesh.process(np.ascontiguousarray(frame))
        if not result.multi_face_landmarks:
            return None
        points = result.multi_face_landmarks[0].landmark
        return np.array([(p.x * w, p.y * h) for p in points], dtype=np.float64)

    def track(self, frames: Iterable[np.ndarray]) -> np.ndarray:
        """(T, 468, 2) landmarks; NaN rows where no face was found."""
        out = []
        for frame in frames:
            lm = self(frame)
            out.append(np.full((N_LANDMARKS, 2), np.nan) if lm is None else lm)
        return np.stack(out)

    def close(self) -> None:
        self._mesh.close()


def face_boxes(landmarks: np.ndarray) -> np.ndarray:
    """Per-frame face boxes (T, 4) x0, y0, x1, y1 from landmark tracks; gaps filled by linear interpolation.

    Raises:
        MetricUnavailable: no frame has a face.
    """
    found = ~np.isnan(landmarks[:, 0, 0])
    if not found.any():
        raise MetricUnavailable("no face found in any frame")
    boxes = np.full((len(landmarks), 4), np.nan)
    boxes[found] = np.concatenate([np.nanmin(landmarks[found], axis=1), np.nanmax(landmarks[found], axis=1)], axis=1)
    t = np.arange(len(boxes))
    for k in range(4):
        boxes[:, k] = np.interp(t, t[found], boxes[found, k])
    return boxes


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """Inner-lip gap over face height per frame (T,); missing faces take the mean of the others."""
    gap = np.linalg.norm(landmarks[:, UPPER_LIP_INNER] - landmarks[:, LOWER_LIP_INNER], axis=-1)
    height = np.linalg.norm(landmarks[:, FOREHEAD] - landmarks[:, CHIN], axis=-1)
    opening = gap / height
    if np.isnan(opening).all():
        raise MetricUnavailable("no face found in any frame")
    return np.where(np.isnan(opening), np.nanmean(opening), opening)


@dataclass
class LMDResult:
    lmd_mouth: float  # mean lip-landmark distance, px of the ground-truth frame
    lmd_face: float  # mean distance over all 468 landmarks
    frames_used: int
    frames_skipped: int
    per_frame_mouth: np.ndarray  # (frames_used,)


def landmark_distance(
    pred: np.ndarray, gt: np.ndarray, pred_size: tuple[int, int], gt_size: tuple[int, int]
) -> LMDResult:
    """LMD between landmark tracks (T, 468, 2) of a prediction and its ground truth.

    Args:
        pred, gt: landmark tracks in pixels of their own frames; only the first min(T_pred, T_gt) frames count.
        pred_size, gt_size: (height, width) of the frames, to bring the prediction to ground-truth pixels.
    """
    n = min(len(pred), len(gt))
    scale = np.array([gt_size[1] / pred_size[1], gt_size[0] / pred_size[0]])
    p, g = pred[:n] * scale, gt[:n]
    ok = ~(np.isnan(p[:, 0, 0]) | np.isnan(g[:, 0, 0]))
    if not ok.any():
        raise MetricUnavailable("no frame with a face in both the prediction and the ground truth")
    dist = np.linalg.norm(p[ok] - g[ok], axis=-1)  # frames, 468
    mouth = dist[:, list(LIPS)].mean(axis=1)
    return LMDResult(float(mouth.mean()), float(dist.mean()), int(ok.sum()), int(n - ok.sum()), mouth)
