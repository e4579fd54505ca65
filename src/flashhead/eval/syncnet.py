"""Sync-C / Sync-D: audio-visual synchronisation with SyncNet (Chung & Zisserman 2016).

This is the `syncnet_v2` model and the evaluation of the standard `syncnet_python` code that
talking-head papers report as Sync-C / Sync-D (Wav2Lip calls them LSE-C / LSE-D):

- video: 224x224 face crops (colour, BGR, 0..255, not normalised), 5-frame windows -> `forward_lip`;
- audio: 16 kHz mono at int16 scale -> 13 MFCCs (`python_speech_features.mfcc` defaults: 25 ms windows,
  10 ms hop, 26 filters, 512-point FFT, pre-emphasis 0.97, lifter 22, log energy as c0), 20 MFCC frames
  (= 5 video frames at 25 fps) per window -> `forward_aud`;
- for every video window i and offset k in -vshift..vshift, the L2 distance between the video feature i
  and the audio feature i + k (zero-padded outside the clip); averaged over i, this gives one mean distance
  per offset. Sync-D is the smallest mean distance, Sync-C = median - min of the mean distances, and the
  AV offset is vshift - argmin (positive: the video lags the audio).

`offset_search` is that last step alone; it is reused by a weight-free audio-visual pair (mouth opening
vs. audio log-energy, `energy_features`) that checks the search finds known shifts without SyncNet weights.

About the crop: the original SyncNet paper feeds grey mouth crops; the released `syncnet_v2` (what every
talking-head paper evaluates with) takes the whole colour face crop, cropped by `syncnet_python`'s
pipeline: S3FD box, median-smoothed (13 frames), padded by 40 %, resized to 224x224. We reproduce the
crop geometry with a MediaPipe face box in place of S3FD (see docs/evaluation.md for the difference).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flashhead.eval.weights import SYNCNET, MetricUnavailable, resolve_weights

log = logging.getLogger(__name__)

VSHIFT = 15  # syncnet_python's run_syncnet.py default: offsets -15..+15 frames
WINDOW = 5  # video frames per SyncNet window
MFCC_PER_FRAME = 4  # 100 MFCC frames/s over 25 video frames/s
CROP_SIZE = 224
CROP_SCALE = 0.4  # syncnet_python run_pipeline.py --crop_scale
SMOOTH = 13  # median filter length for the crop track (run_pipeline.py)
PAD_VALUE = 110  # grey that pads crops reaching outside the frame (run_pipeline.py)


# ----------------------------------------------------------------------------------------------------------
# The network. Layer order (hence the state-dict indices) is that of syncnet_python's `S`, so the public
# `syncnet_v2.model` state dict loads unchanged.


def _conv_stack(kind: str, spec: list[tuple]) -> nn.Sequential:
    """Build conv -> BN -> ReLU [-> max-pool] groups; spec rows: (cin, cout, kernel, stride, pad, pool|None)."""
    conv, bn, pool = {"2d": (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d), "3d": (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d)}[
        kind
    ]
    layers: list[nn.Module] = []
    for cin, cout, kernel, stride, pad, pool_args in spec:
        layers += [conv(cin, cout, kernel_size=kernel, stride=stride, padding=pad), bn(cout), nn.ReLU(inplace=True)]
        if pool_args is not None:
            layers.append(pool(**pool_args))
    return nn.Sequential(*layers)


def _fc_head(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, dim))


class SyncNet(nn.Module):
    """The `syncnet_v2` audio and lip towers; each maps one 0.2 s window to a `dim`-d embedding."""

    def __init__(self, dim: int = 1024) -> None:
        super().__init__()
        # audio: (B, 1, 13, 20) MFCC window -> (B, 512, 1, 1)
        self.netcnnaud = _conv_stack(
            "2d",
            [
                (1, 64, 3, 1, 1, dict(kernel_size=1, stride=1)),
                (64, 192, 3, 1, 1, dict(kernel_size=3, stride=(1, 2))),
                (192, 384, 3, 1, 1, None),
                (384, 256, 3, 1, 1, None),
                (256, 256, 3, 1, 1, dict(kernel_size=3, stride=2)),
                (256, 512, (5, 4), 1, 0, None),
            ],
        )
        # lips: (B, 3, 5, 224, 224) BGR window -> (B, 512, 1, 1, 1)
        self.netcnnlip = _conv_stack(
            "3d",
            [
                (3, 96, (5, 7, 7), (1, 2, 2), 0, dict(kernel_size=(1, 3, 3), stride=(1, 2, 2))),
                (
                    96,
                    256,
                    (1, 5, 5),
                    (1, 2, 2),
                    (0, 1, 1),
                    dict(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
                ),
                (256, 256, (1, 3, 3), 1, (0, 1, 1), None),
                (256, 256, (1, 3, 3), 1, (0, 1, 1), None),
                (256, 256, (1, 3, 3), 1, (0, 1, 1), dict(kernel_size=(1, 3, 3), stride=(1, 2, 2))),
                (256, 512, (1, 6, 6), 1, 0, None),
            ],
        )
        self.netfcaud = _fc_head(dim)
        self.netfclip = _fc_head(dim)

    def forward_aud(self, mfcc: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))  # B, dim

    def forward_lip(self, video: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(video).flatten(1))  # B, dim


def load_syncnet(path: str | Path | None = None) -> SyncNet:
    """SyncNet with the public `syncnet_v2.model` weights (found as `flashhead.eval.weights` describes).

    Raises:
        MetricUnavailable: no weights, or a file whose tensors do not match the architecture.
    """
    file = resolve_weights(SYNCNET, path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MetricUnavailable(f"cannot read SyncNet weights {file}: {e}") from None
    if not isinstance(state, dict):
        raise MetricUnavailable(f"{file} holds a {type(state).__name__}, not a state dict")
    model = SyncNet()
    own = model.state_dict()
    state = {k.removeprefix("__S__."): v for k, v in state.items()}
    needed = [k for k in own if not k.endswith("num_batches_tracked")]
    missing = [k for k in needed if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise MetricUnavailable(f"{file}: not syncnet_v2 weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k in needed:
        if state[k].shape != own[k].shape:
            raise MetricUnavailable(f"{file}: {k} has shape {tuple(state[k].shape)}, expected {tuple(own[k].shape)}")
    model.load_state_dict({k: state[k] for k in needed}, strict=False)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# The offset search (syncnet_python's calc_pdist + evaluate), independent of where the features come from.


@dataclass
class SyncResult:
    """Outcome of the offset search over -vshift..vshift frames."""

    offset: int  # vshift - argmin; positive: the video lags the audio by that many frames
    min_dist: float  # Sync-D (lower is better)
    confidence: float  # Sync-C = median - min of the mean distances (higher is better)
    mean_dists: np.ndarray  # (2 * vshift + 1,) mean distance per candidate offset, index j <-> shift j - vshift
    vshift: int = VSHIFT
    n_windows: int = 0
    extra: dict = field(default_factory=dict)


def pairwise_offset_distances(video_feats: np.ndarray, audio_feats: np.ndarray, vshift: int = VSHIFT) -> np.ndarray:
    """dists[i, j] = ||video_feats[i] - audio_feats[i + j - vshift]||, with zero vectors outside the audio."""
    v = torch.as_tensor(np.asarray(video_feats), dtype=torch.float32)
    a = torch.as_tensor(np.asarray(audio_feats), dtype=torch.float32)
    if v.ndim != 2 or a.shape != v.shape:
        raise ValueError(f"video and audio features must both be (N, D), got {tuple(v.shape)} and {tuple(a.shape)}")
    padded = torch.nn.functional.pad(a, (0, 0, vshift, vshift))  # N + 2 vshift, D
    windows = padded.unfold(0, 2 * vshift + 1, 1).permute(0, 2, 1)  # N, 2 vshift + 1, D
    # torch's pairwise_distance adds eps=1e-6 to the difference, as syncnet_python's call does
    return torch.nn.functional.pairwise_distance(v[:, None, :].expand_as(windows), windows).numpy()


def offset_from_distances(dists: np.ndarray, vshift: int = VSHIFT) -> SyncResult:
    """Offset, Sync-D and Sync-C from a distance matrix (N windows, 2 vshift + 1 offsets)."""
    dists = np.asarray(dists, dtype=np.float64)
    if dists.ndim != 2 or dists.shape[1] != 2 * vshift + 1:
        raise ValueError(f"dists must be (N, {2 * vshift + 1}), got {dists.shape}")
    mean = dists.mean(axis=0)
    best = int(np.argmin(mean))
    # torch.median (as syncnet_python uses) returns the lower of the two middle values; with 2 vshift + 1
    # (odd) entries it is the ordinary median.
    median = float(np.sort(mean)[(len(mean) - 1) // 2])
    return SyncResult(
        offset=vshift - best,
        min_dist=float(mean[best]),
        confidence=median - float(mean[best]),
        mean_dists=mean,
        vshift=vshift,
        n_windows=dists.shape[0],
    )


def offset_search(video_feats: np.ndarray, audio_feats: np.ndarray, vshift: int = VSHIFT) -> SyncResult:
    """The full syncnet_python offset search on per-window features (N, D) of the video and the audio."""
    return offset_from_distances(pairwise_offset_distances(video_feats, audio_feats, vshift), vshift)


# ----------------------------------------------------------------------------------------------------------
# Inputs: MFCC windows and face crops.


def mfcc(audio_16k: np.ndarray) -> np.ndarray:
    """13 MFCCs per 10 ms (T_mfcc, 13) of 16 kHz float audio in [-1, 1], at the int16 scale syncnet_python feeds."""
    try:
        import python_speech_features
    except ImportError:
        raise MetricUnavailable("Sync-C/D need python_speech_features (pip install 'flashhead[eval]')") from None
    # syncnet_python reads 16-bit PCM written by ffmpeg; quantise the same way so c0 (log energy) matches.
    pcm = np.clip(np.round(np.asarray(audio_16k, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int16)
    return python_speech_features.mfcc(pcm, 16000)


def face_track_crops(frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """syncnet_python's crop: median-smoothed box centre/size, 40 % padding, 224x224 BGR crops (T, 224, 224, 3).

    Args:
        frames: (T, H, W, 3) uint8 RGB.
        boxes: (T, 4) face boxes x0, y0, x1, y1 in pixels (no missing entries; interpolate first).
    """
    import cv2
    from scipy.signal import medfilt

    boxes = np.asarray(boxes, dtype=np.float64)
    kernel = min(SMOOTH, len(boxes) if len(boxes) % 2 else len(boxes) - 1)
    half = medfilt(np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2, kernel)
    cy = medfilt((boxes[:, 1] + boxes[:, 3]) / 2, kernel)
    cx = medfilt((boxes[:, 0] + boxes[:, 2]) / 2, kernel)
    crops = np.empty((len(frames), CROP_SIZE, CROP_SIZE, 3), np.uint8)
    for t, frame in enumerate(frames):
        bs = half[t]
        pad = int(bs * (1 + 2 * CROP_SCALE))
        padded = np.pad(frame[..., ::-1], ((pad, pad), (pad, pad), (0, 0)), constant_values=PAD_VALUE)
        my, mx = cy[t] + pad, cx[t] + pad
        # rows: from bs above the centre to 1.8 bs below it; columns: 1.4 bs either side (a square)
        face = padded[
            int(my - bs) : int(my + bs * (1 + 2 * CROP_SCALE)),
            int(mx - bs * (1 + CROP_SCALE)) : int(mx + bs * (1 + CROP_SCALE)),
        ]
        crops[t] = cv2.resize(face, (CROP_SIZE, CROP_SIZE))
    return crops


@torch.no_grad()
def syncnet_features(
    model: SyncNet, crops_bgr: np.ndarray, audio_16k: np.ndarray, batch_size: int = 20, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Per-window lip and audio embeddings (N, 1024) each, N = min(frames, audio / 640 samples) - 5."""
    cc = torch.from_numpy(mfcc(audio_16k).T.astype(np.float32))[None]  # 1, 13, T_mfcc
    n = min(len(crops_bgr), len(audio_16k) // 640) - WINDOW
    if n < 1:
        raise ValueError(f"clip too short for SyncNet: {len(crops_bgr)} frames")
    video = torch.from_numpy(np.ascontiguousarray(crops_bgr)).permute(3, 0, 1, 2).float()  # 3, T, 224, 224
    model = model.to(device)
    lip, aud = [], []
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        v = torch.stack([video[:, i : i + WINDOW] for i in idx]).to(device)  # B, 3, 5, 224, 224
        a = torch.stack([cc[:, :, i * MFCC_PER_FRAME : i * MFCC_PER_FRAME + 20] for i in idx]).to(
            device
        )  # B, 1, 13, 20
        lip.append(model.forward_lip(v).cpu())
        aud.append(model.forward_aud(a).cpu())
    return torch.cat(lip).numpy(), torch.cat(aud).numpy()


def sync_scores(
    model: SyncNet,
    frames: np.ndarray,
    audio_16k: np.ndarray,
    boxes: np.ndarray,
    vshift: int = VSHIFT,
    device: str = "cpu",
) -> SyncResult:
    """Sync-C / Sync-D / offset of one clip: face crops from `boxes`, SyncNet features, offset search."""
    crops = face_track_crops(frames, boxes)
    lip, aud = syncnet_features(model, crops, audio_16k, device=device)
    return offset_search(lip, aud, vshift)


# ----------------------------------------------------------------------------------------------------------
# A weight-free audio-visual pair for the same offset search.


_ORIGIN_OFFSET = 1.0  # in standard deviations


def _zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-8)


