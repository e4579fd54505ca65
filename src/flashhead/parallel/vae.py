"""VAE decode split across ranks: each rank decodes a horizontal strip of the latent, with a halo.

Rank r decodes latent rows [a_r - halo, b_r + halo) (clipped to the frame) and keeps the pixel rows of
[a_r, b_r); the strips are gathered on every rank. Convolutions only see `halo` latent rows of
neighbourhood across a strip border, and the Wan2.1 decoder's mid-block attention sees only its strip,
so the split is approximate: the error shrinks with the halo and is measured by tests/parallel/test_vae.py
and `benchmarks/sp_bench.py` (see docs/performance.md). Time is split along the rows, not along time,
because both decoders carry temporal state (Wan decodes latent frames one by one with a causal cache).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from flashhead.models.vae import VideoVAE
from flashhead.parallel.group import SequenceParallelGroup

DEFAULT_HALO = 8  # latent rows; 64 pixel rows for Wan2.1 (Pro), 256 for LTX (Lite)


def strip_bounds(rows: int, world_size: int) -> list[tuple[int, int]]:
    """Balanced contiguous [start, stop) latent-row ranges, one per rank (empty when rows < ranks)."""
    base, extra = divmod(rows, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        stop = start + base + (r < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


@torch.no_grad()
def decode_strip(vae: VideoVAE, latent: torch.Tensor, start: int, stop: int, halo: int) -> torch.Tensor:
    """Pixels of latent rows [start, stop), decoded with `halo` rows of context on both sides."""
    lo, hi = max(0, start - halo), min(latent.shape[-2], stop + halo)
    pixels = vae.decode(latent[..., lo:hi, :])
    sh = vae.stride[1]
    return pixels[..., (start - lo) * sh : (stop - lo) * sh, :]


@torch.no_grad()
def split_decode(
    vae: VideoVAE, latent: torch.Tensor, group: SequenceParallelGroup, halo: int = DEFAULT_HALO
) -> torch.Tensor:
    """vae.decode(latent) with the rows split over the ranks; the whole video comes back on every rank."""
    if group.world_size == 1:
        return vae.decode(latent)
    rows = latent.shape[-2]
    bounds = strip_bounds(rows, group.world_size)
    if all(a - halo <= 0 and b + halo >= rows for a, b in bounds if b > a):
        return vae.decode(latent)  # every strip would decode the whole frame: decode it here, exactly
    start, stop = bounds[group.rank]
    if stop > start:
        mine = decode_strip(vae, latent, start, stop, halo)
    else:  # more ranks than latent rows: this rank only takes part in the gather
        T = 1 + vae.stride[0] * (latent.shape[2] - 1)
        mine = latent.new_empty((latent.shape[0], 3, T, 0, latent.shape[-1] * vae.stride[2]), dtype=vae.dtype)
    sh = vae.stride[1]
    longest = max(b - a for a, b in bounds) * sh
    padded = torch.nn.functional.pad(mine, (0, 0, 0, longest - mine.shape[-2])).contiguous()
    pieces = [torch.empty_like(padded) for _ in bounds]
    dist.all_gather(pieces, padded, group=group.group)
    return torch.cat([p[..., : (b - a) * sh, :] for p, (a, b) in zip(pieces, bounds, strict=True)], dim=-2)
