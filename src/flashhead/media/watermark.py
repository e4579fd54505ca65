"""An invisible watermark that marks every generated frame, and a detector for it.

Design (see docs/media.md for measurements). A fixed, public key spreads a 32-bit id over a coarse 64 x 64
grid laid over the whole frame (cells of 8 x 8 px at 512 x 512): each cell gets a pseudo-random chip of +-1,
each of the 32 bits owns 128 randomly interleaved cells, and a cell's sign is its chip times its bit.
The embedder adds this pattern, bilinearly upsampled to the frame size and scaled to `STRENGTH` grey levels,
to the luma (the same amount to R, G and B, so the colour does not shift). For a given frame size the
pattern is computed once, so marking a frame is one saturating add.

The detector resizes each frame's luma to the 64 x 64 grid (area averaging), so the mark survives any
rescaling of the whole frame, removes the picture with a 3 x 3 local-mean high-pass, divides the residual by
its local variance (this is the locally optimal detector for a picture whose texture varies: edges and hair
count little, flat skin and walls count a lot), averages the residuals of up to 32 frames, and correlates them
with the expected pattern. The correlation z-score is N(0, 1) for unmarked video whatever its content (the
chips are independent random signs), so a threshold of 5 gives about three false alarms in ten million
videos; the per-bit correlations give the decoded id and the bit accuracy.

The mark is a provenance aid, not a security measure: the key is in this open source file, so anyone can
detect it and anyone determined can remove it. It does not survive cropping, flipping or rotation.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashhead.errors import MediaError

WATERMARK_ID = 0xF1A54EAD  # "flashhead", roughly, in hex
GRID = 64  # cells per side; finer cells die in a CRF 28 re-encode at 256 px, coarser ones meet more picture
STRENGTH = 3.5  # chip amplitude in grey levels; PSNR about 41 dB at 512 x 512
THRESHOLD = 5.0  # z-score above which a video counts as marked (false alarm rate 3e-7)
MAX_FRAMES = 32  # frames a video detection looks at, spread over its length
NUM_BITS = 32
_KEY = b"flashhead-watermark-v1"
_VARIANCE_FLOOR = 1.0  # grey levels^2; keeps perfectly flat areas from dominating the detector


@dataclass(frozen=True)
class DetectionResult:
    """What `detect_watermark` found.

    Attributes:
        detected: the flashhead watermark with the expected id is present.
        score: correlation z-score with the expected pattern: about N(0, 1) for unmarked video; 20 to 45 for
            our saved 512 x 512 output, 11 to 33 after it is downscaled to 256 x 256 and re-encoded at CRF 28.
        bit_accuracy: fraction of the 32 id bits read correctly (about 0.5 for unmarked video).
        payload: the 32-bit id as read from the frames.
        frames_checked: how many frames were analysed.
    """

    detected: bool
    score: float
    bit_accuracy: float
    payload: int
    frames_checked: int


def embed_watermark(frames: np.ndarray, payload: int = WATERMARK_ID, *, strength: float = STRENGTH) -> np.ndarray:
    """Mark frames with the invisible flashhead watermark.

    Args:
        frames: uint8 RGB, (T, H, W, 3) or one (H, W, 3) frame, any size (a streaming chunk is fine).
        payload: the 32-bit id to embed.
        strength: amplitude in grey levels; the default keeps PSNR near 41 dB.

    Returns:
        Marked frames, same shape and dtype (a new array; the input is not modified).
    """
    frames = _check_frames(frames)
    delta = _delta(frames.shape[-3], frames.shape[-2], payload, strength)[:, :, None]
    batch = frames.reshape(-1, *frames.shape[-3:])
    marked = np.empty_like(batch)
    work = np.empty(batch.shape[1:], np.int16)
    # Frame by frame: the int16 scratch frame stays in cache, which is several times faster than one big array.
    for i, frame in enumerate(batch):
        np.add(frame, delta, out=work)
        np.clip(work, 0, 255, out=work)
        marked[i] = work
    return marked.reshape(frames.shape)


def detect_watermark(
    source: np.ndarray | str | os.PathLike, payload: int = WATERMARK_ID, *, max_frames: int = MAX_FRAMES
) -> DetectionResult:
    """Look for the flashhead watermark in frames, a video file or an image file.

    Args:
        source: uint8 RGB frames (T, H, W, 3) or one frame (H, W, 3), or a path to anything PyAV decodes (MP4,
            MOV, WebM, PNG, JPEG, ...).
        payload: the id to look for.
        max_frames: at most this many frames are analysed, spread evenly over a video.

    Raises:
        MediaError: the file cannot be read or has no video track.
    """
    if isinstance(source, (str, os.PathLike)):
        lumas = _read_lumas(Path(source), max_frames)
    else:
        frames = _check_frames(source)
        frames = frames.reshape(-1, *frames.shape[-3:])
        step = max(1, -(-len(frames) // max_frames))
        lumas = [_luma(frame) for frame in frames[::step]]

    residual = np.mean([_whitened(luma) for luma in lumas], axis=0)
    chips, groups = _chips()
    bits = _bits(payload)
    norm = float(np.sqrt(np.sum(residual**2)))
    if norm == 0.0:  # a blank picture carries nothing
        return DetectionResult(False, 0.0, 0.5, 0, len(lumas))
    score = float(np.sum(residual * chips * bits[groups]) / norm)
    per_bit = np.bincount(groups.ravel(), weights=(residual * chips).ravel(), minlength=NUM_BITS)
    read = (per_bit > 0).astype(np.int64)
    found = int(np.sum(read << np.arange(NUM_BITS)))
    accuracy = float(np.mean(read * 2 - 1 == bits))
    return DetectionResult(score >= THRESHOLD, score, accuracy, found, len(lumas))


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim not in (3, 4) or frames.shape[-1] != 3:
        raise MediaError(f"frames must be RGB of shape (T, H, W, 3) or (H, W, 3), not {frames.shape}")
    if frames.dtype != np.uint8:
        raise MediaError(f"frames must be uint8, not {frames.dtype}")
    if min(frames.shape[-3:-1]) < 16:
        raise MediaError(f"frames of {frames.shape[-2]}x{frames.shape[-3]} are too small to carry a watermark")
    return frames


def _read_lumas(path: Path, max_frames: int) -> list[np.ndarray]:
    import av

    from flashhead.media.audio_io import open_media

    lumas = []
    with open_media(path, MediaError, "video") as container:
        if not container.streams.video:
            raise MediaError(f"{path}: has no video track")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        step = max(1, -(-(stream.frames or 0) // max_frames))
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i % step == 0:
                    lumas.append(frame.to_ndarray(format="gray").astype(np.float32))
                    if len(lumas) == max_frames:
                        break
        except av.FFmpegError as e:
            if not lumas:
                raise MediaError(f"{path}: video could not be decoded ({getattr(e, 'strerror', None) or e})") from None
    if not lumas:
        raise MediaError(f"{path}: the video track holds no frames")
    return lumas


def _luma(frame: np.ndarray) -> np.ndarray:
    return frame.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])


def _whitened(luma: np.ndarray) -> np.ndarray:
    """Grid-resolution residual of one luma image, divided by its local variance."""
    height, width = luma.shape
    if height % GRID == 0 and width % GRID == 0:  # the usual case; also spares a busy BLAS thread pool
        grid = luma.reshape(GRID, height // GRID, GRID, width // GRID).mean(axis=(1, 3), dtype=np.float64)
    else:
        grid = _area_matrix(GRID, height) @ luma @ _area_matrix(GRID, width).T
    residual = grid - _box_mean(grid, 3)
    variance = np.maximum(_box_mean(residual**2, 3), 0.0)
    return residual / (variance + _VARIANCE_FLOOR)


def _box_mean(x: np.ndarray, k: int) -> np.ndarray:
    """k x k mean with edge padding, through a summed-area table."""
    padded = np.pad(x.astype(np.float64), k // 2, mode="edge")
    table = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = x.shape
    return (table[k : k + h, k : k + w] - table[:h, k : k + w] - table[k : k + h, :w] + table[:h, :w]) / (k * k)


@functools.lru_cache(maxsize=8)
def watermark_delta(height: int, width: int, payload: int = WATERMARK_ID, strength: float = STRENGTH) -> np.ndarray:
    """The (H, W) int16 offsets `embed_watermark` adds to every channel of a frame (then clips to 0..255), for
    callers that apply them elsewhere (the streaming engine adds them on the GPU)."""
    return _delta(height, width, payload, strength)


def _delta(height: int, width: int, payload: int, strength: float) -> np.ndarray:
    """The (H, W) int16 luma offsets that carry `payload`, rounded: frame + round(d) == round(frame + d)."""
    chips, groups = _chips()
    pattern = strength * chips * _bits(payload)[groups]
    delta = _bilinear_matrix(height, GRID) @ pattern @ _bilinear_matrix(width, GRID).T
    delta = np.rint(delta).astype(np.int16)
    delta.flags.writeable = False
    return delta


@functools.lru_cache(maxsize=1)
def _chips() -> tuple[np.ndarray, np.ndarray]:
    """(GRID, GRID) chips of +-1 and the bit (0..31) each cell carries.

    Drawn from SHA-256 in counter mode rather than numpy's generators, whose streams may change between
    versions: a video marked today must stay detectable.
    """
    cells = GRID * GRID
    chips = np.unpackbits(_random_bytes(b"chips", cells // 8)).astype(np.float64) * 2 - 1
    order = np.argsort(_random_bytes(b"groups", 4 * cells).view("<u4"), kind="stable")
    groups = np.empty(cells, np.int64)
    groups[order] = np.arange(cells) % NUM_BITS
    return chips.reshape(GRID, GRID), groups.reshape(GRID, GRID)


def _random_bytes(label: bytes, n: int) -> np.ndarray:
    blocks = (hashlib.sha256(_KEY + b"/" + label + i.to_bytes(4, "little")).digest() for i in range(-(-n // 32)))
    return np.frombuffer(b"".join(blocks), np.uint8)[:n].copy()


def _bits(payload: int) -> np.ndarray:
    if not 0 <= payload < 1 << NUM_BITS:
        raise ValueError(f"payload must be a {NUM_BITS}-bit unsigned integer, not {payload}")
    return np.array([(payload >> k) & 1 for k in range(NUM_BITS)], np.float64) * 2 - 1


@functools.lru_cache(maxsize=16)
def _area_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix that resizes by averaging the input over each output cell (any ratio)."""
    scale = n_in / n_out
    start = np.arange(n_out)[:, None] * scale
    pixel = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(start + scale, pixel + 1) - np.maximum(start, pixel), 0, None)
    return (overlap / scale).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix of bilinear interpolation, pixel centres aligned (as in most resizers)."""
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    left = np.floor(x).astype(np.int64)
    right = np.minimum(left + 1, n_in - 1)
    weight = x - left
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.arange(n_out), left), 1 - weight)
    np.add.at(matrix, (np.arange(n_out), right), weight)
    return matrix
