"""Wan2.1 causal 3-D convolution with its spatial zero padding done inside the convolution kernel.

diffusers' `WanCausalConv3d.forward` pads its input in time *and* space with `F.pad` before every 3-D
convolution: one extra full copy of every activation, twice per residual block. Only the time padding has to
be explicit (it is one-sided: causal); the spatial padding is symmetric zero padding, which the convolution
kernel itself applies without a copy. Same arithmetic, different kernel: benchmarks/wan_decode_bench.py
measured the Pro chunk decode 465 -> 425 ms (375 ms with channels-last weights) on one H200.

The switch changes the class of individual module instances (`set_kernel_padding`), never diffusers' class:
two models in one process do not affect each other, and switching off restores the stock forward. The
swapped instances are still `WanCausalConv3d`s with the same weights, so the strip decoder / encoder
(flashhead.parallel) and state dicts see no difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
from torch import nn


def causal_time_context(conv: WanCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None) -> torch.Tensor:
    """`x` with the causal time context of `conv` in front (cached frames, else zeros); no spatial padding."""
    # _padding = (w, w, h, h, 2t, 0) as diffusers builds it; the cache rules below are diffusers' own: a cache
    # is used only by convolutions that look back in time, and it replaces that many zero frames.
    front = conv._padding[4]
    if cache_x is not None and front > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        front -= cache_x.shape[2]
    if front > 0:
        x = F.pad(x, (0, 0, 0, 0, front, 0))
    elif front < 0:  # a cache longer than the context: F.pad with a negative width crops, as in diffusers
        x = x[:, :, -front:]
    return x


class KernelPaddedCausalConv3d(WanCausalConv3d):
    """`WanCausalConv3d` whose spatial padding is the convolution's own; the causal time context is unchanged.

    Not built directly: `set_kernel_padding` turns existing convolutions into this class and back.
    """

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        spatial = (0, self._padding[2], self._padding[0])
        x = causal_time_context(self, x, cache_x)
        return F.conv3d(x, self.weight, self.bias, self.stride, spatial, self.dilation, self.groups)


def set_kernel_padding(model: nn.Module, on: bool) -> int:
    """Turn every Wan causal convolution of `model` into the kernel-padded one (`on`) or back; returns how many.

    Models without Wan causal convolutions (the LTX VAE) are left as they are (0).
    """
    return swap_class(model, WanCausalConv3d, KernelPaddedCausalConv3d, on)


def swap_class(model: nn.Module, stock: type, variant: type, on: bool) -> int:
    """Give every module of `model` that is exactly `stock` or `variant` the class `variant` (`on`) or `stock`.

    The per-instance switch of this package's Wan layer variants (same weights, another forward); returns how many.
    """
    target = variant if on else stock
    count = 0
    for module in model.modules():
        if type(module) in (stock, variant):
            module.__class__ = target
            count += 1
    return count
