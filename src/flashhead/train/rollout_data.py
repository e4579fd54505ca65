"""Stage-2 samples: K consecutive streaming chunks of one clip, with the audio each chunk would hear.

A rollout of K chunks covers L = frame_num + (K - 1) * new_frames consecutive frames starting at `start`;
chunk j owns frames [start + j * new_frames, start + j * new_frames + frame_num), so its first
`motion_frames` frames are the previous chunk's last ones, exactly as on a stream. The reference is the
window's first frame: chunk 0 starts cold from it (its motion latent is the reference's own first latent
frame), which is how a stream begins. Chunk j's audio buffer is the 8 s ending at its last frame
(`audio_buffer`, the Temporal Audio Context Cache's content at that moment).

Random choices come from `numpy.random.default_rng([seed, epoch, index])` (the window start) and the
sample's own `seed` (all diffusion noise of its rollout), so a sample depends only on its stream position:
`RolloutDataset` reuses the deterministic, resumable stream of `Stage1Dataset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flashhead.errors import ConfigError
from flashhead.train.data import (
    ClipRef,
    SampleSpec,
    Stage1Dataset,
    _pixels,
    _vae_encode,
    audio_buffer,
    decode_frames,
    read_clip,
    resize_center_crop,
)


@dataclass(frozen=True)
class RolloutSpec:
    """Geometry of a K-chunk rollout on top of a chunk's SampleSpec."""

    chunk: SampleSpec
    num_chunks: int

    @property
    def new_frames(self) -> int:
        return self.chunk.frame_num - self.chunk.motion_frames

    @property
    def frames(self) -> int:
        """Pixel frames a rollout of num_chunks chunks covers."""
        return self.chunk.frame_num + (self.num_chunks - 1) * self.new_frames

    def chunk_range(self, j: int) -> range:
        """Frames of chunk j, relative to the window start."""
        return range(j * self.new_frames, j * self.new_frames + self.chunk.frame_num)


def usable_clips(clips: Sequence[ClipRef], spec: RolloutSpec) -> list[ClipRef]:
    """The clips long enough for a full rollout."""
    return [c for c in clips if c.num_frames >= spec.frames]


class RolloutDataset(Stage1Dataset):
    """Stage1Dataset's stream of micro-batches, each sample a K-chunk window (see the module docstring)."""

    def __init__(self, clips: Sequence[ClipRef], spec: RolloutSpec, **kwargs: Any):
        clips = usable_clips(clips, spec)
        if not clips:
            raise ConfigError(f"no clip has the {spec.frames} frames a {spec.num_chunks}-chunk rollout needs")
        super().__init__(clips, spec.chunk, **kwargs)
        self.rollout = spec

    def sample_at(self, p: int) -> dict[str, Any]:
        epoch, index = self.position(p)
        ref = self.clips[self._order(epoch)[index]]
        rng = np.random.default_rng([self.seed, epoch, index])
        start = int(rng.integers(0, ref.num_frames - self.rollout.frames + 1))
        seed = int(rng.integers(2**62))
        return build_rollout_sample(read_clip(ref), start, seed, self.rollout) | {
            "epoch": epoch, "index": index, "position": p,
        }  # fmt: skip


def build_rollout_sample(clip: Any, start: int, seed: int, spec: RolloutSpec) -> dict[str, Any]:
    """Raw pixels and per-chunk audio buffers of the rollout window starting at `start`."""
    c = spec.chunk
    if clip.sample_rate != c.sample_rate:
        raise ConfigError(f"clip {clip.key}: audio at {clip.sample_rate} Hz, training needs {c.sample_rate}")
    frames = resize_center_crop(decode_frames(clip, range(start, start + spec.frames)), c.height, c.width)
    audio = torch.stack([audio_buffer(clip.audio, start + spec.chunk_range(j).stop, c) for j in range(spec.num_chunks)])
    return {"key": clip.key, "window_start": start, "seed": seed, "video": frames, "audio": audio}


@dataclass
class RolloutInputs:
    """A micro-batch of rollouts, with the frozen encoders already applied where it is cheap."""

    video: torch.Tensor  # (B, L, H, W, 3) uint8 ground truth (chunk latents are encoded on demand)
    y: torch.Tensor  # (B, C, F, h, w) reference latents (the window's first frame, repeated frame_num times)
    ref_image: torch.Tensor  # (B, 3, 1, H, W) in [-1, 1]: the colour-correction reference
    contexts: torch.Tensor  # (B, K, frame_num, window, layers, hidden) audio context of each chunk
    seeds: list[int]


@torch.no_grad()
def encode_rollouts(
    samples: Sequence[dict[str, Any]], vae: Any, audio_encoder: Any, spec: RolloutSpec
) -> RolloutInputs:
    """Reference latents and every chunk's audio context (the same encoder call and windowing as inference)."""
    device, dtype = vae.device, vae.dtype
    cache = spec.chunk.context_cache(audio_encoder)
    y, refs, contexts = [], [], []
    for s in samples:
        first = s["video"][:1]
        still = first.expand(spec.chunk.frame_num, -1, -1, -1)
        y.append(_vae_encode(vae, _pixels(still, device, dtype), s["seed"] + 2))
        refs.append(_pixels(first, device, torch.float32))
        contexts.append(torch.cat([cache.context(audio_encoder(buf).to(device)) for buf in s["audio"]]))
    return RolloutInputs(
        video=torch.stack([s["video"] for s in samples]),
        y=torch.cat(y).float(),
        ref_image=torch.cat(refs),
        contexts=torch.stack(contexts).float(),
        seeds=[s["seed"] for s in samples],
    )


@torch.no_grad()
def encode_chunk_truth(inputs: RolloutInputs, j: int, vae: Any, spec: RolloutSpec) -> torch.Tensor:
    """(B, C, F, h, w) ground-truth latents of chunk j (the regression target; its first latent frames are
    the oracle's motion context). LTX posterior noise comes from each sample's seed."""
    frames = inputs.video[:, spec.chunk_range(j).start : spec.chunk_range(j).stop]
    out = [
        _vae_encode(vae, _pixels(v, vae.device, vae.dtype), seed + 100 + j)
        for v, seed in zip(frames, inputs.seeds, strict=True)
    ]
    return torch.cat(out).float()
