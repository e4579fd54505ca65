"""Precomputed Stage-1 inputs: the frozen encoders run once per clip window instead of once per sample.

Stage 1 of flashhead-tiny spent its time outside the DiT: every sample's 33 frames and its reference were
decoded in the data workers and VAE-encoded on the fly (1.8 steps/s of batch 32 on an H200, where the DiT
step itself takes a few milliseconds). `build_latent_cache` encodes, batched and in float32, every window
start at a stride of the VAE's temporal stride and a reference at each of those frames, and stores

    cache.json          geometry, the encoders' fingerprint, and per clip: key, source, frames, window
                        starts, reference frames and where their rows begin in the arrays below
    latents.npy         (W, C, F, h, w) float16   VAE latents of the windows (posterior means, or one
                                                  posterior sample per window from a fixed seed)
    ref_latents.npy     (R, C, F, h, w) float16   latents of static clips of the reference frames
    audio_features.npy  (W, 33 + 2, L, D) float32 the last encoder frames of each window's 8-s buffer
    face_mask.npy       (W, F, h, w) float16      the mouth-box mask on the latent grid (the face loss)

The losses need no pixels: flow matching and the temporal term work on latents, the face term on the
latent mouth mask. `CachedStage1Dataset` draws samples from these arrays with the same random stream as
`Stage1Dataset` (`choose_sample` among the cached windows and references), so the trainer's loop,
resume and batching stay as they are.

Why a stride of temporal_stride (4) frames: windows then start on every latent-frame boundary of the
clip, so every latent frame is seen at every position of a chunk; shifts of 1-3 frames would mostly
repeat content at 4x the storage. References at the same frames cover the cold-start samples (whose
reference is the window's first frame) and leave many frames outside any window for the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm import tqdm

from flashhead.errors import ConfigError
from flashhead.train.data import (
    ClipRef,
    SampleSpec,
    Stage1Dataset,
    Stage1Inputs,
    _pixels,
    audio_buffer,
    choose_sample,
    decode_frames,
    index_clips,
    latent_box_mask,
    mouth_boxes,
    read_clip,
    resize_center_crop,
    stack_precomputed,
)
from flashhead.train.losses import NoiseSampling

logger = logging.getLogger(__name__)

INDEX = "cache.json"
FORMAT = 1


def window_plan(num_frames: int, spec: SampleSpec, stride: int) -> tuple[list[int], list[int]]:
    """(window starts, reference frames) cached for a clip of `num_frames` frames.

    Windows: 0, stride, 2 stride, ... and the last possible start. References: the same grid over the
    whole clip, every window start (a cold-start sample's reference) and the clip's last frame, so a window
    at either end still has a cached frame outside it.
    """
    last = num_frames - spec.frame_num
    if last < 0:
        return [], []
    starts = sorted(set(range(0, last + 1, stride)) | {last})
    refs = sorted(set(range(0, num_frames, stride)) | set(starts) | {num_frames - 1})
    return starts, refs


def encoder_fingerprint(vae: Any, audio_encoder: Any) -> str:
    """A hash of the frozen encoders' weights and types: a cache made with other encoders is refused."""
    digest = hashlib.sha256()
    for name, module in (("vae", vae), ("audio", audio_encoder)):
        digest.update(f"{name}:{type(module).__name__}:{getattr(module, 'sample_posterior', '')}".encode())
        state = module.state_dict() if hasattr(module, "state_dict") else {}
        for key in sorted(state):
            digest.update(key.encode())
            digest.update(state[key].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _geometry(spec: SampleSpec, channels: int) -> dict[str, Any]:
    return {
        "height": spec.height, "width": spec.width, "frame_num": spec.frame_num, "fps": spec.fps,
        "vae_stride": list(spec.vae_stride), "latent": [channels, spec.latent_frames, *spec.latent_size],
        "audio_frames": spec.frame_num + spec.audio_window // 2, "sample_rate": spec.sample_rate,
        "cache_seconds": spec.cache_seconds,
    }  # fmt: skip


def _posterior_noise(vae: Any, key: str, first: int, count: int, shape: tuple[int, ...]) -> torch.Tensor | None:
    # One fixed posterior sample per cached row (seeded by clip and row), the same on any device.
    if not getattr(vae, "sample_posterior", False):
        return None
    seeds = [zlib.crc32(key.encode()) * 100_003 + first + i for i in range(count)]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def _encode(vae: Any, videos: list[torch.Tensor], key: str, first: int, batch_size: int) -> np.ndarray:
    """VAE latents of (T, H, W, 3) uint8 clips, `batch_size` at a time, as float16 numpy."""
    out = []
    for i in range(0, len(videos), batch_size):
        batch = torch.cat([_pixels(v, vae.device, vae.dtype) for v in videos[i : i + batch_size]])
        noise = _posterior_noise(vae, key, first + i, len(batch), tuple(vae.latent_shape(*batch.shape[2:])))
        latent = vae.encode(batch) if noise is None else vae.encode(batch, noise=noise.to(batch))
        out.append(latent.float().cpu().numpy().astype(np.float16))
    return np.concatenate(out)


@torch.no_grad()
def build_latent_cache(
    roots: list[str],
    out: str | Path,
    vae: Any,
    audio_encoder: Any,
    spec: SampleSpec,
    *,
    split: str = "train",
    stride: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Path:
    """Encode every usable clip of `roots` (`split`) into a cache folder `out` (written whole, then renamed)."""
    out = Path(out)
    stride = stride or spec.vae_stride[0]
    clips = index_clips(roots, split, spec)
    if not clips:
        raise ConfigError(f"no usable {split!r} clips under {roots} to cache")
    plans = [window_plan(c.num_frames, spec, stride) for c in clips]
    n_windows, n_refs = sum(len(s) for s, _ in plans), sum(len(r) for _, r in plans)
    grid = (vae.latent_channels, spec.latent_frames, *spec.latent_size)
    keep = spec.frame_num + spec.audio_window // 2
    probe = audio_encoder(torch.zeros(spec.cache_seconds * spec.sample_rate))[-keep:]

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    arrays = {
        "latents": open_memmap(tmp / "latents.npy", "w+", np.float16, (n_windows, *grid)),
        "ref_latents": open_memmap(tmp / "ref_latents.npy", "w+", np.float16, (n_refs, *grid)),
        "audio_features": open_memmap(tmp / "audio_features.npy", "w+", np.float32, (n_windows, *probe.shape)),
        "face_mask": open_memmap(tmp / "face_mask.npy", "w+", np.float16, (n_windows, *grid[1:])),
    }
    entries, w0, r0 = [], 0, 0
    jobs = list(zip(clips, plans, strict=True))
    for ref, (starts, refs) in tqdm(jobs, desc="latent cache", unit="clip", disable=not progress):
        clip = read_clip(ref)
        frames = resize_center_crop(decode_frames(clip, range(ref.num_frames)), spec.height, spec.width)
        windows = [frames[s : s + spec.frame_num] for s in starts]
        stills = [frames[f][None].expand(spec.frame_num, -1, -1, -1) for f in refs]
        arrays["latents"][w0 : w0 + len(starts)] = _encode(vae, windows, ref.key, 0, batch_size)
        arrays["ref_latents"][r0 : r0 + len(refs)] = _encode(vae, stills, ref.key, 10_000, batch_size)
        buffers = torch.stack([audio_buffer(clip.audio, s + spec.frame_num, spec) for s in starts])
        features = audio_encoder(buffers)[:, -keep:]
        arrays["audio_features"][w0 : w0 + len(starts)] = features.float().cpu().numpy()
        for k, s in enumerate(starts):
            mask = latent_box_mask(mouth_boxes(clip, list(range(s, s + spec.frame_num)), spec), spec)
            arrays["face_mask"][w0 + k] = mask.numpy()
        entries.append({
            "key": ref.key, "source": ref.source, "num_frames": ref.num_frames, "window_starts": starts,
            "ref_frames": refs, "first_window": w0, "first_ref": r0,
        })  # fmt: skip
        w0, r0 = w0 + len(starts), r0 + len(refs)
    for array in arrays.values():
        array.flush()
    index = {
        "format": FORMAT, "fingerprint": encoder_fingerprint(vae, audio_encoder), "stride": stride,
        "geometry": _geometry(spec, vae.latent_channels), "roots": [str(r) for r in roots], "split": split,
        "windows": n_windows, "references": n_refs, "clips": entries,
    }  # fmt: skip
    (tmp / INDEX).write_text(json.dumps(index, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("latent cache %s: %d clips, %d windows, %d references", out, len(entries), n_windows, n_refs)
    return out


@dataclass(frozen=True)
class CachedClip:
    ref: ClipRef
    window_starts: list[int]
    ref_frames: list[int]
    first_window: int
    first_ref: int


class LatentCache:
    """A cache folder opened for reading (arrays memory-mapped, so data workers share the page cache)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_file = self.folder / INDEX
        if not index_file.is_file():
            raise ConfigError(f"{self.folder}: not a latent cache (no {INDEX}; build it with the recipe's cache phase)")
        self.index = json.loads(index_file.read_text())
        if self.index.get("format") != FORMAT:
            raise ConfigError(f"{self.folder}: cache format {self.index.get('format')}, expected {FORMAT}")
        self.clips = [
            CachedClip(
                ClipRef("", 0, e["key"], int(e["num_frames"]), e["source"]), e["window_starts"], e["ref_frames"],
                int(e["first_window"]), int(e["first_ref"]),
            )
            for e in self.index["clips"]
        ]  # fmt: skip
        self._arrays: dict[str, np.ndarray] | None = None

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:  # opened lazily: in each data worker, after the fork
            names = ("latents", "ref_latents", "audio_features", "face_mask")
            self._arrays = {n: np.load(self.folder / f"{n}.npy", mmap_mode="r") for n in names}
        return self._arrays

    def check(self, spec: SampleSpec, vae: Any, audio_encoder: Any) -> None:
        """Refuse a cache whose geometry or encoders differ from the run's (a one-line error)."""
        want = _geometry(spec, vae.latent_channels)
        if self.index["geometry"] != want:
            raise ConfigError(f"{self.folder}: cache geometry {self.index['geometry']} != this run's {want}")
        if self.index["fingerprint"] != encoder_fingerprint(vae, audio_encoder):
            raise ConfigError(f"{self.folder}: made with other VAE/audio weights; delete it and build it again")

    def __getstate__(self) -> dict[str, Any]:  # memory maps are reopened, not pickled, in spawned workers
        return {**self.__dict__, "_arrays": None}


class CachedStage1Dataset(Stage1Dataset):
    """`Stage1Dataset`'s deterministic stream of micro-batches, with samples read from a `LatentCache`.

    The loader's workers hand over model inputs, not samples: stacked, the audio windowed and, with `noise`
    given, the diffusion noise drawn from each sample's seed. The training process then only copies a
    handful of tensors to its device: per-sample work on its host is what limited a small DiT's step rate.
    """

    def __init__(self, cache: LatentCache, spec: SampleSpec, noise: NoiseSampling | None = None, **kwargs: Any):
        super().__init__([c.ref for c in cache.clips], spec, **kwargs)
        self.cache, self.noise = cache, noise

    def loader_batch(self, step: int) -> Stage1Inputs:
        inputs = stack_precomputed(self.micro_batch(step), self.spec)
        if self.noise is not None:
            inputs.sigma, inputs.noise = self.noise.draw(inputs.seeds, inputs.x0.shape[1:])
        return inputs

    def sample_at(self, p: int) -> dict[str, Any]:
        epoch, index = self.position(p)
        entry = self.cache.clips[self._order(epoch)[index]]
        rng = np.random.default_rng([self.seed, epoch, index])
        choice = choose_sample(rng, entry.ref.num_frames, self.spec, entry.window_starts, entry.ref_frames)
        if choice.window_slot is None or choice.ref_slot is None:  # window_plan always caches both
            raise ConfigError(f"{self.cache.folder}: clip {entry.ref.key} lacks a cached window or reference")
        w, r, a = entry.first_window + choice.window_slot, entry.first_ref + choice.ref_slot, self.cache.arrays
        return {
            "key": entry.ref.key, "window_start": choice.window_start, "ref_frame": choice.ref_frame,
            "n_motion": choice.n_motion, "drop_audio": choice.drop_audio, "seed": choice.seed,
            "latents": torch.from_numpy(a["latents"][w].astype(np.float32)),
            "ref_latents": torch.from_numpy(a["ref_latents"][r].astype(np.float32)),
            "audio_features": torch.from_numpy(np.array(a["audio_features"][w], np.float32)),
            "face_mask": torch.from_numpy(a["face_mask"][w].astype(np.float32)),
            "epoch": epoch, "index": index, "position": p,
        }  # fmt: skip
