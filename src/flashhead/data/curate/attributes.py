"""Attributes of a kept clip: duration, face size, head pose, brightness and sharpness.

Head pose is MediaPipe Face Mesh landmarks fitted to a generic 3-D face with OpenCV's solvePnP, in
degrees (yaw > 0: the head turns towards the image's right; pitch > 0: up; roll > 0: clockwise tilt).
Brightness is the mean luma (0-255) of the crop; sharpness the variance of its Laplacian (higher is
sharper; blurred or heavily upscaled clips score low). Each is the median over frames sampled at 1 fps.
"""

from __future__ import annotations

import math

import numpy as np

_mesh = None
# Face Mesh indices and a generic face (mm, y up, z towards the camera): nose tip, chin, outer eye corners,
# mouth corners.
_MESH_POINTS = [1, 152, 33, 263, 61, 291]
_MODEL_POINTS = np.array(
    [[0, 0, 0], [0, -63.6, -12.5], [-43.3, 32.7, -26.0], [43.3, 32.7, -26.0],
     [-28.9, -28.9, -24.1], [28.9, -28.9, -24.1]],  # fmt: skip
    np.float64,
)


def head_pose(crop: np.ndarray) -> tuple[float, float, float] | None:
    """(yaw, pitch, roll) in degrees of the face in an RGB crop, or None when Face Mesh finds none."""
    import cv2

    global _mesh
    if _mesh is None:
        import mediapipe as mp

        _mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1)
    result = _mesh.process(np.ascontiguousarray(crop))
    if not result.multi_face_landmarks:
        return None
    h, w = crop.shape[:2]
    marks = result.multi_face_landmarks[0].landmark
    image_points = np.array([(marks[i].x * w, marks[i].y * h) for i in _MESH_POINTS], np.float64)
    camera = np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1]], np.float64)
    # the model's y axis points up, the image's down: flip y so the fit needs no 180-degree roll
    model = _MODEL_POINTS * np.array([1, -1, -1])
    ok, rvec, _ = cv2.solvePnP(model, image_points, camera, None, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        return None
    rotation, _ = cv2.Rodrigues(rvec)
    pitch = math.degrees(math.atan2(-rotation[2, 1], rotation[2, 2]))
    pitch = (pitch + 90) % 180 - 90  # the same ambiguity
    yaw = math.degrees(math.asin(max(-1.0, min(1.0, rotation[2, 0]))))
    # roll from the eye line itself: the Euler split of a large-yaw fit can put 180 degrees into roll
    (lx, ly), (rx, ry) = image_points[2], image_points[3]
    roll = math.degrees(math.atan2(ry - ly, rx - lx))
    return yaw, pitch, roll


def attributes(crops: np.ndarray, face_width: float, crop_side: int, fps: int) -> dict[str, float | None]:
    import cv2

    sampled = crops[::fps]
    gray = [cv2.cvtColor(c, cv2.COLOR_RGB2GRAY) for c in sampled]
    poses = [p for p in (head_pose(c) for c in sampled) if p is not None]
    pose = [round(float(v), 1) for v in np.median(np.array(poses), axis=0)] if poses else [None] * 3
    return {
        "duration": len(crops) / fps,
        "face_width": round(face_width, 1),  # source pixels
        "face_fraction": round(face_width / crop_side, 3),  # of the crop side
        "yaw": pose[0],  # None when Face Mesh found no face in any sampled frame
        "pitch": pose[1],
        "roll": pose[2],
        "brightness": round(float(np.median([g.mean() for g in gray])), 2),
        "sharpness": round(float(np.median([cv2.Laplacian(g, cv2.CV_64F).var() for g in gray])), 2),
    }
