"""Wan2.1 upsampling layers: traceable by torch.compile in one graph, and optionally computed at low resolution.

diffusers' `WanResample` marks "the previous chunk was the first one" by storing the string "Rep" in the
feature cache, and tests for it with `feat_cache[idx] != "Rep"` / `== "Rep"`. When the entry is a tensor that
is a tensor-vs-string comparison, which returns NotImplemented: on torch 2.11 Dynamo breaks the graph there
("torch.* op returned non-Tensor", measured on the device). The break sits inside the decoder's loop, so
Dynamo skips the whole decoder frame and compiles every nested block forward on its own, one variant per
shape, until the recompile limit sends the rest to eager. Testing the marker by type (`isinstance(.., str)`)
is the same decision without the comparison.

Sub-pixel upsampling (the `vae_subpixel_upsample` switch): each upsampling layer doubles height and width by
nearest-neighbour copying and then applies a 3x3 convolution (padding 1) at the doubled size. Output row 2i + a
of that convolution reads the doubled rows 2i + a - 1 .. 2i + a + 1, which are copies of only two input rows, so
the three kernel rows fold onto two: rows (i - 1, i) with weights (w0, w1 + w2) for a = 0 and rows (i, i + 1)
with (w0 + w1, w2) for a = 1; the same along columns. That is a stride-2 transposed convolution with a 4x4
kernel of summed taps, run on the input before upsampling: 4/9 of the multiply-adds, and no 4x larger copy.
Only the summed weights round differently (they are summed in float64 and rounded once to the weights' dtype).

Like `wan_conv`, the switches change module instances only (their class, a non-persistent buffer), so other
models in the process keep diffusers' forward and state dicts are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import CACHE_T, WanResample
from torch import nn

# Tap k of the 4-tap transposed convolution (output position 2i - 1 + k reads input position i) sums these taps
# of the 3-tap convolution after nearest 2x upsampling.
FOLDED_TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))
# For the "phases" form: output phase a (rows 2i + a) reads padded input rows (i + a, i + a + 1) with these taps.
PHASE_TAPS = ((3, 1), (2, 0))
SUBPIXEL_METHODS = ("transpose", "phases")


def subpixel_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The (in, out, 4, 4) stride-2 transposed-convolution weight equal to nearest 2x upsampling + `conv` (3x3)."""
    w = conv.weight
    fold = torch.tensor(FOLDED_TAPS, dtype=torch.float64, device=w.device)
    return torch.einsum("ka,lb,oiab->iokl", fold, fold, w.detach().double()).to(w.dtype)


def phase_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The same taps as four 2x2 kernels stacked on the output channels: (4 * out, in, 2, 2), phase (a, b) at 2a + b."""
    folded = subpixel_weight(conv).transpose(0, 1)  # (out, in, 4, 4)
    return torch.cat([folded[:, :, PHASE_TAPS[a]][:, :, :, PHASE_TAPS[b]] for a in (0, 1) for b in (0, 1)])


def upsample_conv_transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Nearest 2x upsampling + 3x3 convolution (padding 1) of x (N, C, H, W), from the `subpixel_weight`."""
    return F.conv_transpose2d(x, weight, bias, stride=2, padding=1)


