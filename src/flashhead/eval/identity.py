"""CSIM: identity similarity between generated frames and the reference face.

Two embedders:

- `DlibEmbedder` (default, offline): dlib's HOG face detector, its 5-point shape predictor and the
  ResNet face-recognition model (`dlib_face_recognition_resnet_model_v1.dat`, 128-d), the model files
  coming from the `face_recognition_models` package. It is what the `face_recognition` library uses.
- `ArcFaceEmbedder` (optional, user weights): an ArcFace recogniser (ONNX through onnxruntime, or
  TorchScript) on 112x112 crops aligned to the standard ArcFace 5-point template, 512-d. Most talking-head
  papers' CSIM uses ArcFace; its numbers are not comparable with dlib's.

CSIM is the cosine similarity of two embeddings, averaged over the frames in which a face is found.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from flashhead.eval.weights import ARCFACE, MetricUnavailable, resolve_weights

log = logging.getLogger(__name__)

# The 112x112 ArcFace alignment template (left eye, right eye, nose tip, left and right mouth corner).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
# MediaPipe Face Mesh points for those five (eye centres are means of the eye contours).
_LEFT_EYE = (33, 133, 159, 145)  # the subject's right eye, on the image's left
_RIGHT_EYE = (362, 263, 386, 374)
_NOSE_TIP, _MOUTH_LEFT, _MOUTH_RIGHT = 1, 61, 291


def _dlib_model_files() -> tuple[Path, Path]:
    # Located without importing face_recognition_models: its __init__ needs pkg_resources, which recent
    # setuptools no longer provides.
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailable("CSIM (dlib) needs the face_recognition_models package (pip install 'flashhead[eval]')")
    models = Path(next(iter(spec.submodule_search_locations))) / "models"
    shape, recog = models / "shape_predictor_5_face_landmarks.dat", models / "dlib_face_recognition_resnet_model_v1.dat"
    for f in (shape, recog):
        if not f.is_file():
            raise MetricUnavailable(f"face_recognition_models is installed but {f.name} is missing")
    return shape, recog


class DlibEmbedder:
    """128-d dlib ResNet face descriptors of the largest face in an RGB frame."""

    name = "dlib-resnet-v1"

    def __init__(self, upsample: int = 1, jitters: int = 0) -> None:
        try:
            import dlib
        except ImportError:
            raise MetricUnavailable("CSIM (dlib) needs dlib (pip install 'flashhead[eval]')") from None
        shape, recog = _dlib_model_files()
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(shape))
        self._recog = dlib.face_recognition_model_v1(str(recog))
        self.upsample, self.jitters = upsample, jitters

    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        # Faces under ~80 px need dlib's 2x upsampling; large frames are searched at their own size first.
        upsample = 0 if min(frame.shape[:2]) >= 400 else self.upsample
        faces = self._detector(frame, upsample) or self._detector(frame, upsample + 1)
        if not faces:
            return None
        face = max(faces, key=lambda r: r.width() * r.height())
        shape = self._shape(frame, face)
        return np.asarray(self._recog.compute_face_descriptor(frame, shape, self.jitters), dtype=np.float64)


class ArcFaceEmbedder:
    """512-d ArcFace embeddings of 112x112 crops aligned with MediaPipe's five points."""

    name = "arcface"

    def __init__(self, path: str | Path | None = None) -> None:
        from flashhead.eval.landmarks import FaceMesh

        file = resolve_weights(ARCFACE, path)
        self._mesh = FaceMesh()
        if file.suffix == ".onnx":
            try:
                import onnxruntime
            except ImportError:
                raise MetricUnavailable("ArcFace ONNX weights need onnxruntime (pip install onnxruntime)") from None
            self._session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0].name
            self._torch = None
        else:
            import torch

            try:
                with warnings.catch_warnings():  # TorchScript is deprecated, but users' exports exist
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._torch = torch.jit.load(str(file), map_location="cpu").eval()
            except Exception as e:
                raise MetricUnavailable(f"cannot load ArcFace TorchScript {file}: {e}") from None
            self._session = None

    @staticmethod
    def align(frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        import cv2

        five = np.stack(
            [
                landmarks[list(_LEFT_EYE)].mean(0),
                landmarks[list(_RIGHT_EYE)].mean(0),
                landmarks[_NOSE_TIP],
                landmarks[_MOUTH_LEFT],
                landmarks[_MOUTH_RIGHT],
            ]
        )
        matrix, _ = cv2.estimateAffinePartial2D(five, ARCFACE_TEMPLATE, method=cv2.LMEDS)
        return cv2.warpAffine(frame, matrix, (112, 112), borderValue=0.0)

    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        lm = self._mesh(frame)
        if lm is None:
            return None
        crop = self.align(frame, lm).astype(np.float32)
        x = ((crop - 127.5) / 127.5).transpose(2, 0, 1)[None]  # 1, 3, 112, 112
        if self._session is not None:
            out = self._session.run(None, {self._input: x})[0]
        else:
            import torch

            with torch.no_grad():
                out = self._torch(torch.from_numpy(x)).numpy()
        return np.asarray(out, dtype=np.float64).reshape(-1)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def embed_frames(embedder, frames: Iterable[np.ndarray]) -> list[np.ndarray | None]:
    """Embeddings of each frame (None where no face)."""
    return [embedder(f) for f in frames]


def csim(embedder, frames: Iterable[np.ndarray], reference: np.ndarray | None = None, ref_embedding=None) -> dict:
    """Mean cosine similarity of each frame's face to the reference face.

    Args:
        embedder: a `DlibEmbedder` or `ArcFaceEmbedder`.
        frames: RGB frames to score (subsample long videos before passing them).
        reference: the reference RGB image (typically the ground-truth first frame or the source portrait);
            or pass `ref_embedding` directly.

    Returns:
        {"csim": mean, "per_frame": [...], "frames_used": n, "frames_without_face": m}
    """
    if ref_embedding is None:
        if reference is None:
            raise ValueError("give a reference image or its embedding")
        ref_embedding = embedder(reference)
        if ref_embedding is None:
            raise MetricUnavailable("no face found in the reference image")
    sims, missing = [], 0
    for e in embed_frames(embedder, frames):
        if e is None:
            missing += 1
        else:
            sims.append(cosine(e, ref_embedding))
    if not sims:
        raise MetricUnavailable("no face found in any scored frame")
    return {"csim": float(np.mean(sims)), "per_frame": sims, "frames_used": len(sims), "frames_without_face": missing}
