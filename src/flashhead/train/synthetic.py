"""Synthetic training inputs with learnable audio-to-motion structure, made in memory: no dataset, no VAE,
no audio encoder. For throughput and scaling runs of the real training loop on a machine that has none of them.

Every sample is a "talking blob" on the latent grid, driven by two audio-like signals per video frame:

    loudness  a syllable-rate envelope in [0, 1]  ->  the radius of a mouth blob
    pitch     a slow oscillation in [-1, 1]       ->  the sideways position of the head (and the mouth on it)

    x0        smooth background + head blob + mouth blob, each a fixed direction in latent channels
    y         the same sample with the mouth closed and the head centred, for every latent frame (a reference)
    context   per video frame and audio window position, loudness and pitch along fixed random directions
              of the (layers, channels) feature space, plus noise: the shape wav2vec features have
    face_mask the mouth blob's soft footprint (for the face loss)

So a model can only predict the mouth and head of the new frames from the audio context (or the motion
frames), and the Stage-1 loss falls well below its value for an untrained model. Everything of a sample comes
from its own seed, so the same (seed, step, rank) always gives the same micro-batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flashhead.train.data import SampleSpec, Stage1Inputs
from flashhead.train.rollout_data import RolloutInputs, RolloutSpec


@dataclass(frozen=True)
class Signals:
    """Per video frame: loudness (T,) in [0, 1] and pitch (T,) in [-1, 1]."""

    loudness: torch.Tensor
    pitch: torch.Tensor


class TalkingBlobs:
    """Maker of synthetic Stage-1 (and Stage-2 rollout) inputs for a DiT config and a sample geometry."""

    def __init__(self, spec: SampleSpec, dit_config: Mapping, seed: int = 0):
        self.spec = spec
        self.channels = int(dit_config["out_dim"])
        self.layers = int(dit_config.get("audio_layers", 12))
        self.features = int(dit_config.get("audio_channels", 768))
        self.seed = seed
        g = torch.Generator().manual_seed(seed)  # the "world": fixed for the whole dataset
        self.materials = F.normalize(torch.randn(4, self.channels, generator=g), dim=1) * math.sqrt(self.channels)
        self.audio_dirs = torch.randn(2, self.layers, self.features, generator=g)

    # -- signals -------------------------------------------------------------------------------------

    def signals(self, g: torch.Generator, frames: int) -> Signals:
        t = torch.arange(frames, dtype=torch.float32) / self.spec.fps
        rate, phase = 2 + 3 * torch.rand(1, generator=g), 2 * math.pi * torch.rand(2, generator=g)
        loudness = (0.5 + 0.5 * torch.sin(2 * math.pi * rate * t + phase[0])).clamp(0, 1)
        loudness = loudness * (torch.rand(1, generator=g) > 0.1)  # one sample in ten is silent
        pitch = torch.sin(2 * math.pi * 0.4 * t + phase[1])
        return Signals(loudness, pitch)

    def context(self, s: Signals, g: torch.Generator, last_frame: int) -> torch.Tensor:
        """(frame_num, window, layers, channels) audio context of the frame_num frames ending at `last_frame`."""
        n, window = self.spec.frame_num, self.spec.audio_window
        half = window // 2
        frames = torch.arange(last_frame - n + 1 - half, last_frame + 1 + half)  # the windows' frames
        inside = (frames >= 0) & (frames < len(s.loudness))
        idx = frames.clamp(0, len(s.loudness) - 1)
        values = torch.stack([s.loudness[idx] * 2 - 1, s.pitch[idx]], 1) * inside[:, None]  # (n + 2 half, 2)
        feats = torch.einsum("tk,klc->tlc", values, self.audio_dirs)
        feats = feats + 0.3 * torch.randn(feats.shape, generator=g)
        return feats.unfold(0, window, 1).permute(0, 3, 1, 2).contiguous()  # (n, window, layers, channels)

    # -- latents -------------------------------------------------------------------------------------

    def _latent_groups(self, values: torch.Tensor) -> torch.Tensor:
        """Per-video-frame values (frame_num,) -> per latent frame: frame 0 alone, then groups of stride_t."""
        st = self.spec.vae_stride[0]
        return torch.stack([values[:1].mean()] + [values[1 + j * st : 1 + (j + 1) * st].mean()
                                                  for j in range(self.spec.latent_frames - 1)])  # fmt: skip

    def background(self, g: torch.Generator) -> torch.Tensor:
        """(C, h, w): a smooth random mix of three materials (the sample's identity)."""
        coarse = torch.randn(1, 3, 4, 4, generator=g)
        mix = F.interpolate(coarse, size=self.spec.latent_size, mode="bilinear", align_corners=True)[0]
        return torch.einsum("khw,kc->chw", mix, self.materials[:3]) * 0.5

    def latents(
        self, s: Signals, background: torch.Tensor, first: int, still: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """(x0 (C, F, h, w), face mask (F, h, w)) of the frame_num frames starting at `first`; `still`: the
        reference (mouth closed, head centred, every frame)."""
        h, w = self.spec.latent_size
        n_frames = self.spec.latent_frames
        window = slice(first, first + self.spec.frame_num)
        loud = self._latent_groups(s.loudness[window]) * (0 if still else 1)
        pitch = self._latent_groups(s.pitch[window]) * (0 if still else 1)
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        cx = 0.5 + 0.15 * pitch.view(-1, 1, 1)  # (F, 1, 1)
        head = torch.exp(-((xx - cx) ** 2 + (yy - 0.45) ** 2) / (2 * 0.18**2))  # (F, h, w)
        radius = 0.03 + 0.09 * loud.view(-1, 1, 1)
        mouth = torch.exp(-((xx - cx) ** 2 + (yy - 0.65) ** 2) / (2 * radius**2))
        x0 = background[:, None] + head[None] * self.materials[3].view(-1, 1, 1, 1) * 0.6
        x0 = x0 + mouth[None] * (self.materials[0] - self.materials[1]).view(-1, 1, 1, 1) * 0.8
        face = torch.exp(-((xx - cx) ** 2 + (yy - 0.65) ** 2) / (2 * 0.15**2)).expand(n_frames, h, w)
        return x0, face

    def sample_seed(self, step: int, rank: int, index: int) -> int:
        return int(np.random.default_rng([self.seed, step, rank, index]).integers(2**62))

    def stage1_inputs(self, seeds: list[int], device: torch.device | str = "cpu") -> Stage1Inputs:
        """One micro-batch of Stage-1 inputs (what `encode_samples` gives the trainer), one sample per seed."""
        spec = self.spec
        x0, y, context, n_motion, face = [], [], [], [], []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            total = spec.frame_num + 16
            s = self.signals(g, total)
            first = int(torch.randint(0, total - spec.frame_num + 1, (1,), generator=g))
            background = self.background(g)
            latents, mask = self.latents(s, background, first)
            ref, _ = self.latents(s, background, first, still=True)
            motion = spec.motion_latent_frames if torch.rand(1, generator=g) < spec.motion_probs[0] else 1
            ctx = self.context(s, g, first + spec.frame_num - 1)
            drop = bool(torch.rand(1, generator=g) < spec.audio_drop_prob)
            x0.append(latents)
            y.append(ref)
            context.append(torch.zeros_like(ctx) if drop else ctx)
            n_motion.append(motion)
            face.append(mask)
        return Stage1Inputs(
            x0=torch.stack(x0).to(device),
            y=torch.stack(y).to(device),
            context=torch.stack(context).to(device),
            n_motion=torch.tensor(n_motion, device=device),
            face_mask=torch.stack(face).to(device),
            seeds=list(seeds),
        )

    def micro_batch(self, step: int, rank: int, micro_batch_size: int) -> Stage1Inputs:
        """Micro-step `step` of process `rank` (on CPU): the samples of seeds (seed, step, rank, 0..B-1)."""
        return self.stage1_inputs([self.sample_seed(step, rank, b) for b in range(micro_batch_size)])

    # -- Stage 2 -------------------------------------------------------------------------------------

    def pixel_video(self, s: Signals, frames: int, height: int, width: int, device: torch.device | str = "cpu"):
        """(frames, H, W, 3) uint8 on CPU: the same talking blob in pixels (grey background, head, dark mouth),
        drawn on `device` (a few hundred million pixels at 512 x 512)."""
        lin = torch.linspace(0, 1, height, device=device), torch.linspace(0, 1, width, device=device)
        yy, xx = torch.meshgrid(*lin, indexing="ij")
        cx = 0.5 + 0.15 * s.pitch[:frames].to(device).view(-1, 1, 1)
        head = ((xx - cx) ** 2 / 0.2**2 + (yy - 0.45) ** 2 / 0.28**2) < 1
        radius = 0.02 + 0.06 * s.loudness[:frames].to(device).view(-1, 1, 1)
        mouth = head & (((xx - cx) ** 2 / 0.08**2 + (yy - 0.65) ** 2 / radius**2) < 1)
        colour = {"skin": (220, 180, 150), "mouth": (90, 20, 30), "background": (90, 90, 90)}
        video = torch.empty((frames, height, width, 3), dtype=torch.uint8, device=device)
        for c in range(3):
            skin = torch.where(mouth, colour["mouth"][c], colour["skin"][c])
            video[..., c] = torch.where(head, skin, colour["background"][c])
        return video.cpu()

    def rollout_inputs(self, seeds: list[int], spec: RolloutSpec, vae, device: torch.device | str) -> RolloutInputs:
        """A micro-batch of K-chunk rollouts as `encode_rollouts` gives them: pixels, the reference latents
        (encoded by `vae`, as the trainer does) and every chunk's audio context."""
        from flashhead.train.data import _pixels, _vae_encode

        c = spec.chunk
        videos, y, refs, contexts = [], [], [], []
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            s = self.signals(g, spec.frames)
            video = self.pixel_video(s, spec.frames, c.height, c.width, vae.device)
            still = video[:1].expand(c.frame_num, -1, -1, -1)
            with torch.no_grad():
                y.append(_vae_encode(vae, _pixels(still, vae.device, vae.dtype), seed + 2).float())
            refs.append(_pixels(video[:1], vae.device, torch.float32))
            contexts.append(torch.stack([self.context(s, g, spec.chunk_range(j).stop - 1)
                                         for j in range(spec.num_chunks)]))  # fmt: skip
            videos.append(video)
        return RolloutInputs(
            video=torch.stack(videos),
            y=torch.cat(y).to(device),
            ref_image=torch.cat(refs).to(device),
            contexts=torch.stack(contexts).to(device),
            seeds=list(seeds),
        )


class Stage1Stream(IterableDataset):
    """One process's endless micro-batches of `TalkingBlobs` (DataLoader worker w of n makes micro-steps
    start + w, start + w + n, ...; the loader hands them back in order)."""

    def __init__(self, blobs: TalkingBlobs, micro_batch_size: int, rank: int = 0, start_step: int = 0):
        self.blobs, self.micro_batch_size, self.rank, self.start_step = blobs, micro_batch_size, rank, start_step

    def __iter__(self) -> Iterator[Stage1Inputs]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for step in itertools.count(self.start_step + worker, workers):
            yield self.blobs.micro_batch(step, self.rank, self.micro_batch_size)


def stage1_batches(
    blobs: TalkingBlobs, micro_batch_size: int, rank: int, device: torch.device, workers: int = 2
) -> Iterator[Stage1Inputs]:
    """Micro-batches made by `workers` background processes (0: in this one), moved to `device`: the
    `inputs` argument of flashhead.train.trainer.train."""
    stream = Stage1Stream(blobs, micro_batch_size, rank)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    for batch in loader:
        yield batch.to(device)
