"""Real-portrait animation: a still photo made to speak by landmark-driven warps.

The portrait is found and cropped by `flashhead.media.face.crop_portrait` (MediaPipe face detection and
the inference crop rule, SPEC §6.1), so training faces are framed exactly like inference references.
Landmarks come from MediaPipe Face Mesh (the legacy `solutions` graph whose model ships inside the
mediapipe 0.10.14 wheel, the version `media/face.py` pins); its 468 points are reduced to the familiar
68-point layout (`MESH_TO_68`), which is all the warps need.

Per frame the mouth follows a viseme track (`visemes.mouth_tracks`): the lower lip and jaw move down
by the wanted lip gap, the mouth corners move in/out with width and rounding, the upper eyelids move
down for blinks. A thin-plate spline spreads the landmark displacements over the face; it is inverted by
linear interpolation over the moved points of a coarse grid (which also copes with the fold of lips
pressed shut over an open source mouth) and applied with one `cv2.remap` that also carries a small head
rotation / translation / zoom. A dark mouth interior with a teeth hint and a tongue hint is painted between the
inner lips wherever they part.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import scipy.linalg

from flashhead.data.shards import Clip
from flashhead.data.visemes import (
    LANGUAGES,
    SAMPLE_RATE,
    MouthTracks,
    mouth_tracks,
    random_voice,
    speech_metadata,
    speech_track,
)
from flashhead.errors import ConfigError, NoFaceError

log = logging.getLogger(__name__)

SOURCE = "synth-portrait"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LANDMARK_SIZE = 512  # the crop Face Mesh sees; the output is resized from it

# The 68-point layout (jaw 0-16, brows 17-26, nose 27-35, eyes 36-47, outer lips 48-59, inner lips 60-67)
# as Face Mesh indices. Checked against dlib's 68-point predictor on the shared portraits: eyes and lips
# agree within 2-4 % of the face width, the jaw within 5-12 % (the two models trace it differently).
MESH_TO_68 = [
    127, 234, 93, 132, 58, 136, 150, 176, 152, 400, 379, 365, 288, 361, 323, 454, 356,
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    78, 82, 13, 312, 308, 317, 14, 87,
]  # fmt: skip
JAW = list(range(17))
LEFT_EYE, RIGHT_EYE = list(range(36, 42)), list(range(42, 48))
OUTER_LIPS, INNER_LIPS = list(range(48, 60)), list(range(60, 68))
# How far each jaw point follows the lower lip (the chin moves most).
_JAW_FOLLOW = {3: 0.08, 4: 0.2, 5: 0.4, 6: 0.6, 7: 0.72, 8: 0.75, 9: 0.72, 10: 0.6, 11: 0.4, 12: 0.2, 13: 0.08}


@dataclass(frozen=True)
class PortraitConfig:
    """How portrait clips are made."""

    size: int = 128
    fps: int = 25
    languages: tuple[str, ...] = LANGUAGES
    language_weights: tuple[float, ...] = (0.6, 0.1, 0.1, 0.1, 0.1)
    long_silence_prob: float = 0.25
    face_ratio: float = 2.0  # crop side / face width (SPEC §6.1)
    max_gap: float = 0.42  # lip gap at mouth_open = 1, as a fraction of mouth width
    max_rotation_deg: float = 3.0
    max_shift: float = 0.015
    max_zoom: float = 0.02
    min_face_px: int = 48  # faces narrower than this in the source photo are refused

    def __post_init__(self) -> None:
        if not 64 <= self.size <= LANDMARK_SIZE or self.size % 2:
            raise ConfigError(f"portrait size must be even and in [64, {LANDMARK_SIZE}], got {self.size}")


# ---------------------------------------------------------------- landmarks

_mesh_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def _face_mesh():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # protobuf deprecation chatter inside mediapipe
            import mediapipe as mp

            return mp.solutions.face_mesh.FaceMesh(
                static_image_mode=True, max_num_faces=1, refine_landmarks=False, min_detection_confidence=0.3
            )
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"portrait animation needs mediapipe 0.10.14 with its face-mesh model: {e}") from None


def detect_landmarks(image: np.ndarray) -> np.ndarray:
    """68 (x, y) landmarks (see MESH_TO_68) of the face in a face-centred RGB uint8 crop."""
    mesh = _face_mesh()
    with _mesh_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = mesh.process(np.ascontiguousarray(image))
    if not result.multi_face_landmarks:
        raise NoFaceError("Face Mesh found no face landmarks in the portrait crop")
    points = result.multi_face_landmarks[0].landmark
    h, w = image.shape[:2]
    return np.array([[points[i].x * w, points[i].y * h] for i in MESH_TO_68], np.float64)


@dataclass
class Portrait:
    """A face-centred square crop of a photo at the output size, with its landmarks in crop pixels."""

    image: np.ndarray
    landmarks: np.ndarray
    name: str


def load_portrait(path: str | os.PathLike, size: int, face_ratio: float = 2.0, min_face_px: int = 48) -> Portrait:
    """Find the largest face in a photo, crop it as inference does, and locate its landmarks."""
    from flashhead.media.face import crop_portrait

    crop, face, _ = crop_portrait(path, face_ratio=face_ratio, size=LANDMARK_SIZE)
    if face.width < min_face_px:
        raise NoFaceError(f"{path}: face is {face.width:.0f} px wide; at least {min_face_px} px needed")
    image = np.asarray(crop.convert("RGB"))
    landmarks = detect_landmarks(image)
    if size != LANDMARK_SIZE:
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        landmarks = landmarks * (size / LANDMARK_SIZE)
    return Portrait(image, landmarks, Path(path).stem)


# ---------------------------------------------------------------- the animator


def _tps_kernel(r2: np.ndarray) -> np.ndarray:
    return 0.5 * r2 * np.log(np.maximum(r2, 1e-12))  # r² log r, written with r²


def _smooth_polygon(points: np.ndarray, iterations: int = 2) -> np.ndarray:
    # Chaikin corner cutting: the 8 inner-lip landmarks become a rounded mouth opening.
    for _ in range(iterations):
        nxt = np.roll(points, -1, axis=0)
        points = np.stack([0.75 * points + 0.25 * nxt, 0.25 * points + 0.75 * nxt], 1).reshape(-1, 2)
    return points


class PortraitAnimator:
    """Warps one cropped portrait: `frame(...)` → (H, W, 3) uint8 and the mouth box [x0, y0, x1, y1]."""

    def __init__(self, portrait: Portrait, config: PortraitConfig = PortraitConfig()) -> None:
        self.portrait, self.cfg = portrait, config
        S = config.size
        lm = portrait.landmarks
        self.lm = lm
        eye_l, eye_r = lm[LEFT_EYE].mean(0), lm[RIGHT_EYE].mean(0)
        across = (eye_r - eye_l) / np.linalg.norm(eye_r - eye_l)
        self.across, self.down = across, np.array([-across[1], across[0]])  # image y grows downwards
        self.mouth_w = float(np.linalg.norm(lm[64] - lm[60]))
        self.gap0 = float(np.mean([(lm[b] - lm[a]) @ self.down for a, b in ((61, 67), (62, 66), (63, 65))]))
        self.centre = lm[JAW].mean(0)

        # Control points: the landmarks plus a static ring on the border of the region that may move,
        # so the spline is zero there and the field can be cut to that region.
        lo = np.maximum(np.floor(lm[17:].min(0) - 0.1 * S), 0)
        hi = np.minimum(np.ceil(np.maximum(lm.max(0), lm[8] + self.down * self.mouth_w) + 0.1 * S), S - 1)
        self.roi = (int(lo[0]), int(lo[1]), int(hi[0]) + 1, int(hi[1]) + 1)
        k = 8
        t = np.linspace(0, 1, k, endpoint=False)
        (x0, y0), (x1, y1) = lo, hi
        ring = np.concatenate(
            [
                np.stack([x0 + (x1 - x0) * t, np.full(k, y0)], 1),
                np.stack([np.full(k, x1), y0 + (y1 - y0) * t], 1),
                np.stack([x1 - (x1 - x0) * t, np.full(k, y1)], 1),
                np.stack([np.full(k, x0), y1 - (y1 - y0) * t], 1),
            ]
        )
        # Forward thin-plate spline with the original landmarks as centres, evaluated once on a coarse
        # grid over the ROI (the field is smooth): field(grid) = M @ landmark displacements.
        self._step = max(2, S // 64)
        gx = np.arange(x0, x1 + self._step, self._step, dtype=np.float64)
        gy = np.arange(y0, y1 + self._step, self._step, dtype=np.float64)
        gxx, gyy = np.meshgrid(gx, gy)
        self._grid = np.stack([gxx.ravel(), gyy.ravel()], 1)
        self._grid_shape = gxx.shape
        ctrl = np.concatenate([lm, ring])
        n = len(ctrl)
        L = np.zeros((n + 3, n + 3))
        L[:n, :n] = _tps_kernel(((ctrl[:, None] - ctrl[None]) ** 2).sum(-1)) + 1e-3 * np.eye(n)
        L[:n, n:] = np.c_[np.ones(n), ctrl]
        L[n:, :n] = L[:n, n:].T
        rhs = np.zeros((n + 3, len(lm)))
        rhs[: len(lm)] = np.eye(len(lm))  # one solve per landmark: the spline is linear in the displacements
        # scipy's LU: numpy's solve is ~100x slower on this small system with the bundled OpenBLAS here.
        coef = scipy.linalg.lu_solve(scipy.linalg.lu_factor(L), rhs)
        kernel = _tps_kernel(((self._grid[:, None] - ctrl[None]) ** 2).sum(-1))
        self._M = kernel @ coef[:n] + np.c_[np.ones(len(self._grid)), self._grid] @ coef[n:]
        self._lid_colour = self._sample_lid_colour()
        self._cavity, self._teeth, self._tongue = self._mouth_colours()
        self._box = self._mouth_box_neutral()

    def _backward_field(self, d: np.ndarray) -> np.ndarray:
        """Backward displacement (source - target) on the coarse ROI grid, (gh, gw, 2).

        The forward spline moves each grid point; linear interpolation over the moved points inverts it.
        Unlike a fixed-point inversion this also handles folds, e.g. lips pressed shut over an open source
        mouth, where the forward map squeezes the mouth interior to nothing.
        """
        from scipy.interpolate import griddata

        moved = self._grid + self._M @ d
        source = griddata(moved, self._grid, self._grid, method="linear")
        back = np.where(np.isnan(source), self._grid, source) - self._grid
        return back.reshape(*self._grid_shape, 2).astype(np.float32)

    def _sample_lid_colour(self) -> np.ndarray:
        lm, img = self.lm, self.portrait.image
        cols = []
        for eye, brow in ((LEFT_EYE, range(17, 22)), (RIGHT_EYE, range(22, 27))):
            p = 0.5 * lm[eye[1:3]].mean(0) + 0.5 * lm[list(brow)].mean(0)
            x, y = np.clip(np.round(p).astype(int), 1, self.cfg.size - 2)
            cols.append(img[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(0))
        return np.mean(cols, 0)

    def _mouth_colours(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        img = self.portrait.image.reshape(-1, 3).astype(np.float32)
        face = np.median(self.portrait.image[self._face_mask()], axis=0).astype(np.float32)
        # A mouth is a shadow: darker than this face's skin, however dark the skin is.
        cavity = np.minimum(np.array([42, 14, 18], np.float32), 0.3 * face)
        teeth = np.array([215, 208, 195], np.float32) * min(float(img.mean()) / 128, 1.1)
        tongue = cavity + 0.45 * (np.array([120, 45, 55], np.float32) - cavity)
        if np.abs(img - img.mean(1, keepdims=True)).mean() < 2:  # black-and-white photo: grey mouth
            cavity, teeth, tongue = (np.full(3, c.mean(), np.float32) for c in (cavity, teeth, tongue))
        return cavity, teeth, tongue

    def _face_mask(self) -> np.ndarray:
        mask = np.zeros(self.portrait.image.shape[:2], np.uint8)
        cv2.fillConvexPoly(mask, cv2.convexHull(np.round(self.lm).astype(np.int32)), 1)
        return mask > 0

    def _mouth_box_neutral(self) -> np.ndarray:
        lm = self.lm
        lips = lm[OUTER_LIPS]
        x0, x1 = lips[:, 0].min() - 0.25 * self.mouth_w, lips[:, 0].max() + 0.25 * self.mouth_w
        y0 = lips[:, 1].min() - 0.05 * self.mouth_w
        y1 = lips[:, 1].max() + max(self.cfg.max_gap * self.mouth_w - self.gap0, 0) * 0.9 + 0.05 * self.mouth_w
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])

    def displacements(self, mouth_open: float, width: float, rounding: float, blink: float) -> np.ndarray:
        """(68, 2) landmark displacements for one mouth shape and blink amount."""
        lm, down, across = self.lm, self.down, self.across
        d = np.zeros_like(lm)
        delta = mouth_open * self.cfg.max_gap * self.mouth_w - self.gap0  # extra lip gap wanted
        for i in (65, 66, 67, 56, 57, 58):
            d[i] += delta * down
        for i in (55, 59):
            d[i] += 0.7 * delta * down
        for i in (48, 54, 60, 64):
            d[i] += 0.45 * delta * down
        for i, f in _JAW_FOLLOW.items():
            d[i] += f * max(delta, -self.gap0) * down
        spread = (0.18 * (width - 0.5) - 0.12 * rounding) * self.mouth_w  # corners out for wide, in for round
        for i, sign in ((48, -1), (60, -1), (54, 1), (64, 1)):
            d[i] += sign * spread * across
        for i, sign in ((49, -1), (59, -1), (53, 1), (55, 1)):
            d[i] += 0.5 * sign * spread * across
        # Upper lids travel towards the lower lids (not all the way: the warp must not fold).
        for top, bottom in ((37, 41), (38, 40), (43, 47), (44, 46)):
            d[top] += 0.85 * blink * (lm[bottom] - lm[top])
        return d

    def still(self) -> np.ndarray:
        """The cropped portrait itself."""
        return self.portrait.image.copy()

    def frame(
        self,
        mouth_open: float,
        width: float = 0.5,
        rounding: float = 0.0,
        blink: float = 0.0,
        angle: float = 0.0,
        shift: tuple[float, float] = (0.0, 0.0),
        zoom: float = 1.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        S = self.cfg.size
        d = self.displacements(mouth_open, width, rounding, blink)
        # Output pixel q → crop pixel p (undo head motion) → source pixel s = p + field(p).
        head = cv2.getRotationMatrix2D(tuple(self.centre), angle, zoom)
        head[:, 2] += np.array(shift) * S
        inv = cv2.invertAffineTransform(head).astype(np.float32)
        qx, qy = np.meshgrid(np.arange(S, dtype=np.float32), np.arange(S, dtype=np.float32))
        px = inv[0, 0] * qx + inv[0, 1] * qy + inv[0, 2]
        py = inv[1, 0] * qx + inv[1, 1] * qy + inv[1, 2]
        field = self._backward_field(d)
        x0, y0 = self.roi[:2]
        fx = cv2.remap(field[..., 0], (px - x0) / self._step, (py - y0) / self._step, cv2.INTER_LINEAR, borderValue=0)
        fy = cv2.remap(field[..., 1], (px - x0) / self._step, (py - y0) / self._step, cv2.INTER_LINEAR, borderValue=0)
        sx, sy = px + fx, py + fy
        out = cv2.remap(self.portrait.image, sx, sy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

        moved = self.lm + d
        to_out = np.c_[moved, np.ones(len(moved))] @ head.T
        self._paint_mouth(out, to_out, mouth_open)
        if blink > 0.05:
            self._paint_lids(out, to_out, blink)
        box = np.c_[self._box, np.ones(4)] @ head.T
        return out, np.array([*box.min(0), *box.max(0)], np.float32)

    def _paint_mouth(self, out: np.ndarray, pts: np.ndarray, mouth_open: float) -> None:
        gap = mouth_open * self.cfg.max_gap * self.mouth_w
        if gap < 0.8:
            return
        S = self.cfg.size
        ss = 4  # draw the mask at 4x for a smooth edge
        poly = _smooth_polygon(pts[INNER_LIPS])
        mask = np.zeros((S * ss, S * ss), np.uint8)
        cv2.fillPoly(mask, [np.round(poly * ss * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
        mask = cv2.resize(mask, (S, S), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        ys, xs = np.nonzero(mask > 0)
        if len(ys) == 0:
            return
        top = pts[[61, 62, 63], 1].mean()
        yy = np.arange(S, dtype=np.float32)[:, None] - top
        # Interior: dark cavity, pale teeth just under the upper lip, a dull red tongue at the bottom.
        interior = np.empty((S, S, 3), np.float32)
        interior[:] = self._cavity
        teeth_h = 0.25 * gap * float(np.clip((mouth_open - 0.2) / 0.3, 0, 1))
        teeth = np.clip((teeth_h - yy) / 1.0, 0, 1) * (yy > -1)
        interior += teeth[..., None] * (self._teeth - interior)
        tongue = np.clip((yy - 0.8 * gap) / 1.0, 0, 1)
        interior += tongue[..., None] * (self._tongue - interior) * 0.8
        w = mask[..., None]
        out[:] = np.clip(out * (1 - w) + interior * w + 0.5, 0, 255).astype(np.uint8)

    def _paint_lids(self, out: np.ndarray, pts: np.ndarray, blink: float) -> None:
        S = self.cfg.size
        mask = np.zeros((S, S), np.uint8)
        for eye in (LEFT_EYE, RIGHT_EYE):
            cv2.fillPoly(mask, [np.round(pts[eye] * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
        w = (cv2.GaussianBlur(mask, (0, 0), 0.8).astype(np.float32) / 255.0)[..., None] * min(blink * 1.1, 1.0)
        out[:] = np.clip(out * (1 - w) + self._lid_colour * 0.9 * w + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- clips


def list_portraits(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"portrait folder {folder} does not exist")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


@functools.lru_cache(maxsize=64)
def _cached_animator(path: str, config: PortraitConfig) -> PortraitAnimator:
    portrait = load_portrait(path, config.size, config.face_ratio, config.min_face_px)
    return PortraitAnimator(portrait, config)


def animator_for(path: str | os.PathLike, config: PortraitConfig = PortraitConfig()) -> PortraitAnimator:
    """The (per-process cached) animator of one portrait file."""
    return _cached_animator(str(Path(path).resolve()), config)


def _smooth_noise(rng: np.random.Generator, n: int, fps: float, k: int = 3) -> np.ndarray:
    t = np.arange(n) / fps
    f, ph, amp = rng.uniform(0.08, 0.5, k), rng.uniform(0, 2 * np.pi, k), rng.uniform(0.3, 1.0, k)
    out = (amp[:, None] * np.sin(2 * np.pi * f[:, None] * t + ph[:, None])).sum(0) / amp.sum()
    return out - out[0]  # start at the still pose, so frame 0 matches the portrait


def _blinks(rng: np.random.Generator, n: int, fps: float) -> np.ndarray:
    out = np.zeros(n)
    t = rng.uniform(0.5, 3.0)
    while t * fps < n:
        start, dur = t * fps, rng.uniform(0.12, 0.25) * fps
        idx = np.arange(int(start), min(int(start + dur) + 1, n))
        out[idx] = np.maximum(out[idx], np.sin(np.pi * np.clip((idx - start) / dur, 0, 1)))
        t += rng.uniform(1.5, 6.0)
    return out


def generate_clip(
    key: str,
    seed: int,
    portrait: str | os.PathLike,
    sentence_seeds: list[int],
    seconds: float,
    *,
    split: str = "train",
    config: PortraitConfig = PortraitConfig(),
) -> Clip:
    """One clip of a portrait speaking random sentences; fully determined by its arguments."""
    cfg = config
    rng = np.random.default_rng([0x90F7, seed])
    n = int(round(seconds * cfg.fps))
    if n < 1:
        raise ConfigError(f"clip length {seconds} s gives no frames")
    animator = animator_for(portrait, cfg)
    weights = np.array(cfg.language_weights) / np.sum(cfg.language_weights)
    language = cfg.languages[rng.choice(len(cfg.languages), p=weights)]
    voice = random_voice(rng, language)
    lo = min(0.8, 0.3 * seconds)  # a long opening silence, scaled down for very short clips
    lead = (lo, max(lo, 0.45 * seconds)) if rng.random() < cfg.long_silence_prob else (0.0, min(0.6, lo))
    speech = speech_track(rng, n / cfg.fps, voice, sentence_seeds, lead_silence=lead)
    articulation = float(rng.uniform(0.75, 1.05))
    tracks = mouth_tracks(speech.phones, n, cfg.fps, articulation=articulation)
    tracks = MouthTracks(*(np.round(v, 4) for v in (tracks.open, tracks.width, tracks.round)))
    energy = np.convolve(np.pad(tracks.open, (4, 3), mode="edge"), np.ones(8) / 8, mode="valid")
    angle = cfg.max_rotation_deg * _smooth_noise(rng, n, cfg.fps)
    dx = cfg.max_shift * _smooth_noise(rng, n, cfg.fps)
    dy = cfg.max_shift * (0.6 * _smooth_noise(rng, n, cfg.fps) + 0.4 * (energy - energy[0]))
    zoom = 1 + cfg.max_zoom * _smooth_noise(rng, n, cfg.fps)
    blink = np.round(_blinks(rng, n, cfg.fps), 4)
    flip = bool(rng.random() < 0.5)
    frames = np.empty((n, cfg.size, cfg.size, 3), np.uint8)
    boxes = np.empty((n, 4), np.float32)
    for i in range(n):
        frames[i], boxes[i] = animator.frame(
            float(tracks.open[i]), float(tracks.width[i]), float(tracks.round[i]), float(blink[i]),
            float(angle[i]), (float(dx[i]), float(dy[i])), float(zoom[i]),
        )  # fmt: skip
    if flip:  # a mirrored portrait is a cheap second identity-like variant
        frames = frames[:, :, ::-1].copy()
        boxes = np.stack([cfg.size - boxes[:, 2], boxes[:, 1], cfg.size - boxes[:, 0], boxes[:, 3]], 1)
    meta = {
        "source": SOURCE,
        "identity": f"portrait-{animator.portrait.name}",
        "split": split,
        "seed": seed,
        "fps": cfg.fps,
        "portrait": Path(portrait).name,
        "flipped": flip,
        **speech_metadata(speech, tracks, sentence_seeds, language, voice),
        "blink": blink.tolist(),
        "landmarks": "mediapipe-face-mesh-68",
    }
    return Clip(key, frames, speech.audio, SAMPLE_RATE, meta, {"mouth_box": boxes})
