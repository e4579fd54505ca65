"""The self-attention's q / k RMS norm and RoPE rotation as one Triton kernel that reads each row once.

`apply_rope(norm(x).unflatten(-1, (heads, -1)), table)` for x (B, L, dim) and a float32 RoPE table (L, 1, d / 2, 2, 2)
of `rope_table`. Compiled, Inductor already fuses q's and k's norms and rotations into one kernel, but that kernel ran
at ~1.6 of an H200's 4.8 TB/s (batch 20 Lite: 191 us per block for ~314 MB; session 35, run 118): the rotation reads
each row at its channels and again at their pair partners, and the table per token. This kernel loads a row once,
splits it into (even, odd) channel pairs in registers, and writes the rotated row once. Run 120 (H200, one compiled
block in a CUDA graph): Lite at batch 20 the q and k kernels 200.7 -> 107.3 us (~2.9 TB/s), the block 4.309 -> 4.229 ms
(MFU 55.6 -> 56.7 %); Pro 71.6 -> 46.1 us, the block 2.288 -> 2.264 ms (57.2 -> 57.8 %).

The arithmetic is the eager path's: the norm in float32, rounded to x's dtype, times the weight and rounded again,
then each pair rotated in float32 (re * cos + im * -sin, im * cos + re * sin) and rounded. Only the order of the
row's sum of squares (a tree in the kernel) and the fusing of products into FMAs may differ, so a rotated value can
land an ulp or two from the eager one (1-2 values in 100,000 on the device): a reassociating speed switch
(`fused_qk_rope`), checked on the GPU.

It is a custom op so that torch.compile keeps it as one opaque call inside the compiled block. Off CUDA, or without
Triton, it is the plain composition.
"""

from __future__ import annotations

import functools

import torch


def reference(x: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """The eager composition (B, L, dim) -> (B, L, heads, dim / heads): RMSNorm, then RoPE with the real table."""
    from flashhead.models.dit import apply_rope

    normed = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return apply_rope(normed.unflatten(-1, (heads, -1)), table)


@functools.cache
def triton_kernel():
    """The Triton kernel, or None where Triton does not import (it compiles at its first launch)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def qk_norm_rope_kernel(
        x_ptr, w_ptr, table_ptr, out_ptr, tokens, eps,
        DIM: tl.constexpr, HEAD_DIM: tl.constexpr, PAIRS: tl.constexpr,
    ):  # fmt: skip
        # One program per row (b, l): its DIM channels as PAIRS (even, odd) pairs, DIM // 2 of them real.
        row = tl.program_id(0).to(tl.int64)
        pair = tl.arange(0, PAIRS)
        real = pair < DIM // 2
        channels = tl.join(2 * pair, 2 * pair + 1)  # (PAIRS, 2): the even and the odd channel of each pair
        mask = tl.join(real, real)
        x = tl.load(x_ptr + row * DIM + channels, mask=mask, other=0.0).to(tl.float32)
        inverse_rms = tl.rsqrt(tl.sum(tl.sum(x * x, axis=1), axis=0) / DIM + eps)
        w = tl.load(w_ptr + channels, mask=mask, other=0.0).to(tl.float32)
        # Rounded to x's dtype, then times the weight and rounded again, as the eager norm (a product of two bf16
        # values is exact in float32, so this float32 product rounds as a bf16 one would).
        normed = (x * inverse_rms).to(out_ptr.dtype.element_ty).to(tl.float32) * w
        normed = normed.to(out_ptr.dtype.element_ty).to(tl.float32)
        re, im = tl.split(normed)
        # The table row of this token: per pair (cos, cos, -sin, sin), the same for every head.
        phasor = table_ptr + (row % tokens) * (2 * HEAD_DIM) + (pair % (HEAD_DIM // 2)) * 4
        cos = tl.load(phasor, mask=real, other=0.0)
        minus_sin = tl.load(phasor + 2, mask=real, other=0.0)
        sin = tl.load(phasor + 3, mask=real, other=0.0)
        rotated = tl.join(re * cos + im * minus_sin, im * cos + re * sin)
        tl.store(out_ptr + row * DIM + channels, rotated.to(out_ptr.dtype.element_ty), mask=mask)

    return qk_norm_rope_kernel


def launch(x: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """Run the Triton kernel on x (B, L, dim) contiguous; (B, L, heads, dim / heads) out. Needs Triton."""
    kernel = triton_kernel()
    if kernel is None:
        raise RuntimeError("the fused q / k norm + RoPE kernel needs Triton")
    B, L, dim = x.shape
    head_dim = dim // heads
    if table.dtype != torch.float32 or tuple(table.shape) != (L, 1, head_dim // 2, 2, 2):
        raise ValueError(f"expected a float32 RoPE table ({L}, 1, {head_dim // 2}, 2, 2), got {table.dtype} "
                         f"{tuple(table.shape)}")  # fmt: skip
    x, table = x.contiguous(), table.contiguous()
    out = torch.empty_like(x)
    pairs = 1 << (dim // 2 - 1).bit_length()  # the pair count rounded up to a power of two (Triton's block sizes)
    kernel[(B * L,)](x, weight, table, out, L, eps, DIM=dim, HEAD_DIM=head_dim, PAIRS=pairs, num_warps=4)
    return out.unflatten(-1, (heads, head_dim))


@torch.library.custom_op("flashhead::qk_norm_rope", mutates_args=())
def qk_norm_rope(x: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """RMS norm of x (B, L, dim) with `weight`, split into heads and rotated by the float32 RoPE table."""
    if x.is_cuda and table.dtype == torch.float32 and triton_kernel() is not None:
        return launch(x, weight, table, heads, eps)
    return reference(x, weight, table, heads, eps)


@qk_norm_rope.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], heads, x.shape[-1] // heads))
