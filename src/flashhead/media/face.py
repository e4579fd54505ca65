"""Face detection and the reference crop: find the face in a portrait and frame it the way the model expects.

Detection uses MediaPipe's BlazeFace detectors, run on the CPU from the model files that the `mediapipe`
wheel ships (nothing is downloaded):

1. Both models look at the whole image. A face is accepted when the full-range model (the one the official
   code uses) gives it at least `MIN_SCORE`, or the short-range model at least `SHORT_MIN_SCORE` (it finds
   close-ups that the full-range model misses: a tilted head; a beard, glasses and a hat; but its false
   alarms score higher), or both models find it and their mean score is at least `PAIR_MIN_SCORE`.
2. Only when that finds nothing: step 1 on the mirrored image. Scores of a hard face (a beard, glasses and a
   hat) swing by 0.3 with small changes of framing; a second view rescues it without lowering thresholds.
3. Only when that finds nothing either: a zoom search for small faces in large or wide images. Overlapping
   tiles of 1/2 then 1/4 of the image side go through the full-range model, and each candidate is confirmed
   by detecting it again (step 1) in a crop around it, which removes the texture false alarms tiles produce.

Faces are sorted largest first. The crop takes the largest face (the official code takes whichever the
detector lists first), so a group photo frames its most prominent person (`choose_face`); see `crop_box`
for the crop rule and docs/portraits.md for the thresholds and the scores measured on the shared media.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flashhead.errors import NoFaceError
from flashhead.media.image import ImageInput, load_image, resize_and_center_crop

logger = logging.getLogger(__name__)

# Scores measured on the shared media are in docs/portraits.md.
MIN_SCORE = 0.5  # full-range model alone: no-face images peak at 0.27, the weakest real face scores 0.59
SHORT_MIN_SCORE = 0.75  # short-range model alone: false alarms reach 0.71, the faces only it finds 0.84+
PAIR_MIN_SCORE = 0.5  # mean of both where both see it: no-face images reach 0.31, a hard real face 0.57
FACE_RATIO = 2.0  # crop side / face width, as in the official code
DETECT_MAX_SIDE = 2560  # larger images are downscaled first: the models see 128 or 192 px anyway
_MIN_TILE = 160  # the zoom search stops before tiles get smaller than this (in detection pixels)
_VERIFY_CONTEXT = 4.0  # side of the confirmation crop, in face widths
_SAME_FACE_IOU = 0.3
_CHOICE_MARGIN = 0.3  # see choose_face
_MODELS = {"full": "face_detection_full_range", "short": "face_detection_short_range"}


@dataclass(frozen=True)
class FaceBox:
    """A detected face: corners in pixels of the image it was found in, and the detector's confidence."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float  # the highest confidence a model gave it, in [0, 1]
    model: str = "full"  # which MediaPipe model found it: "full", "short" or "both"

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def center(self) -> tuple[float, float]:
        return (self.x1 + self.x2) / 2, (self.y1 + self.y2) / 2

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def moved(self, scale: float, dx: float = 0.0, dy: float = 0.0) -> FaceBox:
        """The box in another image's pixels: scaled by `scale`, then shifted by (dx, dy)."""
        x1, y1, x2, y2 = (v * scale for v in (self.x1, self.y1, self.x2, self.y2))
        return FaceBox(x1 + dx, y1 + dy, x2 + dx, y2 + dy, self.score, self.model)

    def iou(self, other: FaceBox) -> float:
        w = min(self.x2, other.x2) - max(self.x1, other.x1)
        h = min(self.y2, other.y2) - max(self.y1, other.y1)
        inter = max(w, 0.0) * max(h, 0.0)
        union = self.area + other.area - inter
        return inter / union if union > 0 else 0.0


