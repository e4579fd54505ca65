"""Stage-1 training samples, cut from clip shards exactly as inference will see a chunk (SPEC 16.2).

One sample from one clip (all random choices come from `numpy.random.default_rng([seed, epoch, index])`,
so a sample depends only on its position in the stream, never on the worker or process that builds it):

    window   frame_num (33) consecutive frames at 25 fps, resized and centre-cropped to the training size
    motion   n_motion = 2 latent frames with p = 0.9, 1 (cold start) with p = 0.1 [PAPER]
    ref      a random frame of the clip outside the window (the window's first frame when there is none);
             cold-start samples use the window's first frame, so their single motion latent is the
             reference's own first latent frame, exactly as on a stream's first chunk
    audio    the 8 s of 16 kHz audio ending at the window's last frame, zero-padded on the left: the
             buffer the Temporal Audio Context Cache holds when that frame is the end of a chunk
    face     the mouth box of each window frame (clip extras / metadata, else a fixed central-lower
             region) as a soft mask on the latent grid, for the face loss
    seed     for the diffusion noise, the noise level and the VAE posterior sample

The data workers do the cheap part (decode, crop, cut audio) and hand over raw samples; the training
process runs the frozen VAE and wav2vec on its device (`encode_samples`), reusing `AudioContextCache` for
the windowing so that a training context is the inference context, bit for bit.

Precomputed clip extras are used when present (written by `precompute_extras`):
    window_starts (W,) int           first frames of precomputed windows (the sampler then picks among them)
    latents (W, C, F, h, w)          VAE latents of those windows at the training size
    audio_features (W, 33 + 2, L, D) the last frame_num + window // 2 encoder frames of each window's buffer
    ref_frames (R,), ref_latents (R, C, F, h, w)  latents of static clips of those frames
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from flashhead.data.shards import Clip, decode_mp4, read_clip_at, read_manifest
from flashhead.errors import ConfigError
from flashhead.models.audio import AudioConfig, AudioContextCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleSpec:
    """The geometry and the random choices of a Stage-1 sample."""

    height: int
    width: int
    vae_stride: tuple[int, int, int]  # (t, h, w) of the VAE
    frame_num: int = 33
    fps: int = 25
    sample_rate: int = 16000
    cache_seconds: int = 8
    audio_window: int = 5
    motion_latent_frames: int = 2
    motion_probs: tuple[float, float] = (0.9, 0.1)  # P(motion_latent_frames), P(1)
    audio_drop_prob: float = 0.1
    reference: str = "outside"  # or "window_first"
    face_margin: float = 0.25
    default_face_box: tuple[float, float, float, float] = (0.3, 0.55, 0.7, 0.85)

    def __post_init__(self) -> None:
        st, sh, sw = self.vae_stride
        if (self.frame_num - 1) % st:
            raise ConfigError(f"frame_num={self.frame_num} must be 1 + k * {st} for the VAE's temporal stride")
        if self.height % sh or self.width % sw:
            raise ConfigError(f"training size {self.height}x{self.width} must be a multiple of the VAE stride")
        if self.motion_latent_frames >= self.latent_frames:
            raise ConfigError(f"motion_latent_frames={self.motion_latent_frames} leaves no frame to generate")

    @property
    def latent_frames(self) -> int:
        return 1 + (self.frame_num - 1) // self.vae_stride[0]

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // self.vae_stride[1], self.width // self.vae_stride[2]

    @property
    def motion_frames(self) -> int:
        """Pixel frames behind the motion latents (Lite 9, Pro 5)."""
        return (self.motion_latent_frames - 1) * self.vae_stride[0] + 1

    def audio_config(self) -> AudioConfig:
        return AudioConfig(self.sample_rate, self.fps, self.frame_num, self.audio_window, self.cache_seconds)

    def context_cache(self, encoder: Any) -> AudioContextCache:
        """The inference cache whose windowing every training context goes through."""
        return AudioContextCache(encoder, self.frame_num - self.motion_frames, self.audio_config())


# ---------------------------------------------------------------------------------------------------
# Clips


@dataclass(frozen=True)
class ClipRef:
    """Where one clip lives: a shard file and the byte offset of its first member."""

    shard: str
    offset: int
    key: str
    num_frames: int
    source: str = ""  # the manifest's source column (for data.source_weights)


def index_clips(roots: Sequence[str | Path], split: str | None, spec: SampleSpec) -> list[ClipRef]:
    """The usable clips of some shard folders (manifest order): right split, right fps, long enough."""
    clips: list[ClipRef] = []
    for root in roots:
        df = read_manifest(root)
        if split is not None:
            df = df[df["split"] == split]
        too_short = df["num_frames"] < spec.frame_num
        wrong_fps = (df["fps"] - spec.fps).abs() > 1e-6
        if too_short.any() or wrong_fps.any():
            logger.warning(
                "%s: skipping %d clips shorter than %d frames and %d not at %d fps",
                root, int(too_short.sum()), spec.frame_num, int(wrong_fps.sum()), spec.fps,
            )  # fmt: skip
        for row in df[~too_short & ~wrong_fps].itertuples():
            shard, source = str(Path(root) / row.shard), str(getattr(row, "source", ""))
            clips.append(ClipRef(shard, int(row.offset), row.key, int(row.num_frames), source))
    return clips


def read_clip(ref: ClipRef) -> Clip:
    """Read one clip without decoding its video (frames are decoded on demand)."""
    return read_clip_at(ref.shard, ref.offset, decode=False)


def decode_frames(clip: Clip, indices: Sequence[int]) -> np.ndarray:
    """Frames at `indices` as (len, H, W, 3) uint8, in one decoding pass that stops at the last one needed."""
    if clip.frames is not None:
        return clip.frames[list(indices)]
    first, last = min(indices), max(indices)
    frames = decode_mp4(clip.video, first, last - first + 1)
    if len(frames) != last - first + 1:
        raise ConfigError(f"clip {clip.key}: video has fewer frames than its metadata says")
    return frames[[i - first for i in indices]]


# ---------------------------------------------------------------------------------------------------
# Geometry: resize + centre crop, mouth boxes, latent-grid masks


def crop_transform(src_h: int, src_w: int, height: int, width: int) -> tuple[float, int, int, int, int]:
    """Resize-to-cover then centre-crop: (scale, resized_h, resized_w, top, left)."""
    scale = max(height / src_h, width / src_w)
    rh, rw = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    return scale, rh, rw, (rh - height) // 2, (rw - width) // 2


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, height, width, 3) uint8: scale to cover (antialiased bilinear), crop the centre."""
    x = torch.from_numpy(np.ascontiguousarray(frames))
    if x.shape[1:3] == (height, width):
        return x
    _, rh, rw, top, left = crop_transform(x.shape[1], x.shape[2], height, width)
    x = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(rh, rw), mode="bilinear", antialias=True)
    x = x[:, :, top : top + height, left : left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def mouth_boxes(clip: Clip, frames: Sequence[int], spec: SampleSpec) -> np.ndarray:
    """(len(frames), 4) mouth boxes x0, y0, x1, y1 in training-frame pixels, enlarged by `face_margin`.

    Sources, first found: extras["mouth_box"] (T, 4), meta["mouth_box"] (4 or T x 4), meta["face_box"]
    (same), all in source pixels; else `default_face_box` (fractions of the training frame).
    """
    boxes = clip.extras.get("mouth_box")
    if boxes is None:
        boxes = clip.meta.get("mouth_box", clip.meta.get("face_box"))
    if boxes is None:
        x0, y0, x1, y1 = spec.default_face_box
        box = [x0 * spec.width, y0 * spec.height, x1 * spec.width, y1 * spec.height]
        return np.tile(np.array(box, np.float32), (len(frames), 1))
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    boxes = boxes[np.asarray(frames)] if len(boxes) > 1 else np.repeat(boxes, len(frames), 0)
    if clip.frames is not None:
        src_h, src_w = clip.frames.shape[1:3]
    else:
        src_h, src_w = int(clip.meta["height"]), int(clip.meta["width"])
    scale, _, _, top, left = crop_transform(src_h, src_w, spec.height, spec.width)
    boxes = boxes * scale - np.array([left, top, left, top], np.float32)
    grow = (boxes[:, 2:] - boxes[:, :2]) * spec.face_margin
    boxes = np.concatenate([boxes[:, :2] - grow, boxes[:, 2:] + grow], axis=1)
    return np.clip(boxes, 0, [spec.width, spec.height, spec.width, spec.height]).astype(np.float32)


def latent_box_mask(boxes: np.ndarray, spec: SampleSpec) -> torch.Tensor:
    """Soft mask (F, h, w) on the latent grid: the fraction of each latent cell inside the union of the
    boxes of the pixel frames that latent frame encodes (frame 0 alone, then groups of stride_t frames)."""
    st, sh, sw = spec.vae_stride
    h, w = spec.latent_size
    masks = []
    for j in range(spec.latent_frames):
        group = boxes[:1] if j == 0 else boxes[1 + (j - 1) * st : 1 + j * st]
        x0, y0 = group[:, 0].min(), group[:, 1].min()
        x1, y1 = group[:, 2].max(), group[:, 3].max()
        cells_y, cells_x = np.arange(h) * sh, np.arange(w) * sw
        cover_y = np.clip(np.minimum(y1, cells_y + sh) - np.maximum(y0, cells_y), 0, None) / sh
        cover_x = np.clip(np.minimum(x1, cells_x + sw) - np.maximum(x0, cells_x), 0, None) / sw
        masks.append(np.outer(cover_y, cover_x))
    return torch.from_numpy(np.stack(masks).astype(np.float32))


def audio_buffer(audio: np.ndarray, window_end: int, spec: SampleSpec) -> torch.Tensor:
    """The cache_seconds of audio ending where video frame `window_end - 1` ends, zero-padded on the left
    (and on the right, if the clip's audio stops early): what the streaming FIFO holds at that frame."""
    n = spec.cache_seconds * spec.sample_rate
    end = window_end * (spec.sample_rate // spec.fps)
    start = end - n
    piece = np.asarray(audio, np.float32)[max(start, 0) : end]
    buffer = np.zeros(n, np.float32)
    buffer[max(-start, 0) : max(-start, 0) + len(piece)] = piece
    return torch.from_numpy(buffer)


# ---------------------------------------------------------------------------------------------------
# One sample


@dataclass(frozen=True)
class SampleChoice:
    window_start: int
    ref_frame: int
    n_motion: int
    drop_audio: bool
    seed: int
    window_slot: int | None = None  # index into precomputed windows
    ref_slot: int | None = None  # index into precomputed reference latents


def choose_sample(
    rng: np.random.Generator,
    num_frames: int,
    spec: SampleSpec,
    window_starts: Sequence[int] | None = None,
    ref_frames: Sequence[int] | None = None,
) -> SampleChoice:
    """All random decisions of one sample (the draws always happen in the same order)."""
    n_motion = spec.motion_latent_frames if rng.random() < spec.motion_probs[0] else 1
    drop_audio = bool(rng.random() < spec.audio_drop_prob)
    if window_starts is not None and len(window_starts):
        window_slot = int(rng.integers(len(window_starts)))
        start = int(window_starts[window_slot])
    else:
        window_slot, start = None, int(rng.integers(0, num_frames - spec.frame_num + 1))
    outside = np.concatenate([np.arange(0, start), np.arange(start + spec.frame_num, num_frames)])
    pick = rng.random()  # drawn even when unused, to keep the order of later draws fixed
    seed = int(rng.integers(2**62))
    ref_frame, ref_slot = start, None
    if n_motion > 1 and spec.reference == "outside" and len(outside):
        precomputed = [i for i, f in enumerate(ref_frames or []) if f < start or f >= start + spec.frame_num]
        if precomputed:
            ref_slot = precomputed[int(pick * len(precomputed))]
            ref_frame = int(ref_frames[ref_slot])
        else:
            ref_frame = int(outside[int(pick * len(outside))])
    elif ref_frames is not None and start in list(ref_frames):
        ref_slot = list(ref_frames).index(start)
    return SampleChoice(start, ref_frame, n_motion, drop_audio, seed, window_slot, ref_slot)


def build_sample(clip: Clip, choice: SampleChoice, spec: SampleSpec) -> dict[str, Any]:
    """The raw sample of `choice` (pixels and audio, or the clip's precomputed arrays where they exist)."""
    if clip.sample_rate != spec.sample_rate:
        raise ConfigError(f"clip {clip.key}: audio at {clip.sample_rate} Hz, training needs {spec.sample_rate}")
    s, ex = choice.window_start, clip.extras
    window = list(range(s, s + spec.frame_num))
    sample: dict[str, Any] = {
        "key": clip.key,
        "window_start": s,
        "ref_frame": choice.ref_frame,
        "n_motion": choice.n_motion,
        "drop_audio": choice.drop_audio,
        "seed": choice.seed,
        "face_mask": latent_box_mask(mouth_boxes(clip, window, spec), spec),
    }
    _check_precomputed(clip, spec)
    need = []
    if choice.window_slot is not None and "latents" in ex:
        sample["latents"] = torch.from_numpy(np.asarray(ex["latents"][choice.window_slot], np.float32))
    else:
        need += window
    if choice.ref_slot is not None and "ref_latents" in ex:
        sample["ref_latents"] = torch.from_numpy(np.asarray(ex["ref_latents"][choice.ref_slot], np.float32))
    elif choice.ref_frame not in need:
        need.append(choice.ref_frame)
    if need:
        frames = resize_center_crop(decode_frames(clip, need), spec.height, spec.width)
        if "latents" not in sample:
            sample["video"] = frames[: spec.frame_num]
        if "ref_latents" not in sample:
            sample["reference"] = frames[need.index(choice.ref_frame)]
    if choice.window_slot is not None and "audio_features" in ex:
        sample["audio_features"] = torch.from_numpy(np.asarray(ex["audio_features"][choice.window_slot], np.float32))
    else:
        sample["audio"] = audio_buffer(clip.audio, s + spec.frame_num, spec)
    return sample


def _check_precomputed(clip: Clip, spec: SampleSpec) -> None:
    ex = clip.extras
    if "window_starts" not in ex:
        return  # other extras of these names (without windows) are not ours and are ignored
    grid = (spec.latent_frames, *spec.latent_size)
    for name in ("latents", "ref_latents"):
        if name in ex and tuple(ex[name].shape[-3:]) != grid:
            raise ConfigError(f"clip {clip.key}: extras[{name!r}] {ex[name].shape} do not fit the latent grid {grid}")
    frames = spec.frame_num + spec.audio_window // 2
    if "audio_features" in ex and ex["audio_features"].shape[1] != frames:
        raise ConfigError(f"clip {clip.key}: extras['audio_features'] must hold {frames} frames per window")


# ---------------------------------------------------------------------------------------------------
# The stream of samples


class Stage1Dataset(IterableDataset):
    """An endless, deterministic stream of micro-batches (lists of raw samples) for one process.

    The global sample stream is position p = 0, 1, 2, ...: epoch p // M, index p % M with M = clips x
    windows_per_clip; each epoch visits the clips in its own permutation. Micro-step m takes positions
    [m G, (m + 1) G) with G = micro_batch_size x world_size; process `rank` takes its contiguous block of
    micro_batch_size of them, and DataLoader worker w of n builds micro-steps m = start + w, start + w + n,
    ... (the loader returns them round-robin, i.e. in order). The content of a micro-batch therefore depends
    on nothing but (seed, m, rank): one process with batch G sees exactly the samples of G / B processes,
    and `start_position` resumes the stream exactly.

    `source_weights` {source: share} draws each epoch's M clips at random (with replacement) so that each
    source (the manifest's `source` column) gets its share of the samples, whatever its number of clips.
    """

    def __init__(
        self,
        clips: Sequence[ClipRef],
        spec: SampleSpec,
        *,
        seed: int = 0,
        micro_batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        start_position: int = 0,
        windows_per_clip: int = 1,
        source_weights: dict[str, float] | None = None,
    ):
        if not clips:
            raise ConfigError("no usable clips: check data.roots, the split and the clip lengths")
        self.clips, self.spec, self.seed = list(clips), spec, seed
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.samples_per_step = micro_batch_size * world_size
        if start_position % self.samples_per_step:
            raise ConfigError(
                f"cannot resume at sample {start_position}: not a multiple of {self.samples_per_step} "
                "(micro batch x processes changed since the checkpoint?)"
            )
        self.start_step = start_position // self.samples_per_step
        self.samples_per_epoch = len(self.clips) * windows_per_clip
        self.clip_probs = clip_probabilities(self.clips, source_weights) if source_weights else None
        self._cached_order: tuple[int, np.ndarray | None] = (-1, None)

    def position(self, p: int) -> tuple[int, int]:
        """(epoch, index) of stream position p."""
        return divmod(p, self.samples_per_epoch)

    def _order(self, epoch: int) -> np.ndarray:
        """Clip index of every position of `epoch` (its own permutation; the last epoch's is kept)."""
        if self._cached_order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            if self.clip_probs is None:
                order = rng.permutation(self.samples_per_epoch) % len(self.clips)
            else:
                order = rng.choice(len(self.clips), size=self.samples_per_epoch, p=self.clip_probs)
            self._cached_order = (epoch, order)
        return self._cached_order[1]

    def sample_at(self, p: int) -> dict[str, Any]:
        epoch, index = self.position(p)
        ref = self.clips[self._order(epoch)[index]]
        clip = read_clip(ref)
        rng = np.random.default_rng([self.seed, epoch, index])
        starts, refs = None, None
        if "window_starts" in clip.extras:  # our precomputed arrays (see the module docstring)
            starts = [int(v) for v in clip.extras["window_starts"]]
            refs = [int(v) for v in clip.extras.get("ref_frames", [])]
        choice = choose_sample(rng, ref.num_frames, self.spec, starts, refs)
        return build_sample(clip, choice, self.spec) | {"epoch": epoch, "index": index, "position": p}

    def micro_batch(self, step: int) -> list[dict[str, Any]]:
        first = step * self.samples_per_step + self.rank * self.micro_batch_size
        return [self.sample_at(first + b) for b in range(self.micro_batch_size)]

    def loader_batch(self, step: int) -> Any:
        """What the DataLoader hands the trainer for micro-step `step`: here the raw samples, which the
        trainer encodes on its device (`encode_samples`)."""
        return self.micro_batch(step)

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for step in itertools.count(self.start_step + worker, workers):
            yield self.loader_batch(step)


def clip_probabilities(clips: Sequence[ClipRef], source_weights: dict[str, float]) -> np.ndarray:
    """Per-clip sampling probability: each source's weight (normalised) split evenly over its clips. The key
    "*" weighs all sources not named together (e.g. curated clips, whose source is their file name)."""
    groups = [c.source if c.source in source_weights else "*" for c in clips]
    if "*" in groups and "*" not in source_weights:
        missing = sorted({c.source for c, g in zip(clips, groups, strict=True) if g == "*"})
        raise ConfigError(f"data.source_weights has no weight for source(s) {missing} (add them or a '*' weight)")
    present = sorted(set(groups))
    if any(w < 0 for w in source_weights.values()) or sum(source_weights[g] for g in present) <= 0:
        raise ConfigError(f"data.source_weights must be >= 0 with a positive sum over {present}")
    counts = {g: groups.count(g) for g in present}
    probs = np.array([source_weights[g] / counts[g] for g in groups], np.float64)
    return probs / probs.sum()


# ---------------------------------------------------------------------------------------------------
# Raw samples -> model inputs (runs in the training process, on its device)


@dataclass
class Stage1Inputs:
    """A micro-batch ready for the DiT: clean latents, reference latents, audio context and the rest."""

    x0: torch.Tensor  # (B, C, F, h, w) float32
    y: torch.Tensor  # (B, C, F, h, w) float32: the reference repeated frame_num times, encoded
    context: torch.Tensor  # (B, frame_num, window, layers, hidden) float32 (zeros where audio is dropped)
    n_motion: torch.Tensor  # (B,) int64
    face_mask: torch.Tensor  # (B, F, h, w) float32
    seeds: list[int]
    sigma: torch.Tensor | None = None  # (B,) and
    noise: torch.Tensor | None = None  # like x0: drawn from `seeds` ahead (data workers), else by the trainer

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def to(self, device: torch.device) -> Stage1Inputs:
        """On `device`; from pinned memory the copies are asynchronous (the host does not wait for them)."""
        moved = {k: v.to(device, non_blocking=v.is_pinned()) for k, v in self.tensors().items()}
        return replace(self, **moved)

    def pin_memory(self) -> Stage1Inputs:  # called by the DataLoader's pinning thread (pin_memory=True)
        return replace(self, **{k: v.pin_memory() for k, v in self.tensors().items()})


def _pixels(frames: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # (T, H, W, 3) uint8 -> (1, 3, T, H, W) in [-1, 1]
    return (frames.to(device).permute(3, 0, 1, 2)[None].to(dtype) / 127.5) - 1


def _vae_encode(vae: Any, video: torch.Tensor, seed: int) -> torch.Tensor:
    if getattr(vae, "sample_posterior", False):
        # LTX samples its posterior; the noise comes from the sample's own seed (CPU: same on any device).
        shape = (1, *vae.latent_shape(video.shape[2], video.shape[3], video.shape[4]))
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        return vae.encode(video, noise=noise.to(video))
    return vae.encode(video)


PRECOMPUTED = ("latents", "ref_latents", "audio_features")


def _precomputed_context(samples: Sequence[dict[str, Any]], cache: AudioContextCache) -> torch.Tensor:
    windows = [cache.context(s["audio_features"]) for s in samples]
    return torch.cat([torch.zeros_like(w) if s["drop_audio"] else w for w, s in zip(windows, samples, strict=True)])


def stack_precomputed(samples: Sequence[dict[str, Any]], spec: SampleSpec) -> Stage1Inputs:
    """The inputs of fully precomputed samples (a latent cache's) on the CPU: stacked, the audio windowed as
    `AudioContextCache.context` does at inference, zeros where the audio is dropped. Cheap enough for a data
    worker, which then hands the trainer one tensor per field instead of a few per sample."""
    return Stage1Inputs(
        x0=torch.stack([s["latents"] for s in samples]).float(),
        y=torch.stack([s["ref_latents"] for s in samples]).float(),
        context=_precomputed_context(samples, spec.context_cache(None)).float(),  # windowing needs no encoder
        n_motion=torch.tensor([s["n_motion"] for s in samples]),
        face_mask=torch.stack([s["face_mask"] for s in samples]),
        seeds=[s["seed"] for s in samples],
    )


@torch.no_grad()
def encode_samples(samples: Sequence[dict[str, Any]], vae: Any, audio_encoder: Any, spec: SampleSpec) -> Stage1Inputs:
    """Run the frozen VAE and audio encoder over raw samples (one at a time, as inference does).

    The audio context is `AudioContextCache.context(encoder(buffer))`: the same encoder call on the same
    8-s buffer and the same windowing as a streaming chunk, so it equals the inference context exactly.
    """
    device, dtype = vae.device, vae.dtype
    cache = spec.context_cache(audio_encoder)
    x0, y, context = [], [], []
    if not getattr(vae, "sample_posterior", False) and all("video" in s and "reference" in s for s in samples):
        # A deterministic encoder: one batched call per kind instead of one per sample (same latents).
        x0.append(vae.encode(torch.cat([_pixels(s["video"], device, dtype) for s in samples])))
        stills = [s["reference"][None].expand(spec.frame_num, -1, -1, -1) for s in samples]
        y.append(vae.encode(torch.cat([_pixels(still, device, dtype) for still in stills])))
    elif all(k in s for s in samples for k in PRECOMPUTED):  # a latent cache's samples: stacked on the host
        return stack_precomputed(samples, spec).to(device)
    elif all("latents" in s and "ref_latents" in s for s in samples):
        # Precomputed latents: one stacked host-to-device copy per kind instead of one per sample.
        x0.append(torch.stack([s["latents"] for s in samples]).to(device))
        y.append(torch.stack([s["ref_latents"] for s in samples]).to(device))
    for s in samples if not x0 else ():
        if "latents" in s:
            x0.append(s["latents"][None].to(device))
        else:
            x0.append(_vae_encode(vae, _pixels(s["video"], device, dtype), s["seed"] + 1))
        if "ref_latents" in s:
            y.append(s["ref_latents"][None].to(device))
        else:
            still = s["reference"][None].expand(spec.frame_num, -1, -1, -1)
            y.append(_vae_encode(vae, _pixels(still, device, dtype), s["seed"] + 2))
    if all("audio_features" in s for s in samples):  # precomputed: window on the host, then one copy
        context.append(_precomputed_context(samples, cache).to(device))
        samples_to_encode: Sequence[dict[str, Any]] = ()
    else:
        samples_to_encode = samples
    if all("audio" in s for s in samples):  # one encoder call for the batch (rows are encoded independently)
        batch_features = list(audio_encoder(torch.stack([s["audio"] for s in samples])))
    for i, s in enumerate(samples_to_encode):
        if "audio_features" in s:
            features = s["audio_features"]
        else:
            features = batch_features[i] if all("audio" in s for s in samples) else audio_encoder(s["audio"])
        ctx = cache.context(features.to(device))  # (1, frame_num, window, layers, hidden)
        context.append(torch.zeros_like(ctx) if s["drop_audio"] else ctx)
    return Stage1Inputs(
        x0=torch.cat(x0).float(),
        y=torch.cat(y).float(),
        context=torch.cat(context).float(),
        n_motion=torch.tensor([s["n_motion"] for s in samples], device=device),
        face_mask=torch.stack([s["face_mask"] for s in samples]).to(device),
        seeds=[s["seed"] for s in samples],
    )


@torch.no_grad()
def precompute_extras(
    clip: Clip,
    vae: Any,
    audio_encoder: Any,
    spec: SampleSpec,
    window_starts: Sequence[int],
    ref_frames: Sequence[int] = (),
    *,
    seed: int = 0,
    dtype: np.dtype = np.float16,
) -> dict[str, np.ndarray]:
    """Arrays to store as clip extras so that training skips decoding and the frozen encoders.

    Latents of LTX (which samples its posterior) freeze one posterior sample per window (seeded by `seed`).
    `audio_features` keep the last frame_num + window // 2 encoder frames of each window's 8-s buffer,
    which is all the windowing reads. With `vae=None` only the audio features are made (no latents).
    """
    keep = spec.frame_num + spec.audio_window // 2
    latents, features, refs = [], [], []
    if vae is not None:
        frames_needed = sorted({f for s in window_starts for f in range(s, s + spec.frame_num)} | set(ref_frames))
        frames = resize_center_crop(decode_frames(clip, frames_needed), spec.height, spec.width)
        at = {f: i for i, f in enumerate(frames_needed)}
        device, vdtype = vae.device, vae.dtype
    for k, s in enumerate(window_starts):
        if vae is not None:
            window = frames[[at[f] for f in range(s, s + spec.frame_num)]]
            latents.append(_vae_encode(vae, _pixels(window, device, vdtype), seed + k)[0].float().cpu().numpy())
        buffer = audio_buffer(clip.audio, s + spec.frame_num, spec)
        features.append(audio_encoder(buffer)[-keep:].float().cpu().numpy())
    for k, f in enumerate(ref_frames if vae is not None else ()):
        still = frames[at[f]][None].expand(spec.frame_num, -1, -1, -1)
        refs.append(_vae_encode(vae, _pixels(still, device, vdtype), seed + 10_000 + k)[0].float().cpu().numpy())
    out = {"window_starts": np.asarray(window_starts, np.int64), "audio_features": np.stack(features).astype(dtype)}
    if latents:
        out["latents"] = np.stack(latents).astype(dtype)
    if refs:
        out |= {"ref_frames": np.asarray(ref_frames, np.int64), "ref_latents": np.stack(refs).astype(dtype)}
    return out
