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

The decoder's last convolution (96 -> 3 channels, 3x3x3, at the full 512x512) is a poor fit for cuDNN's kernels,
whose output tiles are 64 or more channels wide: it ran at ~17 TFLOP/s (0.96 ms a call, 8-9 calls per Pro chunk,
on an H100; zero-padding the 3 outputs did not help). `TapSumCausalConv3d` (the `vae_conv_out_gemm` switch)
computes it as one GEMM of every input pixel with the 3 x 27 taps, (81, 96) x (96, pixels), and a sum of the 27
shifted tap planes, which torch.compile fuses into one memory-bound kernel. Same products, summed in another order.

`CutlassCausalConv3d` (the `vae_cutlass_conv` switch) runs a kernel-padded convolution through
flashhead.models.vae.cutlass_conv: per shape the fastest of CUTLASS's Hopper kernels (96-channel-wide tiles among
them) and cuDNN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
from torch import nn

from flashhead.models.vae.cutlass_conv import conv3d_ndhwc


def causal_time_cache(conv: WanCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """`x` with the cached frames of `conv`'s causal time context in front, and how many zero frames it still lacks."""
    # _padding = (w, w, h, h, 2t, 0) as diffusers builds it; the cache rules below are diffusers' own: a cache
    # is used only by convolutions that look back in time, and it replaces that many zero frames.
    front = conv._padding[4]
    if cache_x is not None and front > 0:
        x = torch.cat([cache_x.to(x.device), x], dim=2)
        front -= cache_x.shape[2]
    if front < 0:  # a cache longer than the context: cropped, as diffusers' F.pad with a negative width does
        x, front = x[:, :, -front:], 0
    return x, front


def causal_time_context(conv: WanCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None) -> torch.Tensor:
    """`x` with the causal time context of `conv` in front (cached frames, else zeros); no spatial padding."""
    x, front = causal_time_cache(conv, x, cache_x)
    return F.pad(x, (0, 0, 0, 0, front, 0)) if front > 0 else x


class KernelPaddedCausalConv3d(WanCausalConv3d):
    """`WanCausalConv3d` whose spatial padding is the convolution's own; the causal time context is unchanged.

    Not built directly: `set_kernel_padding` turns existing convolutions into this class and back.
    """

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        spatial = (0, self._padding[2], self._padding[0])
        x = causal_time_context(self, x, cache_x)
        return F.conv3d(x, self.weight, self.bias, self.stride, spatial, self.dilation, self.groups)


class CutlassCausalConv3d(KernelPaddedCausalConv3d):
    """A kernel-padded convolution through `conv3d_ndhwc` (CUTLASS or cuDNN, whichever is faster per shape).

    Not built directly: `set_cutlass_conv` turns eligible kernel-padded convolutions into this class and back.
    """

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        # The zero frames in front are the kernel's padding (no padded copy: a chunk's first call, and every layer of
        # a whole-chunk decode). Channels-last here, in the traced code: compiled, the kernel producing x writes that
        # layout (an input converted inside the opaque op would be a copy of its own).
        x, front = causal_time_cache(self, x, cache_x)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        out = conv3d_ndhwc(x, self.weight, None, [front, 0, self._padding[2], self._padding[0]])
        # The bias outside the kernel: compiled, it fuses into the next kernel (as for cuDNN's convolutions).
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1, 1)


class TapSumCausalConv3d(WanCausalConv3d):
    """A stride-1 `WanCausalConv3d` as one GEMM over the input channels and a sum of shifted per-tap outputs.

    Worth it only where the output is narrow (a few channels) and the input wide; `set_tap_sum` picks the layer.
    """

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        x, front = causal_time_cache(self, x, cache_x)
        n, c, t_x, h, w = x.shape
        kt, kh, kw = self.kernel_size
        pw, ph = self._padding[0], self._padding[2]
        t_in = t_x + front  # the zero frames in front are padded on the tap planes below, not on the wider input
        t, h_out, w_out = t_in - kt + 1, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
        # (out * kt * kh * kw, c): a view for channels-last weights (vae_channels_last), else a small copy.
        taps = self.weight.permute(0, 2, 3, 4, 1).reshape(-1, c)
        # Each input pixel times every tap, tap-major (n, out * taps, t_x * h * w): the sum below then reads each
        # plane along rows (torch.matmul would fold n into the pixels and give pixel-major planes).
        planes = torch.bmm(taps.expand(n, -1, -1), x.flatten(2))
        # zero planes for the padding (a zero input's planes are zero): fused into the sum's loads when compiled
        planes = F.pad(planes.view(n, -1, t_x, h, w), (pw, pw, ph, ph, front, 0))
        planes = planes.view(n, self.out_channels, kt, kh, kw, t_in, h + 2 * ph, w + 2 * pw)
        out = 0.0 if self.bias is None else self.bias.float().view(1, -1, 1, 1, 1)
        for a in range(kt):
            for b in range(kh):
                for d in range(kw):  # output (i, j, k) gets tap (a, b, d) of input (i + a, j + b, k + d)
                    out = out + planes[:, :, a, b, d, a : a + t, b : b + h_out, d : d + w_out].float()
        return out.to(x.dtype)


def set_tap_sum(model: nn.Module, on: bool) -> int:
    """The Wan decoder's output convolution as `TapSumCausalConv3d` (`on`) or back; returns how many (0 or 1).

    Only that layer: its 3 output channels are what the GEMM form is for. Apply before `set_kernel_padding`, which
    leaves this class alone; switched off, the layer is diffusers' class again (kernel padding then applies to it).
    """
    conv = getattr(getattr(model, "decoder", None), "conv_out", None)
    if not isinstance(conv, WanCausalConv3d):
        return 0  # not a Wan VAE (the LTX VAE has no Wan convolutions)
    if conv.stride != (1, 1, 1) or conv.dilation != (1, 1, 1) or conv.groups != 1:
        return 0  # the tap sum is written for a plain stride-1 convolution (the Wan2.1 decoder's is one)
    if on:
        conv.__class__ = TapSumCausalConv3d
    elif type(conv) is TapSumCausalConv3d:
        conv.__class__ = WanCausalConv3d
    return 1


def set_kernel_padding(model: nn.Module, on: bool) -> int:
    """Turn every Wan causal convolution of `model` into the kernel-padded one (`on`) or back; returns how many.

    Models without Wan causal convolutions (the LTX VAE) are left as they are (0).
    """
    return swap_class(model, WanCausalConv3d, KernelPaddedCausalConv3d, on)


def set_cutlass_conv(model: nn.Module, on: bool) -> int:
    """Turn the kernel-padded convolutions of `model` into `CutlassCausalConv3d`s (`on`) or back; returns how many.

    Only stride-1, undilated, ungrouped ones with channel counts divisible by 8 (TMA's 16-byte alignment): every
    3x3x3, 3x1x1 and 1x1x1 convolution of the Wan2.1 VAE but its 3-channel output layer. Switch off before turning
    `set_kernel_padding` off (a CUTLASS layer is no stock or kernel-padded one, so that leaves it alone).
    """
    count = 0
    for module in model.modules():
        if on and type(module) is KernelPaddedCausalConv3d:
            fits = module.stride == (1, 1, 1) and module.dilation == (1, 1, 1) and module.groups == 1
            if fits and module.in_channels % 8 == 0 and module.out_channels % 8 == 0:
                module.__class__ = CutlassCausalConv3d
                count += 1
        elif not on and type(module) is CutlassCausalConv3d:
            module.__class__ = KernelPaddedCausalConv3d
            count += 1
    return count


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
