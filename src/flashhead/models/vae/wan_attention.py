"""The Wan2.1 VAE's middle-block self-attention as two GEMMs (the `vae_attention_gemm` switch).

diffusers' `WanAttentionBlock` attends over the pixels of each latent frame with one head of all 384 channels. No
flash kernel takes a head that wide (FlashAttention and cuDNN stop at 256), so PyTorch runs it through its
memory-efficient kernel at ~90 TFLOP/s (H200, Pro chunk: 9 calls, 2.65 ms). A latent frame has only 64 x 64 = 4,096
pixels, so the whole score matrix (64 MiB in float32) fits comfortably: scores by one GEMM with float32 output,
softmax in float32, probabilities rounded to the value dtype (as the fused kernels round them for their second
product), then one GEMM with the values. The same products, accumulated in float32 like the fused kernels'.

Like wan_conv, the switch changes the class of module instances only (`set_attention_gemm`); weights and state dicts
are unchanged, and other models in the process keep diffusers' forward.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock
from torch import nn

from .wan_conv import swap_class


def attention_by_gemms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (batch, tokens, d) tensors: float32 scores and softmax, output in v's dtype."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        scores = torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)  # half-precision products, float32 out
    else:  # the dtype overload of bmm is CUDA-only; the float32 upcast computes the same products
        scores = torch.bmm(q.float(), k.float().transpose(1, 2))
    probs = torch.softmax(scores * q.shape[-1] ** -0.5, dim=-1)
    return torch.bmm(probs.to(v.dtype), v)


class GemmWanAttentionBlock(WanAttentionBlock):
    """`WanAttentionBlock` with its attention computed by `attention_by_gemms`; same layers, same weights.

    Not built directly: `set_attention_gemm` turns existing blocks into this class and back.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))  # the attention acts per frame
        # (frames, 3c, pixels) -> q, k, v of (frames, pixels, c), as diffusers splits them
        q, k, v = self.to_qkv(frames).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        out = attention_by_gemms(q, k, v).transpose(1, 2).reshape(b * t, c, h, w)
        return self.proj(out).view(b, t, c, h, w).transpose(1, 2) + x


def set_attention_gemm(model: nn.Module, on: bool) -> int:
    """Turn every Wan attention block of `model` into `GemmWanAttentionBlock` (`on`) or back; returns how many.

    Models without Wan attention blocks (the LTX VAE) are left as they are (0).
    """
    return swap_class(model, WanAttentionBlock, GemmWanAttentionBlock, on)