class FaceDetector:
    """MediaPipe face detection for portraits and video frames (RGB uint8 arrays or PIL images).

    One instance holds two small MediaPipe graphs (a few MB); calls are serialised with a lock, so one
    detector may be shared between threads. Use the module functions for a process-wide shared instance.

    Args:
        min_score: accept a face the full-range model scores at least this (scores are in [0, 1]).
        short_min_score: accept a face the short-range model scores at least this.
        pair_min_score: accept a face both models find with a mean score at least this.
        zoom_search: when the whole image has no face, look for small faces in tiles (see the module doc).
    """

    def __init__(
        self,
        min_score: float = MIN_SCORE,
        short_min_score: float = SHORT_MIN_SCORE,
        pair_min_score: float = PAIR_MIN_SCORE,
        zoom_search: bool = True,
    ):
        self.min_score, self.short_min_score, self.pair_min_score = min_score, short_min_score, pair_min_score
        self.zoom_search = zoom_search
        # Each graph keeps the weakest detection that could still pass together with the other model's.
        self._floors = {
            "full": max(0.05, min(min_score, 2 * pair_min_score - short_min_score)),
            "short": max(0.05, min(short_min_score, 2 * pair_min_score - min_score)),
        }
        self._lock = threading.Lock()
        # Building a graph and its first run print TFLite / absl notices straight to fd 2 (absl ignores
        # GLOG_minloglevel): both happen here with those lines dropped, so that output shows only what concerns users.
        with _native_notices_dropped():
            self._graphs = {name: _build_graph(stem, self._floors[name]) for name, stem in _MODELS.items()}
            for name in self._graphs:
                self._run(name, np.zeros((64, 64, 3), np.uint8))

    def detect(self, image: ImageInput) -> list[FaceBox]:
        """All faces in `image`, largest first, as boxes in the image's pixels. An empty list if none."""
        rgb = _as_rgb_array(image)
        height, width = rgb.shape[:2]
        scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
        if scale < 1.0:
            size = (round(width * scale), round(height * scale))
            small = Image.fromarray(rgb).resize(size, Image.BICUBIC, reducing_gap=2.0)
            rgb = np.asarray(small)
        faces = self._detect_whole(rgb) or self._detect_mirrored(rgb)
        if not faces and self.zoom_search:
            faces = self._detect_zoomed(rgb)
            if faces:
                logger.info("found %d small face(s) by zooming in", len(faces))
        faces = [f.moved(1.0 / scale) for f in faces]
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def crop(
        self, image: ImageInput, face_ratio: float = FACE_RATIO, size: int = 512, name: str | None = None
    ) -> tuple[Image.Image, FaceBox, int]:
        """Crop the portrait square around the largest face (`choose_face`) and resize it to `size` x `size`.

        Args:
            image: a path, PIL image or RGB uint8 array (loaded with `load_image`).
            face_ratio: crop side / face width (official: 2.0; larger shows more shoulders).
            size: side of the returned square image.
            name: what to call the image in error messages (defaults to the path).

        Returns:
            (the cropped RGB image, the chosen face in `image`'s pixels, how many faces were found).

        Raises:
            NoFaceError: no face was found.
        """
        if name is None:
            name = str(image) if isinstance(image, (str, os.PathLike)) else "the image"
        picture = load_image(image)
        faces = self.detect(picture)
        if not faces:
            raise NoFaceError(f"{name}: no face found (use the image uncropped with --no-crop / crop=False)")
        face = choose_face(faces)
        if len(faces) > 1:  # the user should know which face will talk
            logger.warning(
                "%s: %d faces found; using the largest (%.0f px wide at %.0f, %.0f)",
                name,
                len(faces),
                face.width,
                *face.center,
            )
        cropped = picture.crop(crop_box(face, picture.width, picture.height, face_ratio))
        cropped = cropped.resize((size, size), Image.BICUBIC)  # PIL's default filter, as in the official code
        return cropped, face, len(faces)

    def _detect_whole(self, rgb: np.ndarray) -> list[FaceBox]:
        fulls, shorts = self._run("full", rgb), self._run("short", rgb)
        faces, paired = [], set()
        for full in fulls:
            partner = max(shorts, key=full.iou, default=None)
            if partner is None or full.iou(partner) < _SAME_FACE_IOU:
                if full.score >= self.min_score:
                    faces.append(full)
                continue
            paired.add(id(partner))
            mean = (full.score + partner.score) / 2
            if full.score >= self.min_score or partner.score >= self.short_min_score or mean >= self.pair_min_score:
                # The full-range box: the official crop rule was tuned on that model's boxes.
                score = max(full.score, partner.score)
                faces.append(FaceBox(full.x1, full.y1, full.x2, full.y2, score, "both"))
        faces += [f for f in shorts if id(f) not in paired and f.score >= self.short_min_score]
        return faces

    def _detect_mirrored(self, rgb: np.ndarray) -> list[FaceBox]:
        width = rgb.shape[1]
        faces = self._detect_whole(rgb[:, ::-1])
        return [FaceBox(width - f.x2, f.y1, width - f.x1, f.y2, f.score, f.model) for f in faces]

    def _detect_zoomed(self, rgb: np.ndarray) -> list[FaceBox]:
        height, width = rgb.shape[:2]
        long_side = max(height, width)
        for level in (2, 4):
            side = min(height, width, math.ceil(long_side / level))
            if side < _MIN_TILE:
                break
            candidates: list[FaceBox] = []
            for x, y in _tile_origins(width, height, side):
                tile = rgb[y : y + side, x : x + side]
                candidates += [f.moved(1.0, x, y) for f in self._run("full", tile) if f.score >= self.min_score]
            faces: list[FaceBox] = []
            for candidate in sorted(candidates, key=lambda f: f.score, reverse=True):
                if any(candidate.iou(f) >= _SAME_FACE_IOU for f in faces):
                    continue
                confirmed = self._confirm(rgb, candidate)
                if confirmed is not None and all(confirmed.iou(f) < _SAME_FACE_IOU for f in faces):
                    faces.append(confirmed)
            if faces:
                return faces
        return []

    def _confirm(self, rgb: np.ndarray, candidate: FaceBox) -> FaceBox | None:
        """The candidate found again in a crop of a few face widths around it, or None."""
        height, width = rgb.shape[:2]
        side = min(height, width, max(32, round(_VERIFY_CONTEXT * max(candidate.width, candidate.height))))
        cx, cy = candidate.center
        x = min(max(round(cx - side / 2), 0), width - side)
        y = min(max(round(cy - side / 2), 0), height - side)
        found = [f.moved(1.0, x, y) for f in self._detect_whole(rgb[y : y + side, x : x + side])]
        best = max(found, key=candidate.iou, default=None)
        return best if best is not None and best.iou(candidate) >= _SAME_FACE_IOU else None

    def _run(self, model: str, rgb: np.ndarray) -> list[FaceBox]:
        height, width = rgb.shape[:2]
        with self._lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # protobuf deprecation chatter inside mediapipe
            result = self._graphs[model].process({"image": np.ascontiguousarray(rgb)})
        faces = []
        for detection in result.detections or []:
            box = detection.location_data.relative_bounding_box
            x1, y1 = box.xmin * width, box.ymin * height
            score = float(detection.score[0])
            if score >= self._floors[model]:
                faces.append(FaceBox(x1, y1, x1 + box.width * width, y1 + box.height * height, score, model))
        return faces

    def close(self) -> None:
        for graph in self._graphs.values():
            graph.close()
        self._graphs = {}

    def __enter__(self) -> FaceDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def choose_face(faces: list[FaceBox]) -> FaceBox:
    """The face to crop: the largest of those scoring within `_CHOICE_MARGIN` of the best score.

    The official code takes the detector's first face; we take the largest, so a group photo frames its
    most prominent person, but not a weak false alarm on the background (0.5 next to a real face's 0.97 on
    one of the shared clips) that happens to be larger than the real face.
    """
    best = max(f.score for f in faces)
    return max((f for f in faces if f.score >= best - _CHOICE_MARGIN), key=lambda f: f.area)