def upsample_conv_phases(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The same from the `phase_weight`: one 2x2 convolution for all four phases, then the phases interleaved."""
    n, _, h, w = x.shape
    out = weight.shape[0] // 4
    y = F.conv2d(x, weight, None if bias is None else bias.repeat(4), padding=1)  # (N, 4 * out, H + 1, W + 1)
    y = y.unflatten(1, (2, 2, out))
    rows = [torch.stack([y[:, a, b, :, a : a + h, b : b + w] for b in (0, 1)], dim=-1) for a in (0, 1)]
    return torch.stack(rows, dim=3).reshape(n, out, 2 * h, 2 * w)  # (N, out, H, 2, W, 2) -> (N, out, 2H, 2W)


class TraceableWanResample(WanResample):
    """`WanResample` whose upsample3d cache logic has no tensor-vs-string comparison; same arithmetic.

    With `subpixel` set ("transpose" or "phases"), the upsampling and its convolution run as one low-resolution
    convolution from the folded weights in the buffer `subpixel_weight` (see the module docstring).
    """

    subpixel: str | None = None

    def forward(self, x: torch.Tensor, feat_cache: list | None = None, feat_idx: list[int] = [0]) -> torch.Tensor:  # noqa: B006 (diffusers' signature)
        first = feat_cache is not None and feat_cache[feat_idx[0]] is None
        if self.mode == "downsample3d" and first and x.shape[2] > 1:
            return self.downsample_first_frames(x, feat_cache, feat_idx)
        if self.mode not in ("upsample2d", "upsample3d"):
            return super().forward(x, feat_cache, feat_idx)
        if self.mode == "upsample3d" and feat_cache is not None:
            x = self.upsample_time(x, feat_cache, feat_idx)
        b, c, t, h, w = x.shape
        frames = self.upsample_space(x.transpose(1, 2).reshape(b * t, c, h, w))
        return frames.view(b, t, *frames.shape[1:]).transpose(1, 2)

    def upsample_time(self, x: torch.Tensor, feat_cache: list, feat_idx: list[int]) -> torch.Tensor:
        b, c, t, h, w = x.shape
        idx = feat_idx[0]
        cached = feat_cache[idx]
        feat_idx[0] += 1
        if cached is None:  # the first chunk: no time upsampling, remember that it was seen
            feat_cache[idx] = "Rep"
            if t == 1:
                return x
            # Several frames in the first call (vae_whole_chunk): the first passes as diffusers' loop passes it, the
            # others are upsampled as that loop's later calls would upsample them.
            return torch.cat([x[:, :, :1], self.upsample_time(x[:, :, 1:], feat_cache, [idx])], dim=2)
        after_first = isinstance(cached, str)  # the "Rep" marker
        cache_x = x[:, :, -CACHE_T:].clone()
        if cache_x.shape[2] < 2:  # too short a chunk: the frame before it comes from the cache (or zeros)
            before = torch.zeros_like(cache_x) if after_first else cached[:, :, -1:].to(cache_x.device)
            cache_x = torch.cat([before, cache_x], dim=2)
        x = self.time_conv(x) if after_first else self.time_conv(x, cached)
        feat_cache[idx] = cache_x
        # time_conv doubles the channels: the two halves are the even and odd output frames.
        return torch.stack((x[:, :c], x[:, c:]), dim=3).reshape(b, c, 2 * t, h, w)

    def downsample_first_frames(self, x: torch.Tensor, feat_cache: list, feat_idx: list[int]) -> torch.Tensor:
        """An encoder's first call with several frames (vae_whole_chunk): diffusers' loop gives the first frame alone
        (kept as it is, and cached) and the next ones in later calls, each halved in time by a stride-2 convolution
        over the cached frame and its own; that is the convolution over all the frames."""
        b, c, t, h, w = x.shape
        x = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        x = x.view(b, t, *x.shape[1:]).transpose(1, 2)
        feat_cache[feat_idx[0]] = x[:, :, -1:].clone()
        feat_idx[0] += 1
        return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)

    def upsample_space(self, frames: torch.Tensor) -> torch.Tensor:
        if self.subpixel is None:
            return self.resample(frames)
        conv = self.resample[1]
        if self.subpixel_weight.is_contiguous(memory_format=torch.channels_last):
            # vae_channels_last: after the time upsampling's stack the frames are not; cuDNN's NHWC kernels want them
            frames = frames.contiguous(memory_format=torch.channels_last)
        if self.subpixel == "transpose":
            return upsample_conv_transposed(frames, self.subpixel_weight, conv.bias)
        return upsample_conv_phases(frames, self.subpixel_weight, conv.bias)


def set_traceable_resample(model: nn.Module, on: bool) -> int:
    """Turn every Wan resample layer of `model` into the traceable one (`on`) or back; returns how many.

    Layers with sub-pixel upsampling on stay traceable (their forward is this class's).
    """
    count = 0
    for module in model.modules():
        if type(module) in (WanResample, TraceableWanResample):
            keep = on or getattr(module, "subpixel", None) is not None
            module.__class__ = TraceableWanResample if keep else WanResample
            count += 1
    return count


def set_subpixel_upsample(model: nn.Module, on: bool, channels_last: bool = False, method: str = "transpose") -> int:
    """Sub-pixel upsampling (`on`) for every upsampling layer of `model`'s Wan resamples, or back; returns how many.

    The folded weights are computed here from the current weights (in their dtype, on their device) and move with
    the module; switch again after loading other weights or changing the dtype. `channels_last`: the folded
    weights, and so the convolution, in NHWC layout (as `vae_channels_last` puts the 3-D convolutions).
    """
    if method not in SUBPIXEL_METHODS:
        raise ValueError(f"method must be one of {SUBPIXEL_METHODS}, got {method!r}")
    count = 0
    for module in model.modules():
        if type(module) not in (WanResample, TraceableWanResample) or module.mode not in ("upsample2d", "upsample3d"):
            continue
        if on:
            module.__class__ = TraceableWanResample
            conv = module.resample[1]
            weight = subpixel_weight(conv) if method == "transpose" else phase_weight(conv)
            if channels_last:
                weight = weight.contiguous(memory_format=torch.channels_last)
            module.register_buffer("subpixel_weight", weight, persistent=False)
            module.subpixel = method
        elif isinstance(module, TraceableWanResample) and module.subpixel is not None:
            del module.subpixel  # back to the class attribute: None
            del module._buffers["subpixel_weight"]
        count += 1
    return count
