"""Face detection on the first frame [PAPER], tracking at a few Hz, and the fixed 512x512 face crop.

The crop is one square per clip (the official inference rule of `flashhead.media.face.crop_box`,
around the median tracked box), not a per-frame crop: a moving crop would add camera motion the
model would learn. A clip whose face leaves that square by more than `max_drift` is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashhead.data.curate.config import FaceSection
from flashhead.media.face import FaceBox, FaceDetector, choose_face, crop_box

_SAME_FACE_IOU = 0.1
_detector: FaceDetector | None = None


def detector() -> FaceDetector:
    """This process's detector (no zoom search: video frames of talking heads hold large faces)."""
    global _detector
    if _detector is None:
        _detector = FaceDetector(zoom_search=False)
    return _detector


class Rejected(Exception):
    """A clip fails a stage; the message is the reason shown in the report."""


@dataclass
class FaceTrack:
    boxes: np.ndarray  # (T, 4) x1 y1 x2 y2 in source pixels, interpolated between detections
    detected: dict[int, bool]  # frame -> whether any face was found there (every frame detection ran on)
    crop: tuple[int, int, int, int]  # x1 y1 x2 y2 of the square crop in source pixels
    face_width: float  # median tracked face width, source pixels


def detect_at(frames: np.ndarray, indices: list[int], cache: dict[int, list[FaceBox]]) -> None:
    for i in indices:
        if i not in cache:
            cache[i] = detector().detect(frames[i])


def track_face(frames: np.ndarray, cfg: FaceSection, fps: int, cache: dict[int, list[FaceBox]]) -> FaceTrack:
    """Find the speaker on frame 0 and follow them; raises `Rejected` with the reason."""
    height, width = frames.shape[1:3]
    stride = round(fps / cfg.detect_fps)
    indices = list(range(0, len(frames), stride))
    detect_at(frames, indices, cache)
    first = cache[0]
    if not first:
        raise Rejected("no face in the first frame")
    face = choose_face(first)
    others = [f for f in first if f is not face and f.iou(face) < 0.3 and f.width >= cfg.second_face * face.width]
    if others:
        raise Rejected(f"{1 + len(others)} faces in the first frame (one speaker only)")
    if face.width < cfg.min_face:
        raise Rejected(f"face {face.width:.0f} px wide in the first frame, below {cfg.min_face} px")
    known: dict[int, FaceBox] = {0: face}
    previous = face
    for i in indices[1:]:
        match = max(cache[i], key=previous.iou, default=None)
        if match is not None and match.iou(previous) >= _SAME_FACE_IOU:
            known[i] = previous = match
    frames_known = np.array(sorted(known))
    coords = np.array([[known[i].x1, known[i].y1, known[i].x2, known[i].y2] for i in frames_known])
    t = np.arange(len(frames))
    boxes = np.stack([np.interp(t, frames_known, coords[:, c]) for c in range(4)], axis=1)
    median = np.median(coords, axis=0)
    crop = crop_box(FaceBox(*median, score=1.0), width, height, cfg.face_ratio)
    side = crop[2] - crop[0]
    # how far each detected box reaches outside the crop (0 when inside)
    outside = np.max(np.stack([crop[0] - coords[:, 0], crop[1] - coords[:, 1], coords[:, 2] - crop[2],
                               coords[:, 3] - crop[3], np.zeros(len(coords))]), axis=0)  # fmt: skip
    worst = int(np.argmax(outside))
    if outside[worst] > cfg.max_drift * side:
        raise Rejected(
            f"face leaves the crop by {outside[worst] / side:.0%} of its side at {frames_known[worst] / fps:.1f} s"
        )
    detected = {i: bool(cache[i]) for i in cache}
    return FaceTrack(boxes, detected, crop, float(np.median(coords[:, 2] - coords[:, 0])))


def crop_frames(frames: np.ndarray, track: FaceTrack, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(crops (T, size, size, 3), boxes (T, 4) in crop pixels)."""
    import cv2

    x1, y1, x2, y2 = track.crop
    scale = size / (x2 - x1)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    crops = np.stack([cv2.resize(f[y1:y2, x1:x2], (size, size), interpolation=interpolation) for f in frames])
    boxes = (track.boxes - np.array([x1, y1, x1, y1])) * scale
    return crops, boxes.astype(np.float32)


def mouth_boxes(face_boxes: np.ndarray) -> np.ndarray:
    """The lower-middle part of each face box (BlazeFace boxes span brows to chin): where the mouth moves."""
    x1, y1, x2, y2 = face_boxes.T
    w, h = x2 - x1, y2 - y1
    return np.stack([x1 + 0.25 * w, y1 + 0.6 * h, x2 - 0.25 * w, y1 + 0.95 * h], axis=1).astype(np.float32)