def crop_box(face: FaceBox, width: int, height: int, face_ratio: float = FACE_RATIO) -> tuple[int, int, int, int]:
    """The square portrait crop (x1, y1, x2, y2) around `face` in a `width` x `height` image.

    The official rule: side S = face_ratio x face width; horizontally cx +- S/2; vertically cy - 0.55 S to
    cy + 0.45 S (more headroom above the face than below). Official then clips each edge to the image and
    stretches the possibly non-square result to 512 x 512, which distorts faces near a border. We keep the
    crop square instead, so the face is never distorted and nothing is invented by padding: the square is
    shifted to lie inside the image (the face moves off-centre towards that border) and, only when the
    image is narrower than S, shrunk to the image's shorter side (the face then fills more of the crop).
    Where the rule's square fits in the image, the result is the official crop (to the nearest pixel).
    """
    cx, cy = face.center
    side = max(1, round(min(face_ratio * face.width, width, height)))
    x1 = min(max(round(cx - 0.5 * side), 0), width - side)
    y1 = min(max(round(cy - 0.55 * side), 0), height - side)
    return x1, y1, x1 + side, y1 + side


_default: FaceDetector | None = None
_default_lock = threading.Lock()


def default_detector() -> FaceDetector:
    """The process-wide detector behind the module functions (built on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = FaceDetector()
        return _default


def detect_faces(image: ImageInput) -> list[FaceBox]:
    """All faces in a portrait or video frame (path, PIL image or RGB uint8 array), largest first."""
    return default_detector().detect(image)


def crop_portrait(
    image: ImageInput, face_ratio: float = FACE_RATIO, size: int = 512
) -> tuple[Image.Image, FaceBox, int]:
    """Crop the portrait square around the largest face and resize it: see `FaceDetector.crop`."""
    return default_detector().crop(image, face_ratio=face_ratio, size=size)


def prepare_portrait(
    source: ImageInput, crop: bool = True, size: int | tuple[int, int] = 512, face_ratio: float = FACE_RATIO
) -> np.ndarray:
    """The model's reference image: load, (face-crop), then the official resize and centre crop.

    Args:
        source: a path, PIL image or RGB uint8 array.
        crop: crop around the largest face first; False uses the whole image as it is.
        size: (height, width) of the result, or one int for a square.
        face_ratio: crop side / face width, when cropping.

    Returns:
        uint8 array (height, width, 3).

    Raises:
        ImageError: the image cannot be read. NoFaceError: `crop` is on and no face was found.
    """
    height, width = (size, size) if isinstance(size, int) else size
    image = load_image(source)
    if crop:
        name = str(source) if isinstance(source, (str, os.PathLike)) else "the image"
        image, _, _ = default_detector().crop(image, face_ratio=face_ratio, size=max(height, width), name=name)
    return resize_and_center_crop(image, (height, width))


def _as_rgb_array(image: ImageInput) -> np.ndarray:
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image
    if isinstance(image, Image.Image) and image.mode == "RGB":
        return np.asarray(image)
    return np.asarray(load_image(image, min_side=1))


def _tile_origins(width: int, height: int, side: int) -> list[tuple[int, int]]:
    """Top-left corners of `side` squares covering the image with about half a tile of overlap."""

    def starts(length: int) -> list[int]:
        count = math.ceil((length - side) / (side / 2)) + 1 if length > side else 1
        return [round(i * (length - side) / max(count - 1, 1)) for i in range(count)]

    return [(x, y) for y in starts(height) for x in starts(width)]


# Lines MediaPipe's native code writes to stderr when a graph first runs; harmless, and not for our users.
_NATIVE_NOTICES = (
    "inference_feedback_manager.cc",
    "All log messages before absl::InitializeLog()",
    "Created TensorFlow Lite XNNPACK delegate",
)


_stderr_swap = threading.Lock()  # two detectors built at once must not restore each other's capture as fd 2


@contextlib.contextmanager
def _native_notices_dropped():
    """Capture what native code writes to file descriptor 2 and pass on every line but MediaPipe's notices."""
    with _stderr_swap:
        sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:  # no usable fd 2 (e.g. a daemon): nothing to filter
            yield
            return
        captured: list[str] = []
        try:
            with _captured_fd2(saved, captured):
                yield
        finally:  # also when the body failed: what native code said about it is passed on
            kept = [line for line in captured if line.strip() and not any(n in line for n in _NATIVE_NOTICES)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


@contextlib.contextmanager
def _captured_fd2(saved: int, lines: list[str]):
    """fd 2 into a temporary file while the body runs, then `saved` (closed) back as fd 2; its lines into `lines`."""
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines.extend(captured.read().decode(errors="replace").splitlines())


def _build_graph(stem: str, min_score: float) -> Any:
    """A MediaPipe face-detection graph with our score threshold.

    The `FaceDetection` solution class ignores its `min_detection_confidence` (its graph keeps a fixed 0.5),
    so we load the solution's graph ourselves and put the threshold into the node's options.
    """
    os.environ.setdefault("GLOG_minloglevel", "2")  # keep MediaPipe's C++ info logs off stderr
    try:
        import mediapipe
        from mediapipe.framework import calculator_pb2
        from mediapipe.modules.face_detection import face_detection_pb2
        from mediapipe.python.solution_base import SolutionBase
    except ImportError as e:
        raise ImportError(f"face detection needs mediapipe 0.10.14 (pip install 'mediapipe==0.10.14'): {e}") from e

    folder = Path(mediapipe.__file__).parent / "modules" / "face_detection"
    graph_file = folder / f"{stem}_cpu.binarypb"
    if not graph_file.is_file():
        raise ImportError(f"mediapipe {mediapipe.__version__} lacks {graph_file.name}; install mediapipe==0.10.14")
    config = calculator_pb2.CalculatorGraphConfig()
    config.ParseFromString(graph_file.read_bytes())
    node = config.node[0]
    options = face_detection_pb2.FaceDetectionOptions()
    node.node_options[0].Unpack(options)
    options.min_score_thresh = min_score
    node.node_options[0].Pack(options)
    del node.option_value[:]  # else the (empty) graph options overwrite ours
    return SolutionBase(graph_config=config, outputs=["detections"])


__all__ = [
    "FACE_RATIO",
    "MIN_SCORE",
    "PAIR_MIN_SCORE",
    "SHORT_MIN_SCORE",
    "FaceBox",
    "FaceDetector",
    "choose_face",
    "crop_box",
    "crop_portrait",
    "default_detector",
    "detect_faces",
    "prepare_portrait",
]
