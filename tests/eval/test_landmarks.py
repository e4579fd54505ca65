"""LMD with MediaPipe Face Mesh: zero on identical videos, the size of a known displacement otherwise."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mediapipe")

from flashhead.eval.landmarks import LIPS, FaceMesh, face_boxes, landmark_distance, mouth_opening  # noqa: E402


@pytest.fixture(scope="module")
def track(clips):
    frames = clips("talk_woman_blonde_8s.mp4", 40).frames[::4]
    return frames, FaceMesh().track(frames)


def test_lmd_zero_on_identical_and_measures_a_shift(track):
    frames, lm = track
    assert lm.shape == (10, 468, 2) and not np.isnan(lm).any()
    same = landmark_distance(lm, lm, frames.shape[1:3], frames.shape[1:3])
    assert same.lmd_mouth == 0.0 and same.lmd_face == 0.0 and same.frames_used == 10
    dx = 8
    moved = np.zeros_like(frames)
    moved[:, :, dx:] = frames[:, :, :-dx]  # the whole picture moved 8 px right
    r = landmark_distance(FaceMesh().track(moved), lm, frames.shape[1:3], frames.shape[1:3])
    print(f"LMD of an {dx}px shift: mouth {r.lmd_mouth:.2f} face {r.lmd_face:.2f}")
    assert abs(r.lmd_mouth - dx) < 2.0 and abs(r.lmd_face - dx) < 2.0


def test_lmd_rescales_predictions_to_ground_truth_pixels(track):
    frames, lm = track
    half = lm / 2  # the same landmarks found on a half-size prediction
    r = landmark_distance(half, lm, (256, 256), (512, 512))
    assert r.lmd_face == pytest.approx(0.0, abs=1e-9)


def test_missing_faces_are_skipped_and_boxes_interpolated(track):
    frames, lm = track
    holey = lm.copy()
    holey[3] = np.nan
    r = landmark_distance(holey, lm, frames.shape[1:3], frames.shape[1:3])
    assert (r.frames_used, r.frames_skipped) == (9, 1)
    boxes = face_boxes(holey)
    assert not np.isnan(boxes).any()
    assert np.allclose(boxes[3], (boxes[2] + boxes[4]) / 2)
    assert len(LIPS) == 40
    assert mouth_opening(holey).shape == (10,)
