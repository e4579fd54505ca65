"""Procedural talking faces: cartoon-like but varied 2-D faces whose mouths follow espeak-ng speech.

Everything is drawn with OpenCV (anti-aliased, sub-pixel) from a few dozen random parameters:

- identity (`FaceStyle`, from an identity seed): face shape, skin tone, hair colour and style, eye
  spacing/size/colour, brows, nose, lips, ears, glasses, clothing;
- clip (from the clip seed): background (flat, gradient, radial, texture, stripes), lighting direction,
  strength and colour, head motion (smooth translation, rotation and scale plus a speech-driven nod),
  blinks, brow movement, voice (language, variant, speed, pitch), sentences and pauses.

The mouth is driven by `visemes.mouth_tracks`, and the values actually drawn are stored as the clip's
truth: `mouth_open` (lip gap / maximal gap), `mouth_width`, `mouth_round`, `blink`, and the per-frame
mouth box (`extras["mouth_box"]`, pixels x0, y0, x1, y1).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import cv2
import numpy as np

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
from flashhead.errors import ConfigError

log = logging.getLogger(__name__)

SOURCE = "synth-procedural"
_SHIFT = 4  # OpenCV fixed-point bits: coordinates in 1/16 pixel
_ONE = 1 << _SHIFT

# Fitzpatrick-like range plus a few cartoon tones, RGB.
_SKIN = np.array(
    [
        [255, 224, 196],
        [241, 194, 167],
        [224, 172, 138],
        [198, 134, 99],
        [161, 102, 74],
        [120, 76, 52],
        [88, 56, 40],
        [234, 200, 160],
        [250, 210, 180],
        [190, 150, 120],
    ],
    np.float64,
)
_HAIR = np.array(
    [
        [20, 16, 14],
        [60, 40, 28],
        [110, 72, 40],
        [170, 120, 60],
        [225, 190, 120],
        [160, 60, 30],
        [150, 150, 150],
        [235, 235, 230],
        [70, 40, 110],
        [30, 80, 160],
        [200, 60, 120],
    ],
    np.float64,
)
_IRIS = np.array([[70, 45, 25], [40, 90, 160], [60, 120, 70], [110, 80, 40], [20, 20, 20], [90, 110, 130]], np.float64)
HAIR_STYLES = ("bald", "short", "fringe", "side", "long", "bob", "bun", "curly", "spiky")
BACKGROUNDS = ("flat", "gradient", "radial", "texture", "stripes")


@dataclass(frozen=True)
class FaceStyle:
    """One procedural identity. Lengths are fractions of the frame size."""

    face_w: float
    face_h: float
    squareness: float  # superellipse exponent: 2 = ellipse, larger = squarer
    jaw: float  # how much the lower face narrows towards the chin
    face_y: float
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_style: str
    hairline: float
    eye_dx: float
    eye_y: float
    eye_w: float
    eye_h: float
    iris: tuple[float, float, float]
    brow_thick: float
    brow_tilt: float
    brow_colour: tuple[float, float, float]
    nose_len: float
    nose_style: int
    mouth_y: float
    mouth_w: float
    lip_thick: float
    lips: tuple[float, float, float]
    ears: bool
    glasses: bool
    glasses_colour: tuple[float, float, float]
    clothes: tuple[float, float, float]
    articulation: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> FaceStyle:
        """A random identity."""
        skin = _SKIN[rng.integers(len(_SKIN))] * rng.uniform(0.92, 1.05, 3)
        hair = _HAIR[rng.integers(len(_HAIR))] * rng.uniform(0.85, 1.15, 3)
        face_w = rng.uniform(0.22, 0.29)

        def colour(c: np.ndarray) -> tuple[float, float, float]:
            return tuple(float(v) for v in np.clip(c, 0, 255))

        return cls(
            face_w=float(face_w),
            face_h=float(face_w * rng.uniform(1.15, 1.45)),
            squareness=float(rng.uniform(2.0, 3.2)),
            jaw=float(rng.uniform(0.0, 0.35)),
            face_y=float(rng.uniform(0.44, 0.50)),
            skin=colour(skin),
            hair=colour(hair),
            hair_style=HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
            hairline=float(rng.uniform(0.45, 0.7)),
            eye_dx=float(rng.uniform(0.34, 0.44)),
            eye_y=float(rng.uniform(-0.22, -0.08)),
            eye_w=float(rng.uniform(0.16, 0.23)),
            eye_h=float(rng.uniform(0.45, 0.7)),
            iris=colour(_IRIS[rng.integers(len(_IRIS))] * rng.uniform(0.8, 1.2, 3)),
            brow_thick=float(rng.uniform(0.025, 0.06)),
            brow_tilt=float(rng.uniform(-0.08, 0.12)),
            brow_colour=colour(hair * 0.8 if rng.random() < 0.8 else np.array([60.0, 45, 35])),
            nose_len=float(rng.uniform(0.18, 0.3)),
            nose_style=int(rng.integers(3)),
            mouth_y=float(rng.uniform(0.42, 0.52)),
            mouth_w=float(rng.uniform(0.32, 0.44)),
            lip_thick=float(rng.uniform(0.035, 0.07)),
            lips=colour(skin * np.array([0.85, 0.55, 0.58]) * rng.uniform(0.85, 1.1)),
            ears=bool(rng.random() < 0.7),
            glasses=bool(rng.random() < 0.2),
            glasses_colour=colour(rng.uniform(0, 120, 3)),
            clothes=colour(rng.uniform(20, 235, 3)),
            articulation=float(rng.uniform(0.75, 1.1)),
        )


@dataclass(frozen=True)
class ProceduralConfig:
    """How procedural clips are made."""

    size: int = 128
    fps: int = 25
    languages: tuple[str, ...] = LANGUAGES
    # English dominates; the other languages add phonetic variety.
    language_weights: tuple[float, ...] = (0.6, 0.1, 0.1, 0.1, 0.1)
    # Chance that a clip opens with a long silence (idle motion, closed mouth) before anyone speaks.
    long_silence_prob: float = 0.25
    max_rotation_deg: float = 5.0
    max_shift: float = 0.03
    max_zoom: float = 0.04

    def __post_init__(self) -> None:
        if self.size < 64 or self.size % 2:
            raise ConfigError(f"procedural size must be even and >= 64, got {self.size}")
        if len(self.language_weights) != len(self.languages):
            raise ConfigError("language_weights must have one weight per language")


@dataclass(frozen=True)
class FrameState:
    """What changes from frame to frame."""

    mouth_open: float
    mouth_width: float
    mouth_round: float
    blink: float
    brow_raise: float
    angle: float  # degrees
    shift: tuple[float, float]  # fraction of frame size
    zoom: float
    light: float


# ---------------------------------------------------------------- drawing helpers


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x * _ONE)), int(round(y * _ONE))


def _ellipse(img, centre, axes, colour, angle=0.0, start=0.0, end=360.0, thickness=-1) -> None:
    axes = (max(int(round(axes[0] * _ONE)), 1), max(int(round(axes[1] * _ONE)), 1))
    cv2.ellipse(img, _pt(*centre), axes, angle, start, end, colour, thickness, cv2.LINE_AA, _SHIFT)


def _poly(img, points: np.ndarray, colour) -> None:
    cv2.fillPoly(img, [np.round(points * _ONE).astype(np.int32)], colour, cv2.LINE_AA, _SHIFT)


def _polyline(img, points: np.ndarray, colour, thickness: float) -> None:
    t = max(int(round(thickness)), 1)
    cv2.polylines(img, [np.round(points * _ONE).astype(np.int32)], False, colour, t, cv2.LINE_AA, _SHIFT)


def _paint(layer: np.ndarray, mask: np.ndarray, source) -> None:
    """Blend `source` (an image or a colour) into `layer` where the anti-aliased `mask` (0-255) is set."""
    w = mask.astype(np.float32)[..., None] / 255.0
    src = np.asarray(source, np.float32)
    layer[...] = np.round(layer * (1 - w) + src * w).astype(np.uint8)


def _face_outline(cx: float, cy: float, a: float, b: float, n: float, jaw: float, k: int = 72) -> np.ndarray:
    th = np.linspace(0, 2 * np.pi, k, endpoint=False)
    c, s = np.cos(th), np.sin(th)
    x = a * np.sign(c) * np.abs(c) ** (2 / n)
    y = b * np.sign(s) * np.abs(s) ** (2 / n)
    x *= 1 - jaw * np.clip(s, 0, 1) ** 2  # narrow towards the chin (y grows downwards)
    return np.stack([cx + x, cy + y], axis=1)


# ---------------------------------------------------------------- the renderer


class FaceRenderer:
    """Draws one identity at one size; `frame(state)` returns (H, W, 3) uint8 and the mouth box."""

    def __init__(self, style: FaceStyle, size: int, rng: np.random.Generator) -> None:
        self.style, self.size = style, size
        self.background = _background(rng, size)
        self._light_dir = rng.uniform(-1, 1, 2)
        self._light_strength = rng.uniform(0.05, 0.3)
        self._tint = rng.uniform(0.92, 1.06, 3)
        self._base_light = rng.uniform(0.8, 1.1)
        self._curl_phase = rng.uniform(0, 2 * np.pi)
        self._body = self._draw_body()
        S = size
        self.cx, self.cy = 0.5 * S, style.face_y * S
        self.a, self.b = style.face_w * S, style.face_h * S
        self.mouth_c = (self.cx, self.cy + style.mouth_y * self.b)
        self.mouth_half_w = 0.5 * style.mouth_w * 2 * self.a
        self.max_gap = 0.75 * self.mouth_half_w  # lip gap at mouth_open = 1
        yy, xx = np.mgrid[0:S, 0:S] / S - 0.5
        self._light_map = 1.0 + self._light_strength * (self._light_dir[0] * xx + self._light_dir[1] * yy) * 2

    def _draw_body(self) -> np.ndarray:
        st, S = self.style, self.size
        layer = np.zeros((S, S, 4), np.uint8)
        neck_w = st.face_w * S * 0.55
        neck_top = (st.face_y + st.face_h * 0.6) * S
        skin_dark = tuple(c * 0.82 for c in st.skin) + (255,)
        cv2.rectangle(
            layer, _pt(S / 2 - neck_w, neck_top), _pt(S / 2 + neck_w, S * 0.95), skin_dark, -1, cv2.LINE_AA, _SHIFT
        )
        shoulders_y = (st.face_y + st.face_h * 1.35) * S
        _ellipse(layer, (S / 2, shoulders_y + 0.3 * S), (0.48 * S, 0.33 * S), st.clothes + (255,))
        _ellipse(layer, (S / 2, shoulders_y - 0.01 * S), (neck_w * 1.1, 0.05 * S), skin_dark, start=0, end=180)
        return layer

    def _head_layer(self, f: FrameState) -> np.ndarray:
        st, S = self.style, self.size
        cx, cy, a, b = self.cx, self.cy, self.a, self.b
        layer = np.zeros((S, S, 4), np.uint8)
        hair = st.hair + (255,)
        skin = st.skin + (255,)
        if st.hair_style in ("long", "bob"):
            length = 1.55 if st.hair_style == "long" else 1.05
            _poly(
                layer,
                np.array(
                    [
                        [cx - 1.2 * a, cy - 0.2 * b],
                        [cx + 1.2 * a, cy - 0.2 * b],
                        [cx + 1.25 * a, cy + length * b],
                        [cx - 1.25 * a, cy + length * b],
                    ]
                ),
                hair,
            )
            _ellipse(layer, (cx, cy - 0.2 * b), (1.2 * a, 1.05 * b), hair)
        if st.hair_style == "bun":
            _ellipse(layer, (cx, cy - 1.12 * b), (0.45 * a, 0.35 * b), hair)
        if st.ears:
            for sx in (-1, 1):
                _ellipse(
                    layer,
                    (cx + sx * 0.97 * a, cy - 0.02 * b),
                    (0.18 * a, 0.26 * b),
                    tuple(c * 0.93 for c in st.skin) + (255,),
                )
        _poly(layer, _face_outline(cx, cy, a, b, st.squareness, st.jaw), skin)
        self._draw_hair_front(layer, hair)
        self._draw_eyes(layer, f)
        self._draw_brows(layer, f)
        self._draw_nose(layer)
        self._draw_mouth(layer, f)
        if st.glasses:
            g = st.glasses_colour + (255,)
            ey, r = cy + st.eye_y * b, st.eye_w * a * 1.05
            for sx in (-1, 1):
                _ellipse(layer, (cx + sx * st.eye_dx * a, ey), (r, r * 0.8), g, thickness=max(1, S // 96))
            _polyline(layer, np.array([[cx - st.eye_dx * a + r, ey], [cx + st.eye_dx * a - r, ey]]), g, max(1, S // 96))
        return layer

    def _draw_hair_front(self, layer, hair) -> None:
        st = self.style
        cx, cy, a, b = self.cx, self.cy, self.a, self.b
        top = cy - b
        line = cy - st.hairline * b  # where the forehead meets the hair
        if st.hair_style == "bald":
            return
        if st.hair_style == "curly":
            k = 14
            for i in range(k):
                th = np.pi + np.pi * i / (k - 1)
                r = 0.32 * a * (1 + 0.2 * np.sin(3 * i + self._curl_phase))
                _ellipse(layer, (cx + 1.0 * a * np.cos(th), cy + 0.92 * b * np.sin(th) * 0.95), (r, r), hair)
            _ellipse(layer, (cx, top + 0.25 * b), (0.95 * a, 0.35 * b), hair)
            return
        # A cap over the skull, cut off at the hairline.
        cap = _face_outline(cx, cy - 0.05 * b, a * 1.06, b * 1.02, st.squareness, 0.0, 96)
        cap = cap[cap[:, 1] <= line]
        if st.hair_style == "fringe":
            cap = np.concatenate([cap, [[cx + 0.9 * a, line + 0.15 * b], [cx - 0.9 * a, line + 0.15 * b]]])
        elif st.hair_style == "side":
            cap = np.concatenate(
                [cap, [[cx + 0.95 * a, line], [cx - 0.3 * a, line - 0.05 * b], [cx - 0.95 * a, line + 0.25 * b]]]
            )
        cap = cap[np.argsort(np.arctan2(cap[:, 1] - cy, cap[:, 0] - cx))]
        _poly(layer, cap, hair)
        if st.hair_style == "spiky":
            for i in range(7):
                x = cx + (i - 3) * 0.28 * a
                y = top + 0.12 * b + abs(i - 3) * 0.08 * b
                _poly(
                    layer,
                    np.array([[x - 0.16 * a, y + 0.1 * b], [x + 0.16 * a, y + 0.1 * b], [x + 0.03 * a, y - 0.28 * b]]),
                    hair,
                )
        if st.hair_style in ("long", "bob"):
            for sx in (-1, 1):
                _poly(
                    layer,
                    np.array(
                        [
                            [cx + sx * 1.06 * a, cy - 0.6 * b],
                            [cx + sx * 0.82 * a, line],
                            [cx + sx * 0.9 * a, cy + 0.35 * b],
                            [cx + sx * 1.12 * a, cy + 0.3 * b],
                        ]
                    ),
                    hair,
                )

    def _draw_eyes(self, layer, f: FrameState) -> None:
        st = self.style
        cx, cy, a, b = self.cx, self.cy, self.a, self.b
        ew, eh = st.eye_w * a, st.eye_w * a * st.eye_h
        ey = cy + st.eye_y * b
        lid = tuple(c * 0.9 for c in st.skin) + (255,)
        for sx in (-1, 1):
            ex = cx + sx * st.eye_dx * a
            _ellipse(layer, (ex, ey), (ew, eh), (245, 245, 240, 255))
            _ellipse(layer, (ex, ey), (eh * 0.85, eh * 0.85), st.iris + (255,))
            _ellipse(layer, (ex, ey), (eh * 0.4, eh * 0.4), (10, 10, 10, 255))
            _ellipse(layer, (ex + 0.25 * eh, ey - 0.3 * eh), (eh * 0.15, eh * 0.15), (255, 255, 255, 255))
            # The upper lid's edge is an arc that flattens, then inverts, as the eye closes.
            close = float(np.clip(f.blink, 0, 1))
            xs = np.linspace(-1.1, 1.1, 23)
            edge = np.stack([ex + xs * ew, ey - eh * (1 - 2 * close) * np.sqrt(np.clip(1 - xs**2, 0, 1))], 1)
            lid_pts = np.concatenate([edge, [[ex + 1.2 * ew, ey - 1.6 * eh], [ex - 1.2 * ew, ey - 1.6 * eh]]])
            eye_mask = np.zeros(layer.shape[:2], np.uint8)
            _ellipse(eye_mask, (ex, ey), (ew * 1.05, eh * 1.1), 255)
            lid_layer = layer.copy()
            _poly(lid_layer, lid_pts, lid)
            _paint(layer, eye_mask, lid_layer)
            _polyline(layer, edge[2:-2], (30, 20, 20, 255), max(1.0, self.size / 128))

    def _draw_brows(self, layer, f: FrameState) -> None:
        st = self.style
        cx, cy, a, b = self.cx, self.cy, self.a, self.b
        ey = cy + st.eye_y * b - st.eye_w * a * st.eye_h * 2.0 - f.brow_raise * 0.05 * b
        for sx in (-1, 1):
            ex = cx + sx * st.eye_dx * a
            xs = np.linspace(-1, 1, 7)
            pts = np.stack(
                [ex + sx * xs * st.eye_w * a * 1.3, ey - 0.06 * b * (1 - xs**2) + sx * xs * st.brow_tilt * a * 0.3], 1
            )
            _polyline(layer, pts, st.brow_colour + (255,), st.brow_thick * a * 2)

    def _draw_nose(self, layer) -> None:
        st = self.style
        cx, cy, a, b = self.cx, self.cy, self.a, self.b
        shade = tuple(c * 0.75 for c in st.skin) + (255,)
        tip = cy + (st.eye_y + st.nose_len + 0.12) * b
        w = max(1.0, self.size / 160)
        if st.nose_style == 0:
            _polyline(
                layer, np.array([[cx - 0.02 * a, tip - 0.3 * b], [cx - 0.1 * a, tip], [cx + 0.06 * a, tip]]), shade, w
            )
        elif st.nose_style == 1:
            for sx in (-1, 1):
                _ellipse(layer, (cx + sx * 0.08 * a, tip), (0.04 * a, 0.025 * b), shade)
        else:
            _ellipse(layer, (cx, tip - 0.02 * b), (0.13 * a, 0.07 * b), shade, start=0, end=180, thickness=int(w))

    def _draw_mouth(self, layer, f: FrameState) -> None:
        st = self.style
        mx, my = self.mouth_c
        half_w = self.mouth_half_w * (0.8 + 0.4 * f.mouth_width) * (1 - 0.35 * f.mouth_round)
        gap = f.mouth_open * self.max_gap
        lip = st.lip_thick * self.b
        lips = st.lips + (255,)
        if gap < 0.5:
            # Closed: two lips meeting at a darker line.
            _ellipse(layer, (mx, my), (half_w, lip * 0.9), lips)
            line = tuple(c * 0.8 for c in st.lips) + (255,)
            pts = np.array([[mx - half_w, my], [mx, my + 0.15 * lip], [mx + half_w, my]])
            _polyline(layer, pts, line, max(1.0, self.size / 256))
            return
        _ellipse(layer, (mx, my), (half_w + 0.15 * lip, gap / 2 + lip), lips)
        inner_w = half_w * 0.88
        cavity = np.zeros(layer.shape[:2], np.uint8)
        _ellipse(cavity, (mx, my), (inner_w, gap / 2), 255)
        # Teeth: a pale band at the top of the cavity; a tongue hint at the bottom.
        teeth = np.zeros_like(cavity)
        # Teeth show once the jaw drops a little, as in real speech.
        teeth_h = 0.22 * gap * float(np.clip((f.mouth_open - 0.2) / 0.3, 0, 1))
        if teeth_h > 0.3:
            _ellipse(teeth, (mx, my - gap / 2), (inner_w * 0.8, teeth_h), 255)
        tongue = np.zeros_like(cavity)
        _ellipse(tongue, (mx, my + gap / 2), (inner_w * 0.55, 0.15 * gap), 255)
        # The cavity is a shadow, so darker than any skin; the tongue stays in that shadow.
        dark = np.minimum(np.array([45.0, 12, 18]), np.array(st.skin) * [0.3, 0.12, 0.15])
        tongue_colour = dark + 0.4 * (np.array(st.lips) - dark)
        inside = layer.copy()
        inside[...] = (*dark, 255)
        _paint(inside, np.minimum(tongue, 255 - teeth), (*tongue_colour, 255))
        _paint(inside, teeth, (235, 232, 220, 255))
        _paint(layer, cavity, inside)

    def frame(self, f: FrameState) -> tuple[np.ndarray, np.ndarray]:
        """The rendered frame (H, W, 3) uint8 and its mouth box [x0, y0, x1, y1] in pixels."""
        S = self.size
        head = self._head_layer(f)
        pivot = (0.5 * S, (self.style.face_y + self.style.face_h) * S)
        m = cv2.getRotationMatrix2D(pivot, f.angle, f.zoom)
        m[:, 2] += np.array(f.shift) * S
        head = cv2.warpAffine(head, m, (S, S), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        body = self._body
        body = cv2.warpAffine(body, np.float64([[1, 0, 0.4 * f.shift[0] * S], [0, 1, 0.4 * f.shift[1] * S]]), (S, S))
        img = self.background.astype(np.float32)
        for layer in (body, head):
            alpha = layer[..., 3:4].astype(np.float32) / 255.0
            # OpenCV's anti-aliasing on a transparent layer yields premultiplied colour.
            img = img * (1 - alpha) + layer[..., :3].astype(np.float32)
        img *= (self._light_map * self._base_light * f.light)[..., None] * self._tint
        out = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        # The mouth box follows the head transform; it bounds the widest, most open mouth.
        mx, my = m @ np.array([*self.mouth_c, 1.0])
        hw, hh = self.mouth_half_w * 1.3 * f.zoom, (self.max_gap / 2 + self.style.lip_thick * self.b * 1.2) * f.zoom
        return out, np.array([mx - hw, my - hh, mx + hw, my + hh], np.float32)


def _background(rng: np.random.Generator, S: int) -> np.ndarray:
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:S, 0:S] / S
    if kind == "flat":
        t = np.zeros((S, S))
    elif kind == "gradient":
        th = rng.uniform(0, 2 * np.pi)
        t = np.clip((xx - 0.5) * np.cos(th) + (yy - 0.5) * np.sin(th) + 0.5, 0, 1)
    elif kind == "radial":
        t = np.clip(np.hypot(xx - rng.uniform(0.2, 0.8), yy - rng.uniform(0.2, 0.8)) * 1.4, 0, 1)
    elif kind == "texture":
        noise = rng.random((S // 8 + 2, S // 8 + 2))
        t = cv2.resize(noise, (S, S), interpolation=cv2.INTER_CUBIC)
        t = (t - t.min()) / max(np.ptp(t), 1e-6)
    else:
        th, period = rng.uniform(0, np.pi), rng.uniform(0.08, 0.3)
        t = (np.sin(((xx * np.cos(th) + yy * np.sin(th)) / period) * 2 * np.pi) > 0).astype(np.float64)
        t = cv2.GaussianBlur(t, (0, 0), max(S / 256, 0.5))
    return (c1 * (1 - t[..., None]) + c2 * t[..., None]).astype(np.float32)


# ---------------------------------------------------------------- motion


def _smooth_noise(rng: np.random.Generator, n: int, fps: float, freqs=(0.08, 0.6), k: int = 3) -> np.ndarray:
    """Sum of k random slow sinusoids, scaled to peak about 1."""
    t = np.arange(n) / fps
    f = rng.uniform(*freqs, k)
    ph = rng.uniform(0, 2 * np.pi, k)
    amp = rng.uniform(0.3, 1.0, k)
    return (amp[:, None] * np.sin(2 * np.pi * f[:, None] * t + ph[:, None])).sum(0) / amp.sum()


def _blinks(rng: np.random.Generator, n: int, fps: float) -> np.ndarray:
    out = np.zeros(n)
    t = rng.uniform(0.3, 3.0)
    while t * fps < n:
        dur = rng.uniform(0.1, 0.25) * fps
        start = t * fps
        idx = np.arange(int(start), min(int(start + dur) + 1, n))
        out[idx] = np.maximum(out[idx], np.sin(np.pi * np.clip((idx - start) / dur, 0, 1)))
        t += rng.uniform(1.5, 6.0)
    return out


def frame_states(rng: np.random.Generator, mouth: MouthTracks, fps: float, cfg: ProceduralConfig) -> list[FrameState]:
    """Per-frame head motion, blinks, brows and lighting around a given mouth track."""
    n = len(mouth.open)
    # Nods and brow raises follow speech a little: a smoothed, delayed copy of the mouth opening.
    energy = np.convolve(np.pad(mouth.open, (4, 3), mode="edge"), np.ones(8) / 8, mode="valid")
    nod = energy - energy.mean()
    angle = cfg.max_rotation_deg * _smooth_noise(rng, n, fps)
    dx = cfg.max_shift * _smooth_noise(rng, n, fps)
    dy = cfg.max_shift * (0.6 * _smooth_noise(rng, n, fps) + 0.4 * nod)
    zoom = 1 + cfg.max_zoom * _smooth_noise(rng, n, fps)
    brow = np.clip(0.5 * _smooth_noise(rng, n, fps, (0.2, 1.0)) + 0.8 * nod, -1, 1)
    light = 1 + 0.04 * _smooth_noise(rng, n, fps, (0.05, 0.3))
    blink = _blinks(rng, n, fps)
    return [
        FrameState(
            float(mouth.open[i]),
            float(mouth.width[i]),
            float(mouth.round[i]),
            float(blink[i]),
            float(brow[i]),
            float(angle[i]),
            (float(dx[i]), float(dy[i])),
            float(zoom[i]),
            float(light[i]),
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------- clips


def identity_style(identity: int) -> FaceStyle:
    """The face of procedural identity number `identity` (same number → same face)."""
    return FaceStyle.sample(np.random.default_rng([0x1D, identity]))


def generate_clip(
    key: str,
    seed: int,
    identity: int,
    sentence_seeds: list[int],
    seconds: float,
    *,
    split: str = "train",
    config: ProceduralConfig = ProceduralConfig(),
) -> Clip:
    """One procedural talking-face clip; fully determined by its arguments."""
    rng = np.random.default_rng([0xC11B, seed])
    cfg = config
    n = int(round(seconds * cfg.fps))
    if n < 1:
        raise ConfigError(f"clip length {seconds} s gives no frames")
    style = identity_style(identity)
    weights = np.array(cfg.language_weights) / np.sum(cfg.language_weights)
    language = cfg.languages[rng.choice(len(cfg.languages), p=weights)]
    voice = random_voice(rng, language)
    lo = min(0.8, 0.3 * seconds)  # a long opening silence, scaled down for very short clips
    lead = (lo, max(lo, 0.45 * seconds)) if rng.random() < cfg.long_silence_prob else (0.0, min(0.6, lo))
    speech = speech_track(rng, n / cfg.fps, voice, sentence_seeds, lead_silence=lead)
    tracks = mouth_tracks(speech.phones, n, cfg.fps, articulation=style.articulation)
    # What is drawn is what is stored: round first, then render from the rounded values.
    tracks = MouthTracks(*(np.round(v, 4) for v in (tracks.open, tracks.width, tracks.round)))
    states = frame_states(rng, tracks, cfg.fps, cfg)
    renderer = FaceRenderer(style, cfg.size, rng)
    frames = np.empty((n, cfg.size, cfg.size, 3), np.uint8)
    boxes = np.empty((n, 4), np.float32)
    for i, state in enumerate(states):
        frames[i], boxes[i] = renderer.frame(state)
    meta = {
        "source": SOURCE,
        "identity": f"proc-{identity}",
        "split": split,
        "seed": seed,
        "fps": cfg.fps,
        **speech_metadata(speech, tracks, sentence_seeds, language, voice),
        "blink": [round(s.blink, 4) for s in states],
        "face_style": asdict(style),
    }
    return Clip(key, frames, speech.audio, SAMPLE_RATE, meta, {"mouth_box": boxes})
