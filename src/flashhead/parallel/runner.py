"""The leader / follower protocol that keeps the sequence-parallel ranks in step.

The leader (rank 0) runs the program: it reads inputs, owns streaming sessions, colour-corrects and
writes outputs. Whenever it reaches a chunk's denoising it first announces the chunk (a small header by
`broadcast_object_list` on a host-side gloo group, then the input tensors by `broadcast` on the GPUs' group),
and every rank runs the same DiT and VAE-decode shards on bit-identical inputs. With the Wan2.1 VAE (Pro) the
header also says that a motion re-encode follows: after colour correction the leader broadcasts the motion
frames and every rank encodes its strip of them (`encode`). With colour correction the chunk also carries the
reference's colour statistics: every rank corrects its block of the decoded frames and the blocks are gathered
(`color`), so every rank holds the corrected motion frames and encodes its strip of them without a broadcast
(`encode_own`). Followers do nothing else: they loop in `FlashHeadPipeline.follow` until the leader sends "stop"
(`release_followers`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flashhead.models.dit import FlashHeadDiT
from flashhead.models.vae import VideoVAE
from flashhead.parallel.dit import SequenceParallelDiT
from flashhead.parallel.group import SequenceParallelGroup
from flashhead.parallel.vae import DEFAULT_HALO, gather_along, split_decode, split_encode, splits_encode, strip_bounds


@dataclass
class ChunkInputs:
    """What every rank needs to denoise and decode one batch of chunks."""

    initial: torch.Tensor  # (B, C, F, h, w) initial noise
    motion: torch.Tensor  # (B, C, n_motion, h, w) clean motion latents
    ref_latents: torch.Tensor  # (B, C, F, h, w)
    context: torch.Tensor  # (B, 33, window, layers, channels) audio features
    step_noise: list[torch.Tensor] | None  # one (B, C, F, h, w) per step, or None (Euler)
    lengths: list[int]  # real motion frames per sample
    skip: int  # leading latent frames not decoded
    encode: tuple[int, ...] | None = None  # shape of the motion frames split-encoded after the decode, or None
    color: torch.Tensor | None = None  # (B, 2, 3) reference colour statistics: the decode is colour-corrected
    color_strength: float = 0.0


class SequenceParallelRunner:
    """The sequence-parallel DiT, the split decode and the announcements, for one pipeline's networks."""

    def __init__(
        self,
        dit: FlashHeadDiT,
        vae: VideoVAE,
        group: SequenceParallelGroup,
        halo: int = DEFAULT_HALO,
        head_groups: int | None = None,
        attention: str | None = None,
    ):
        self.group, self.vae, self.halo = group, vae, halo
        self.model = SequenceParallelDiT(dit, group, head_groups, attention)
        self.split_encode = splits_encode(vae)  # exact for Wan2.1 only; otherwise the leader encodes alone

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return split_decode(self.vae, latents, self.group, self.halo)

    def color(self, video: torch.Tensor, stats: torch.Tensor, strength: float, correct: Callable) -> torch.Tensor:
        """Every rank: the colour correction of `video` (B, 3, T, H, W; the whole decode, on every rank), its frames
        split over the ranks and gathered (a frame is corrected from its own statistics and the reference's)."""
        bounds = strip_bounds(video.shape[2], self.group.world_size)
        start, stop = bounds[self.group.rank]
        mine = correct(video[:, :, start:stop], stats, strength) if stop > start else video[:, :, :0]
        return gather_along(mine, bounds, 2, self.group)

    def encode_own(self, video: torch.Tensor) -> torch.Tensor:
        """Every rank: the VAE encode of motion frames that every rank holds (after `color`), split by rows."""
        return split_encode(self.vae, video.to(self.group.device, self.vae.dtype).contiguous(), self.group)

    def encode(self, video: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        """Every rank: the VAE encode of the leader's `video` (followers pass None), split by rows."""
        if self.group.is_leader:
            if tuple(video.shape) != tuple(shape):
                raise RuntimeError(f"motion frames {tuple(video.shape)} differ from the announced {tuple(shape)}")
            video = video.to(self.group.device, self.vae.dtype).contiguous()
        else:
            video = torch.empty(shape, dtype=self.vae.dtype, device=self.group.device)
        dist.broadcast(video, src=0, group=self.group.group)
        return split_encode(self.vae, video, self.group)

    def announce(self, chunk: ChunkInputs) -> None:
        """Leader: send a chunk's inputs to the followers."""
        noise = chunk.step_noise or []
        color = [] if chunk.color is None else [chunk.color]
        tensors = [chunk.initial, chunk.motion, chunk.ref_latents, chunk.context, *noise, *color]
        header = {"op": "chunk", "lengths": chunk.lengths, "skip": chunk.skip, "steps": len(noise),
                  "encode": chunk.encode, "color": bool(color), "color_strength": chunk.color_strength,
                  "tensors": [(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in tensors]}  # fmt: skip
        self._broadcast_header(header)
        for t in tensors:
            dist.broadcast(t.contiguous(), src=0, group=self.group.group)

    def receive(self) -> ChunkInputs | None:
        """Follower: the next chunk's inputs, or None when the leader has released the followers."""
        header = self._broadcast_header(None)
        if header["op"] == "stop":
            return None
        tensors = []
        for shape, dtype in header["tensors"]:
            t = torch.empty(shape, dtype=getattr(torch, dtype), device=self.group.device)
            dist.broadcast(t, src=0, group=self.group.group)
            tensors.append(t)
        color = tensors.pop() if header["color"] else None
        initial, motion, ref_latents, context, *noise = tensors
        return ChunkInputs(initial, motion, ref_latents, context, noise if header["steps"] else None,
                           header["lengths"], header["skip"], header["encode"], color,
                           header["color_strength"])  # fmt: skip

    def release(self) -> None:
        """Leader: tell the followers that no more chunks come."""
        self._broadcast_header({"op": "stop"})

    def _broadcast_header(self, header: dict | None) -> dict:
        box = [header]
        if self.group.control is not None:  # on the host: neither side waits for the GPU work queued before it
            dist.broadcast_object_list(box, src=0, group=self.group.control, device=torch.device("cpu"))
        else:
            dist.broadcast_object_list(box, src=0, group=self.group.group, device=self.group.device)
        return box[0]
