"""VAE decode (and Wan encode) split across ranks: each rank takes a horizontal strip of rows; strips are gathered.

Time is not split: both decoders carry state through time (Wan decodes latent frames one by one with causal
caches). Rank r owns latent rows [a_r, b_r) (`strip_bounds`) and returns their pixel rows.

- Wan2.1 (Pro): exact. `WanStripDecoder` runs conv_in and the mid block (with its global attention) on the
  whole latent and every later layer on the rows its receptive field needs (flashhead.parallel.wan_decode).
- Wan2.1 encode (the motion-frame re-encode): exact. `WanStripEncoder` runs conv_in and the down blocks on the
  pixel rows that latent rows [a_r, b_r) need; the mid-block inputs are gathered and the mid block and head run
  on the whole latent on every rank (flashhead.parallel.wan_encode). Not offered for other VAEs.
- Other VAEs (LTX, Lite): approximate. The strip is decoded from latent rows [a_r - halo, b_r + halo), so
  convolutions see only `halo` rows across a border; when the halo covers the frame the whole frame is decoded
  on every rank, exactly. Lite is not run sequence-parallel by default (see SequenceParallelPolicy).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from flashhead.errors import ConfigError
from flashhead.models.vae import VideoVAE, WanVideoVAE
from flashhead.parallel.group import SequenceParallelGroup
from flashhead.parallel.wan_decode import WanStripDecoder
from flashhead.parallel.wan_encode import WanStripEncoder
from flashhead.pipeline.graphs import graphed

DEFAULT_HALO = 8  # latent rows, for the approximate (non-Wan) split


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
    """Pixels of latent rows [start, stop): exact for Wan2.1, else decoded with `halo` rows of context."""
    if isinstance(vae, WanVideoVAE):
        if not hasattr(vae, "_strip_decoder"):
            vae._strip_decoder = WanStripDecoder(vae.model)
        z = vae.denormalize(vae._check_latent(latent))
        # vae_whole_chunk's calls or the per-frame loop's; a tuple, since a graphed call's settings select its graph
        calls = tuple(vae.decoder_calls(0, z.shape[2], batch=z.shape[0], frames=z.shape[2]))
        return graphed(vae, "strip_decode", vae._strip_decoder.decode)(z, start, stop, calls).clamp(-1.0, 1.0)
    lo, hi = max(0, start - halo), min(latent.shape[-2], stop + halo)
    pixels = graphed(vae, "decode", vae.decode)(latent[..., lo:hi, :])
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
    exact = isinstance(vae, WanVideoVAE)
    if not exact and all(a - halo <= 0 and b + halo >= rows for a, b in bounds if b > a):
        return vae.decode(latent)  # every strip would decode the whole frame: decode it here, exactly
    start, stop = bounds[group.rank]
    if stop > start:
        mine = decode_strip(vae, latent, start, stop, halo)
    else:  # more ranks than latent rows: this rank only takes part in the gather
        T = 1 + vae.stride[0] * (latent.shape[2] - 1)
        mine = latent.new_empty((latent.shape[0], 3, T, 0, latent.shape[-1] * vae.stride[2]), dtype=vae.dtype)
    return _gather_rows(mine, bounds, vae.stride[1], group)


def _gather_rows(mine: torch.Tensor, bounds: list[tuple[int, int]], scale: int, group: SequenceParallelGroup):
    """Every rank's strip (rows along dim -2, `scale` rows per bound unit) -> the whole tensor on every rank."""
    return gather_along(mine, [(a * scale, b * scale) for a, b in bounds], mine.dim() - 2, group)


def gather_along(mine: torch.Tensor, bounds: list[tuple[int, int]], dim: int, group: SequenceParallelGroup):
    """Every rank's block [a, b) of `dim` (rank r holds bounds[r]) -> the whole tensor on every rank."""
    longest = max(b - a for a, b in bounds)
    padded = mine
    if mine.shape[dim] < longest:  # uneven blocks: every rank sends the same size
        shape = list(mine.shape)
        shape[dim] = longest - mine.shape[dim]
        padded = torch.cat([mine, mine.new_zeros(shape)], dim)
    padded = padded.contiguous()
    pieces = [torch.empty_like(padded) for _ in bounds]
    dist.all_gather(pieces, padded, group=group.group)
    return torch.cat([p.narrow(dim, 0, b - a) for p, (a, b) in zip(pieces, bounds, strict=True)], dim=dim)


def splits_encode(vae: VideoVAE) -> bool:
    """Whether `split_encode` can split this VAE's encode exactly (Wan2.1)."""
    return isinstance(vae, WanVideoVAE)


@torch.no_grad()
def split_encode(vae: VideoVAE, video: torch.Tensor, group: SequenceParallelGroup) -> torch.Tensor:
    """vae.encode(video) for Wan2.1 with the rows before the mid block split over the ranks; latent on every rank."""
    if not splits_encode(vae):
        raise ConfigError(f"split encode needs the Wan2.1 VAE, not {type(vae).__name__}")
    if group.world_size == 1:
        return vae.encode(video)
    if not hasattr(vae, "_strip_encoder"):
        vae._strip_encoder = WanStripEncoder(vae.model)
    encoder: WanStripEncoder = vae._strip_encoder
    video = vae._check_video(video)
    rows = video.shape[-2] // encoder.scale
    bounds = strip_bounds(rows, group.world_size)
    start, stop = bounds[group.rank]
    if stop > start:
        mine = graphed(vae, "strip_encode", encoder.features)(video, start, stop)  # (B, C, T', stop - start, W')
    else:  # more ranks than latent rows: this rank only takes part in the gather
        shape = vae.latent_shape(video.shape[2], video.shape[3], video.shape[4])
        channels = encoder.model.encoder.mid_block.resnets[0].conv1.in_channels
        mine = video.new_empty((video.shape[0], channels, shape[1], 0, shape[3]))
    features = _gather_rows(mine, bounds, 1, group)
    return vae.normalize(graphed(vae, "encode_finish", encoder.finish)(features))