def audio_log_energy(audio_16k: np.ndarray, n_frames: int, fps: float = 25.0, rate: int = 16000) -> np.ndarray:
    """Log RMS energy of the audio under each video frame, (n_frames,)."""
    hop = rate / fps
    out = np.full(n_frames, np.log(1e-3))
    for i in range(n_frames):
        chunk = audio_16k[int(round(i * hop)) : int(round((i + 1) * hop))]
        if len(chunk):
            out[i] = np.log(np.sqrt(np.mean(np.square(chunk, dtype=np.float64))) + 1e-3)
    return out


def energy_features(
    mouth_opening: np.ndarray, audio_energy: np.ndarray, window: int = WINDOW
) -> tuple[np.ndarray, np.ndarray]:
    """Window features for `offset_search` from two per-frame signals: z-scored, `window` frames per row.

    Speech is loud while the mouth is open, so the two z-scored signals line up at the true offset. Rows
    are taken like SyncNet's windows (frame i..i+window-1) so the search sees the same geometry. Both are
    moved away from the origin by the same constant: distances between real windows do not change, while
    the zero vectors that pad the audio beyond the clip become far from everything — as they are for
    SyncNet embeddings — instead of sitting at the mean and attracting the search to the extreme offsets.
    """
    v = _zscore(np.asarray(mouth_opening, np.float64)) + _ORIGIN_OFFSET
    a = _zscore(np.asarray(audio_energy, np.float64)) + _ORIGIN_OFFSET
    n = min(len(v), len(a)) - window
    if n < 1:
        raise ValueError("clip too short for an energy offset search")
    idx = np.arange(n)[:, None] + np.arange(window)[None]
    return v[idx], a[idx]
