"""The per-clip filters after the crop: jump cuts and abnormal motion, faceless frames, hands over the face.

Each takes the cropped clip and raises `Rejected` with the reason, or returns numbers for the report.
"""

from __future__ import annotations

import numpy as np

from flashhead.data.curate.config import FacelessSection, MotionSection, OcclusionSection
from flashhead.data.curate.face_track import FaceTrack, Rejected

_models: dict[str, object] = {}


def flow_stats(crops: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per consecutive pair: (mean flow magnitude as a fraction of the side, mean warp residual in 0..1).

    The residual is what the flow cannot explain: |next - previous warped by the flow|. Head motion
    warps well; a cut (or a splice) leaves a residual several times larger (docs/curation.md).
    """
    import cv2

    gray = [cv2.resize(cv2.cvtColor(c, cv2.COLOR_RGB2GRAY), (size, size), interpolation=cv2.INTER_AREA) for c in crops]
    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size)), axis=-1).astype(np.float32)
    magnitude, residual = [], []
    for prev, nxt in zip(gray[:-1], gray[1:], strict=True):
        # flow maps next -> prev, so prev sampled at (p + flow) reconstructs next
        flow = cv2.calcOpticalFlowFarneback(nxt, prev, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        warped = cv2.remap(prev, grid + flow, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        magnitude.append(float(np.linalg.norm(flow, axis=-1).mean()) / size)
        residual.append(float(np.abs(warped.astype(np.float32) - nxt).mean()) / 255.0)
    return np.array(magnitude), np.array(residual)


def check_motion(crops: np.ndarray, cfg: MotionSection, fps: int) -> dict[str, float]:
    magnitude, residual = flow_stats(crops, cfg.flow_size)
    if len(residual) == 0:
        return {"max_residual": 0.0, "max_flow": 0.0}
    jump = int(np.argmax(residual))
    if residual[jump] > cfg.max_residual:
        raise Rejected(f"jump cut at {(jump + 1) / fps:.2f} s (warp residual {residual[jump]:.3f})")
    window = min(fps, len(magnitude))
    per_second = np.convolve(magnitude, np.ones(window) / window, mode="valid")
    fast = int(np.argmax(per_second))
    if per_second[fast] > cfg.max_flow:
        raise Rejected(f"abnormal motion at {fast / fps:.1f} s ({per_second[fast]:.3f} of the frame per frame)")
    return {"max_residual": float(residual[jump]), "max_flow": float(per_second[fast])}


def check_faceless(frames: np.ndarray, cache: dict, cfg: FacelessSection, fps: int) -> float:
    """Share of frames sampled at `sample_fps` with no face anywhere in the (uncropped) frame."""
    from flashhead.data.curate.face_track import detect_at

    indices = list(range(0, len(frames), max(1, round(fps / cfg.sample_fps))))
    detect_at(frames, indices, cache)
    missing = sum(not cache[i] for i in indices) / len(indices)
    if missing > cfg.max_fraction:
        raise Rejected(f"no face in {missing:.0%} of frames sampled at {cfg.sample_fps:g} fps")
    return missing


def _hands_and_pose():
    if not _models:
        import mediapipe as mp

        _models["hands"] = mp.solutions.hands.Hands(static_image_mode=True, max_num_hands=2, model_complexity=0)
        # complexity 1: the only pose model the wheel ships (0 and 2 would be downloaded)
        _models["pose"] = mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1)
    return _models["hands"], _models["pose"]


_POSE_HAND_POINTS = range(15, 23)  # wrists, pinkies, index fingers, thumbs


def _overlap(box: np.ndarray, other: np.ndarray) -> float:
    w = min(box[2], other[2]) - max(box[0], other[0])
    h = min(box[3], other[3]) - max(box[1], other[1])
    area = (box[2] - box[0]) * (box[3] - box[1])
    return max(w, 0) * max(h, 0) / area if area > 0 else 0.0


def hand_over_face(crop: np.ndarray, face: np.ndarray, cfg: OcclusionSection) -> bool:
    """Whether a hand covers the lower half of `face` (x1 y1 x2 y2 in crop pixels) in this crop."""
    hands, pose = _hands_and_pose()
    side = crop.shape[0]
    lower = np.array([face[0], (face[1] + face[3]) / 2, face[2], face[3]])
    result = hands.process(np.ascontiguousarray(crop))
    for hand in result.multi_hand_landmarks or []:
        xy = np.array([(p.x * side, p.y * side) for p in hand.landmark])
        if _overlap(lower, np.array([*xy.min(0), *xy.max(0)])) >= cfg.min_overlap:
            return True
    result = pose.process(np.ascontiguousarray(crop))
    if result.pose_landmarks is not None:
        for i in _POSE_HAND_POINTS:
            p = result.pose_landmarks.landmark[i]
            inside = lower[0] <= p.x * side <= lower[2] and lower[1] <= p.y * side <= lower[3]
            if p.visibility >= cfg.min_visibility and inside:
                return True
    return False


def check_occlusion(crops: np.ndarray, boxes: np.ndarray, cfg: OcclusionSection, fps: int) -> float:
    indices = list(range(0, len(crops), max(1, round(fps / cfg.sample_fps))))
    covered = [i for i in indices if hand_over_face(crops[i], boxes[i], cfg)]
    share = len(covered) / len(indices)
    if share > cfg.max_fraction:
        raise Rejected(f"hand over the face in {share:.0%} of sampled frames (first at {covered[0] / fps:.1f} s)")
    return share


__all__ = ["FaceTrack", "check_faceless", "check_motion", "check_occlusion", "flow_stats", "hand_over_face"]
