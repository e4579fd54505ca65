"""Lip motion read from pixels alone: how far a mouth is open, and how much a mouth region moves.

`dark_gap` measures the opening of a mouth whose box is known (our synthetic clips store it per frame):
inside the box, the tallest vertical run of pixels much darker than the box's typical skin/lip brightness,
over its central columns. It needs no landmark model, so it works on cartoon faces, at 64 px, and on
generated frames, where landmark detectors often fail.
`region_motion` is the mean absolute change of a region between consecutive frames: a face-agnostic
"does the mouth move with the speech" signal for real portraits.
"""

from __future__ import annotations

import numpy as np

LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _luma(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) @ LUMA


def _box_slices(box, shape) -> tuple[slice, slice]:
    x0, y0, x1, y1 = box
    h, w = shape[:2]
    return slice(int(max(y0, 0)), int(min(np.ceil(y1), h))), slice(int(max(x0, 0)), int(min(np.ceil(x1), w)))


def dark_gap(frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Per-frame lip gap in pixels for (T, H, W, 3) uint8 frames and (T, 4) or (4,) boxes x0, y0, x1, y1."""
    boxes = np.broadcast_to(np.asarray(boxes, np.float64), (len(frames), 4))
    out = np.empty(len(frames))
    for i, (frame, box) in enumerate(zip(frames, boxes, strict=True)):
        rows, cols = _box_slices(box, frame.shape)
        patch = _luma(frame[rows, cols])
        ref = max(float(np.median(patch)), 1.0)
        w = patch.shape[1]
        centre = patch[:, w // 4 : w - w // 4]
        dark = np.clip((0.6 * ref - centre) / (0.3 * ref), 0, 1)
        out[i] = float(np.sort(dark.sum(0))[-3:].mean()) if dark.size else 0.0
    return out


def region_motion(frames: np.ndarray, box) -> np.ndarray:
    """(T,) mean absolute luma change of `box` from the previous frame (0 for the first frame)."""
    rows, cols = _box_slices(box, frames.shape[1:])
    luma = _luma(frames[:, rows, cols])
    diff = np.abs(np.diff(luma, axis=0)).mean(axis=(1, 2))
    return np.concatenate([[0.0], diff])


def frame_energy(audio: np.ndarray, num_frames: int, sample_rate: int = 16000, fps: int = 25) -> np.ndarray:
    """RMS of the audio under each video frame."""
    hop = sample_rate // fps
    audio = np.asarray(audio, np.float64)[: num_frames * hop]
    audio = np.pad(audio, (0, num_frames * hop - len(audio)))
    return np.sqrt((audio.reshape(num_frames, hop) ** 2).mean(1))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either signal is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.std() < 1e-12 or b.std() < 1e-12:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def ssim_gray(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two RGB uint8 images on their luma (scikit-image's reference implementation)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(_luma(a), _luma(b), data_range=255.0, gaussian_weights=True, sigma=1.5))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
