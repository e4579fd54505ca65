"""Exact Wan2.1 encode split into horizontal strips, for the motion-frame re-encode of the Pro pipeline.

The mirror of `wan_decode`. The Wan2.1 encoder (diffusers `WanEncoder3d`) convolves (zero padding, causal caches
in time), normalises per position and downsamples by strided convolutions; its one global operation is the
self-attention of the mid block, at latent resolution. So a rank can compute exactly the latent-resolution
features of latent rows [a, b) that enter the mid block:

1. conv_in and the down blocks run on the pixel rows those features need: working back from [a, b), a stride-1
   layer widens its output rows by its row radius, a strided one maps output row j to its input rows
   [s * j - top, s * j - top + k) (k: kernel, top: zero rows padded above), clipped to the frame. Rows beyond
   that margin are wrong (zero padding instead of neighbours) and cropped before they matter;
2. the features of all ranks are gathered (`parallel.vae.split_encode`), then the mid block, the head and
   quant_conv run on the whole (small) feature map, as in the one-process encode;
3. each strip keeps its own causal caches: every frame chunk crops the same rows.

Margins come from the module structure (`WanStripEncoder` refuses layers it does not know), so they are the
exact receptive field, not a guessed halo.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample, WanResidualBlock
from torch import nn

from flashhead.errors import ConfigError
from flashhead.parallel.wan_decode import Cache, _cached_conv, _conv_rows, keep_cache_layout, strip_step

FRAMES_PER_CHUNK = 4  # the encoder's time chunks after the first frame, as diffusers' _encode


@dataclass(frozen=True)
class DownStage:
    """One encoder layer run on a row window: output row j reads input rows [stride * j - above, ... + below]."""

    run: Callable[[torch.Tensor, Cache, list[int]], torch.Tensor]
    above: int
    below: int
    stride: int = 1


def _strided_rows(layer: WanResample) -> tuple[int, int, int]:
    """(above, below, stride) in rows of a Wan downsampling layer: ZeroPad2d then a strided Conv2d."""
    pad, conv = layer.resample
    if not isinstance(pad, nn.ZeroPad2d) or not isinstance(conv, nn.Conv2d):
        raise ConfigError(f"Wan strip encode: unknown downsampling {[type(m).__name__ for m in layer.resample]}")
    top = pad.padding[2] + conv.padding[0]
    kernel, stride = conv.kernel_size[0], conv.stride[0]
    if top >= kernel or stride > kernel:
        raise ConfigError(f"Wan strip encode: downsampling conv with kernel {kernel}, stride {stride}, top {top}")
    if layer.mode == "downsample3d" and layer.time_conv.kernel_size[1:] != (1, 1):
        raise ConfigError("Wan strip encode: the temporal downsampling conv mixes pixels")
    return top, kernel - 1 - top, stride


def _stages(model: AutoencoderKLWan) -> list[DownStage]:
    """conv_in and the down blocks, in call order, with their row geometry."""
    enc = model.encoder
    r = _conv_rows(enc.conv_in)
    stages = [DownStage(lambda x, cache, idx: _cached_conv(enc.conv_in, x, cache, idx), r, r)]
    for layer in enc.down_blocks:
        if isinstance(layer, WanResidualBlock):
            if _conv_rows(layer.conv_shortcut):
                raise ConfigError("Wan strip encode: a residual shortcut that mixes rows")
            r = _conv_rows(layer.conv1) + _conv_rows(layer.conv2)
            stages.append(DownStage(layer, r, r))
        elif isinstance(layer, WanResample) and layer.mode in ("downsample2d", "downsample3d"):
            stages.append(DownStage(layer, *_strided_rows(layer)))
        else:  # attention inside a level (attn_scales) is global; Wan2.2 has residual down blocks
            raise ConfigError(f"Wan strip encode supports the Wan2.1 encoder, not {type(layer).__name__}")
    return stages


def row_windows(stages: list[DownStage], rows: int, start: int, stop: int) -> list[tuple[int, int]]:
    """For latent rows [start, stop) of a `rows`-row feature map: the input row window of every stage.

    Works back from [start, stop): a stage whose output must be right on rows [lo, hi) reads rows
    [stride * lo - above, stride * (hi - 1) + below + 1) of its input, clipped to the frame; the start is
    rounded down to a multiple of the stride so that output rows keep their place.
    """
    lo, hi, height = start, stop, rows
    windows = []
    for s in reversed(stages):
        height *= s.stride  # the stage's input rows
        lo = max(0, s.stride * lo - s.above) // s.stride * s.stride
        hi = min(height, s.stride * (hi - 1) + s.below + 1)
        windows.append((lo, hi))
    return windows[::-1]


class WanStripEncoder:
    """The Wan2.1 encode with the part before the mid block computed on a strip of latent rows."""

    def __init__(self, model: AutoencoderKLWan):
        if model.config.patch_size is not None:
            raise ConfigError("Wan strip encode: patchified (Wan2.2) VAEs are not supported")
        self.model = model
        self.stages = _stages(model)
        self.scale = math.prod(s.stride for s in self.stages)  # pixel rows per latent row

    @staticmethod
    def chunks(frames: int) -> list[slice]:
        """The encoder's time chunks: the first frame alone, then FRAMES_PER_CHUNK at a time."""
        return [slice(0, 1)] + [slice(i, i + FRAMES_PER_CHUNK) for i in range(1, frames, FRAMES_PER_CHUNK)]

    @torch.no_grad()
    def features(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1] -> mid-block input rows [start, stop): (B, C, T', stop - start, W / 8)."""
        rows = x.shape[-2] // self.scale
        windows = tuple(row_windows(self.stages, rows, start, stop))
        cache: Cache = [None] * (2 * len(self.stages) + 1)  # upper bound: at most two causal convs per stage
        # compile_vae compiles the encoder module of a one-GPU encode; the strip encode calls the encoder's parts,
        # so it compiles its own per-chunk step (a graph for the first frame, one for the 4-frame chunks).
        step, layout = strip_step(self, self.model.encoder, self._chunk)
        out = []
        for chunk in self.chunks(x.shape[2]):
            out.append(step(x[:, :, chunk], cache, windows, start, stop))
            keep_cache_layout(cache, layout)
        return torch.cat(out, dim=2)

    _compiled = None
    _compiled_finish = None

    def _chunk(self, h: torch.Tensor, cache: Cache, windows: tuple, start: int, stop: int) -> torch.Tensor:
        """One time chunk (as diffusers' _encode loop) -> this strip's mid-block input rows; updates the caches."""
        idx = [0]
        offset = 0  # absolute row of h's first row, at the current resolution
        for stage, (lo, hi) in zip(self.stages, windows, strict=True):
            h = stage.run(h[..., lo - offset : hi - offset, :], cache, idx)
            offset = lo // stage.stride
        return h[..., start - offset : stop - offset, :]

    @torch.no_grad()
    def finish(self, features: torch.Tensor) -> torch.Tensor:
        """Whole mid-block input (B, C, T', H', W') -> raw posterior mean (B, z, T', H', W'), as diffusers' encode."""
        enc = self.model.encoder
        cache: Cache = [None] * (2 * len(enc.mid_block.resnets) + 1)
        # Compiled like the strips (compile_vae): eager, this tail launched ~3 ms of small kernels per Pro chunk
        # (session-10 trace) on every rank, where the one-GPU encode runs it inside its compiled graph.
        step, layout = strip_step(self, enc, self._finish_frame, "_compiled_finish")
        out = []
        for i in range(features.shape[2]):  # one latent frame per encoder chunk, with their causal caches
            out.append(step(features[:, :, i : i + 1], cache))
            keep_cache_layout(cache, layout)
        moments = self.model.quant_conv(torch.cat(out, dim=2))
        return moments.chunk(2, dim=1)[0]  # DiagonalGaussianDistribution's mean

    def _finish_frame(self, h: torch.Tensor, cache: Cache) -> torch.Tensor:
        """One latent frame through the mid block, norm_out and conv_out; updates the caches."""
        enc, idx = self.model.encoder, [0]
        h = enc.mid_block(h, feat_cache=cache, feat_idx=idx)
        return _cached_conv(enc.conv_out, enc.nonlinearity(enc.norm_out(h)), cache, idx)
