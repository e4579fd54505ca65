"""Exact Wan2.1 decode of a horizontal strip of pixel rows, for splitting the Pro decode across ranks.

The Wan2.1 decoder (diffusers `WanDecoder3d`) normalises per position (RMS over channels), upsamples by
nearest neighbour and otherwise only convolves, with zero padding and causal caches in time. Its one global
operation is the self-attention of the mid block, at latent resolution. So a rank can compute exactly the
pixel rows [8a, 8b) of latent rows [a, b):

1. conv_in and the mid block run on the whole latent (low resolution: a few % of the decode);
2. every later layer runs on the rows it needs: working back from the strip, each layer needs its output rows
   widened by its row radius (and halved through an upsampling), clipped to the frame. Rows beyond that
   margin would be wrong (zero padding instead of neighbours) but are cropped away before they matter;
3. the causal feature caches are this strip's own: every latent frame crops the same rows, so a cache always
   holds the rows its layer sees.

The radii are read from the module structure (`WanStripDecoder` refuses layers it does not know), so the
margins are the exact receptive field, not a guessed halo. Margins are cropped after every layer, which keeps
the extra work small where it is costly (the high-resolution levels need only a few rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    CACHE_T,
    WanCausalConv3d,
    WanResample,
    WanResidualBlock,
    WanUpBlock,
)
from torch import nn

from flashhead.errors import ConfigError

Cache = list  # one entry per causal conv, in call order: the last input frames that conv has seen


@dataclass(frozen=True)
class Stage:
    """One decoder layer run on a row window: its row radius at its output resolution and its row upsampling."""

    run: Callable[[torch.Tensor, Cache, list[int]], torch.Tensor]
    radius: int
    upsample: int = 1


def _conv_rows(conv: nn.Module) -> int:
    """Rows of context one side of a convolution reads (stride 1, padding = half the kernel)."""
    if isinstance(conv, nn.Identity):
        return 0
    if isinstance(conv, WanCausalConv3d):  # _padding = (w, w, h, h, 2t, 0)
        pad, kernel, stride = conv._padding[2], conv.kernel_size[1], conv.stride[1]
    elif isinstance(conv, nn.Conv2d):
        pad, kernel, stride = conv.padding[0], conv.kernel_size[0], conv.stride[0]
    else:
        raise ConfigError(f"Wan strip decode: unknown layer {type(conv).__name__}")
    if stride != 1 or kernel != 2 * pad + 1:
        raise ConfigError(f"Wan strip decode: {type(conv).__name__} with kernel {kernel}, padding {pad}")
    return pad


def _cached_conv(conv: WanCausalConv3d, x: torch.Tensor, cache: Cache, idx: list[int]) -> torch.Tensor:
    # The cache protocol of diffusers' WanDecoder3d for its conv_in / conv_out: keep the last CACHE_T input
    # frames (padded with the previous cached frame when the chunk has one frame).
    i = idx[0]
    keep = x[:, :, -CACHE_T:].clone()
    if keep.shape[2] < 2 and cache[i] is not None:
        keep = torch.cat([cache[i][:, :, -1:].to(keep.device), keep], dim=2)
    out = conv(x, cache[i])
    cache[i] = keep
    idx[0] += 1
    return out


def _stages(model: AutoencoderKLWan) -> list[Stage]:
    """The layers after the mid block, in call order, with their row geometry."""
    dec = model.decoder
    stages: list[Stage] = []
    for block in dec.up_blocks:
        if not isinstance(block, WanUpBlock):  # Wan2.2's residual up blocks have a different structure
            raise ConfigError(f"Wan strip decode supports the Wan2.1 decoder, not {type(block).__name__}")
        for res in block.resnets:
            if not isinstance(res, WanResidualBlock) or _conv_rows(res.conv_shortcut):
                raise ConfigError(f"Wan strip decode: unknown residual block {type(res).__name__}")
            stages.append(Stage(res, _conv_rows(res.conv1) + _conv_rows(res.conv2)))
        for up in block.upsamplers or []:
            if not isinstance(up, WanResample) or up.mode not in ("upsample2d", "upsample3d"):
                raise ConfigError(f"Wan strip decode: unknown resample {getattr(up, 'mode', type(up).__name__)}")
            near, conv = up.resample
            if tuple(near.scale_factor) != (2.0, 2.0) or near.mode not in ("nearest", "nearest-exact"):
                raise ConfigError(f"Wan strip decode: upsampling {near.mode} x{near.scale_factor}")
            if up.mode == "upsample3d" and up.time_conv.kernel_size[1:] != (1, 1):
                raise ConfigError("Wan strip decode: the temporal upsampling conv mixes pixels")
            stages.append(Stage(up, _conv_rows(conv), upsample=2))

    def head(x: torch.Tensor, cache: Cache, idx: list[int]) -> torch.Tensor:
        return _cached_conv(dec.conv_out, dec.nonlinearity(dec.norm_out(x)), cache, idx)

    stages.append(Stage(head, _conv_rows(dec.conv_out)))
    return stages


def row_windows(stages: list[Stage], rows: int, start: int, stop: int) -> list[tuple[int, int]]:
    """For a latent-row strip [start, stop) of a `rows`-row latent: the input row window of every stage.

    Works back from the output rows [start, stop) * total upsampling: a stage whose output must be right on
    rows [lo, hi) reads [lo - r, hi + r) at its output resolution (clipped to the frame), i.e. that window
    divided by its upsampling at its input resolution.
    """
    scale = math.prod(s.upsample for s in stages)
    lo, hi, height = start * scale, stop * scale, rows * scale
    windows = []
    for s in reversed(stages):
        lo, hi = max(0, lo - s.radius), min(height, hi + s.radius)
        lo, hi, height = lo // s.upsample, -(-hi // s.upsample), height // s.upsample
        windows.append((lo, hi))
    return windows[::-1]


def strip_step(
    holder: Any, net: nn.Module, eager: Callable, attr: str = "_compiled"
) -> tuple[Callable, torch.memory_format | None]:
    """The step a strip runs per frame / time chunk, and the memory layout to keep its caches in.

    Eager as it is unless compile_vae compiled `net` (the whole decoder / encoder, which a strip never calls):
    then `eager` compiled once per `holder` (kept in `holder.<attr>`; one strip per rank), with the layout of
    `net`'s convolutions (vae_channels_last). The layout is None when nothing needs keeping.
    """
    if getattr(net, "_compiled_call_impl", None) is None:
        return eager, None
    if getattr(holder, attr) is None:
        setattr(holder, attr, torch.compile(eager, dynamic=False))
    weight = net.conv_in.weight
    channels_last = weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()
    return getattr(holder, attr), torch.channels_last_3d if channels_last else torch.contiguous_format


def keep_cache_layout(cache: Cache, layout: torch.memory_format | None) -> None:
    """One memory layout for every cached tensor of a compiled strip step: the step guards on the caches'
    strides, and the views and copies the layers leave there vary (each variant was a recompile, until Dynamo's
    recompile limit sent the strip back to eager)."""
    if layout is not None:
        cache[:] = [c.contiguous(memory_format=layout) if isinstance(c, torch.Tensor) else c for c in cache]


class WanStripDecoder:
    """Decodes pixel rows [start * 8, stop * 8) of a Wan2.1 latent, equal to the same rows of a full decode."""

    def __init__(self, model: AutoencoderKLWan):
        if model.config.patch_size is not None:
            raise ConfigError("Wan strip decode: patchified (Wan2.2) VAEs are not supported")
        self.model = model
        self.stages = _stages(model)
        self.scale = math.prod(s.upsample for s in self.stages)  # pixel rows per latent row

    @torch.no_grad()
    def decode(
        self, z: torch.Tensor, start: int, stop: int, calls: Sequence[tuple[int, int]] | None = None
    ) -> torch.Tensor:
        """Raw (denormalised) latent (B, C, T', H', W') -> pixels (B, 3, T, (stop - start) * 8, W), unclamped.

        `calls`: the latent-frame spans [a, b) decoded per call, in order (default: diffusers' loop, one frame per
        call; `WanVideoVAE.decoder_calls` gives vae_whole_chunk's, where several frames go through each layer at once).
        """
        dec, rows = self.model.decoder, z.shape[-2]
        windows = row_windows(self.stages, rows, start, stop)
        x = self.model.post_quant_conv(z)
        cache: Cache = [None] * (2 + 2 * len(dec.mid_block.resnets) + len(self.stages) * 2)  # upper bound
        # compile_vae compiles the decoder module of a one-GPU decode; the strip decode calls the decoder's
        # parts, so it compiles its own step (a graph for the first call, one per later call's length).
        step, layout = strip_step(self, dec, self._frames)
        windows, frames = tuple(windows), []
        for a, b in calls or [(i, i + 1) for i in range(x.shape[2])]:
            frames.append(step(x[:, :, a:b], cache, windows, start, stop))
            keep_cache_layout(cache, layout)
        return torch.cat(frames, dim=2) if len(frames) > 1 else frames[0]

    _compiled = None

    def _frames(self, x: torch.Tensor, cache: Cache, windows: tuple, start: int, stop: int) -> torch.Tensor:
        """Latent frames of one call (one, as diffusers' _decode loop, or several, whole chunk) -> this strip's pixel
        rows; updates the causal caches (the resamples take several frames when traceable, as whole chunks make
        them)."""
        dec = self.model.decoder
        idx = [0]
        h = _cached_conv(dec.conv_in, x, cache, idx)
        h = dec.mid_block(h, feat_cache=cache, feat_idx=idx)  # whole frame: the attention is global
        offset = 0  # absolute row of h's first row, at the current resolution
        for stage, (lo, hi) in zip(self.stages, windows, strict=True):
            h = h[..., lo - offset : hi - offset, :]
            h = stage.run(h, cache, idx)
            offset = lo * stage.upsample
        lo = start * self.scale
        return h[..., lo - offset : lo - offset + (stop - start) * self.scale, :]
