"""q / k RMSNorm and RoPE in one Triton kernel (the DiT self-attention's projections, before attention).

`apply_rope(RMSNorm(x).unflatten(-1, (heads, -1)), table)` with the real float64 table of `rope_table`: per token
the float32 sum of squares over all channels, the normalised value rounded to x's dtype and times the weight
(rounded again), then each channel pair rotated in float64 and rounded once more, the roundings of the
composition. Compiled, the composition was one reduction kernel at a fraction of the memory bandwidth (Pro on
one H200: 131 us per layer for q and k); here a program owns one token: it reads the token's channels, the weight
and the token's RoPE row once and writes the rotated heads once.

Where the heads go is a `HeadLayout`: (B, L, heads, d) for one GPU, or the send buffers of the sequence-parallel
self-attention (heads grouped by rank and head group, this rank's block last), so that the kernel writes them
there directly; the kernel can also copy v into the second slot of a k / v send buffer.

Custom ops, so that torch.compile keeps each one call. Without CUDA or Triton they run the composition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs run the composition.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


@dataclass(frozen=True)
class HeadLayout:
    """Where head h = (j * groups + g) * per_group + i of a token goes, relative to the token's place.

    Element offset i * stride_i + g * stride_g + p(j) * stride_j, where p(j) = j, or with `own_last` = r:
    rank r's block last and the others in rank order before it (j < r: j, j > r: j - 1, r: ranks - 1).
    """

    per_group: int
    groups: int = 1
    stride_i: int = 0
    stride_g: int = 0
    stride_j: int = 0
    own_last: int = -1
    ranks: int = 1

    @classmethod
    def contiguous(cls, heads: int, head_dim: int) -> HeadLayout:
        return cls(per_group=heads, stride_i=head_dim)


def reference(x: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, eps: float, heads: int) -> torch.Tensor:
    """The composition the kernel computes: (B, L, C) -> (B, L, heads, C / heads)."""
    from flashhead.models.dit import RMSNorm, apply_rope

    inverse_rms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return apply_rope(RMSNorm.scale(x, inverse_rms, weight).unflatten(-1, (heads, -1)), table)


if triton is not None:

    @triton.jit
    def _rms_norm_rope_kernel(
        x_ptr, w_ptr, table_ptr, out_ptr, v_ptr,
        tokens, x_stride_b, x_stride_t, v_stride_b, v_stride_t, table_stride_t, out_stride_b, out_stride_t, v_slot,
        per_group, groups, stride_i, stride_g, stride_j, own_last, ranks, eps,
        HEADS: tl.constexpr, HEADS_P2: tl.constexpr, PAIRS: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0)
        b, t = row // tokens, row % tokens
        head = tl.arange(0, HEADS_P2)[:, None]
        channel = tl.arange(0, 2 * PAIRS)[None, :]
        mask = (head < HEADS) & (channel < 2 * PAIRS)
        offsets = head * (2 * PAIRS) + channel
        x = tl.load(x_ptr + b * x_stride_b + t * x_stride_t + offsets, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        inverse_rms = tl.rsqrt(tl.sum(tl.sum(xf * xf, axis=1), axis=0) / (HEADS * 2 * PAIRS) + eps)
        weight = tl.load(w_ptr + offsets, mask=mask, other=0.0)
        # RMSNorm.scale: (x.float() * 1/rms) in x's dtype, times the weight in x's dtype.
        normed = (xf * inverse_rms).to(x.dtype).to(tl.float32) * weight.to(tl.float32)
        normed = normed.to(x.dtype).to(tl.float64)
        re, im = tl.split(tl.reshape(normed, (HEADS_P2, PAIRS, 2)))
        # rope_table row: per pair (cos, cos, -sin, sin), float64.
        phasor = table_ptr + t * table_stride_t + 4 * tl.arange(0, PAIRS)[None, :]
        cos, minus_sin, sin = tl.load(phasor), tl.load(phasor + 2), tl.load(phasor + 3)
        rotated = tl.interleave(re * cos + im * minus_sin, im * cos + re * sin)  # (HEADS_P2, 2 * PAIRS)
        i = head % per_group
        g = (head // per_group) % groups
        j = head // (per_group * groups)
        if own_last >= 0:
            j = tl.where(j == own_last, ranks - 1, tl.where(j > own_last, j - 1, j))
        place = out_ptr + b * out_stride_b + t * out_stride_t + i * stride_i + g * stride_g + j * stride_j + channel
        # float64 -> float32 -> out's dtype: torch's own double-to-bfloat16 cast goes through float too.
        tl.store(place, rotated.to(tl.float32).to(out_ptr.dtype.element_ty), mask=mask)
        if v_ptr is not None:  # v of the token into the other slot of the same layout
            v = tl.load(v_ptr + b * v_stride_b + t * v_stride_t + offsets, mask=mask, other=0.0)
            tl.store(place + v_slot, v.to(out_ptr.dtype.element_ty), mask=mask)


def kernel_available(x: torch.Tensor, table: torch.Tensor) -> bool:
    """Whether the Triton kernel runs for these inputs (CUDA, Triton, the real float64 table)."""
    return triton is not None and x.is_cuda and table.dtype == torch.float64 and table.dim() == 5


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    table: torch.Tensor,
    eps: float,
    heads: int,
    out: torch.Tensor,
    token_strides: tuple[int, int],
    layout: HeadLayout,
    v: torch.Tensor | None = None,
    v_slot: int = 0,
) -> None:
    """Normalise and rotate the heads of x (B, L, C) into `out` (a tensor whose data starts at batch 0, token 0).

    `token_strides`: the element strides of a batch and a token in `out`; `layout`: the heads' offsets from a
    token's place. With `v` (B, L, C), v's heads go to the same places + `v_slot` elements, unchanged.
    """
    B, L, C = x.shape
    pairs = C // heads // 2
    if x.stride(-1) != 1 or tuple(table.shape[:3]) != (L, 1, pairs) or not table.is_contiguous():
        raise ValueError(f"rms_norm_rope: unsupported layout x {tuple(x.shape)} / table {tuple(table.shape)}")
    if v is not None and (v.shape != x.shape or v.stride(-1) != 1):
        raise ValueError(f"rms_norm_rope: v {tuple(v.shape)} does not match x {tuple(x.shape)}")
    _rms_norm_rope_kernel[(B * L,)](
        x, weight, table, out, v,
        L, x.stride(0), x.stride(1), v.stride(0) if v is not None else 0, v.stride(1) if v is not None else 0,
        table.stride(0), token_strides[0], token_strides[1], v_slot,
        layout.per_group, layout.groups, layout.stride_i, layout.stride_g, layout.stride_j, layout.own_last,
        layout.ranks, eps,
        HEADS=heads, HEADS_P2=triton.next_power_of_2(heads), PAIRS=pairs, num_warps=4,
    )  # fmt: skip


@torch.library.custom_op("flashhead::rms_norm_rope", mutates_args=())
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, eps: float, heads: int) -> torch.Tensor:
    """RMSNorm (weight, eps) of x (B, L, C), split into heads and rotated by the rope_table -> (B, L, heads, d)."""
    if not kernel_available(x, table):
        return reference(x, weight, table, eps, heads)
    B, L, C = x.shape
    out = x.new_empty((B, L, heads, C // heads))
    launch(x, weight, table, eps, heads, out, (out.stride(0), out.stride(1)), HeadLayout.contiguous(heads, C // heads))
    return out


@rms_norm_rope.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, eps: float, heads: int) -> torch.Tensor:
    B, L, C = x.shape
    return x.new_empty((B, L, heads, C // heads))


# The sequence-parallel send buffers (flashhead.parallel.attention.kv_first_self_attention): for N ranks and G head
# groups of hg heads, rank j's group g holds heads (j * G + g) * hg + [0, hg).


def _by_group_and_rank(t: torch.Tensor, ranks: int, groups: int) -> torch.Tensor:
    B, s, H, d = t.shape
    return t.reshape(B, s, ranks, groups, H // ranks // groups, d).permute(3, 2, 1, 0, 4, 5)


def kv_send_reference(k, v, weight, table, eps: float, heads: int, ranks: int, groups: int) -> torch.Tensor:
    """What `rms_norm_rope_kv_send` computes, by the composition and a stack."""
    B, s, C = k.shape
    k = reference(k, weight, table, eps, heads)
    send = torch.stack([_by_group_and_rank(t, ranks, groups) for t in (k, v.unflatten(-1, (heads, -1)))], dim=3)
    return send.reshape(groups, ranks * s, 2, B, heads // ranks // groups, C // heads)


def q_send_reference(q, weight, table, eps: float, heads: int, ranks: int, groups: int, rank: int) -> torch.Tensor:
    """What `rms_norm_rope_q_send` computes, by the composition and a stack."""
    blocks = _by_group_and_rank(reference(q, weight, table, eps, heads), ranks, groups)
    return torch.stack([blocks[:, j] for j in range(ranks) if j != rank] + [blocks[:, rank]], dim=1)


def kv_send_kernel(k, v, weight, table, eps: float, heads: int, ranks: int, groups: int) -> torch.Tensor:
    """`rms_norm_rope_kv_send` by the Triton kernel: k rotated into slot 0 of each place, v copied into slot 1."""
    B, s, C = k.shape
    out = k.new_empty((groups, ranks * s, 2, B, heads // ranks // groups, C // heads))
    o = out.stride()
    layout = HeadLayout(heads // ranks // groups, groups, stride_i=o[4], stride_g=o[0], stride_j=s * o[1], ranks=ranks)
    launch(k, weight, table, eps, heads, out, (o[3], o[1]), layout, v=v, v_slot=o[2])
    return out


def q_send_kernel(q, weight, table, eps: float, heads: int, ranks: int, groups: int, rank: int) -> torch.Tensor:
    """`rms_norm_rope_q_send` by the Triton kernel."""
    B, s, C = q.shape
    out = q.new_empty((groups, ranks, s, B, heads // ranks // groups, C // heads))
    o = out.stride()
    layout = HeadLayout(
        heads // ranks // groups, groups, stride_i=o[4], stride_g=o[0], stride_j=o[1], own_last=rank, ranks=ranks
    )
    launch(q, weight, table, eps, heads, out, (o[3], o[2]), layout)
    return out


@torch.library.custom_op("flashhead::rms_norm_rope_kv_send", mutates_args=())
def rms_norm_rope_kv_send(
    k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, eps: float, heads: int,
    ranks: int, groups: int,
) -> torch.Tensor:  # fmt: skip
    """k normalised and rotated, and v, of a shard (B, s, C) -> (G, N * s, 2, B, hg, d): per group the k / v of
    every rank's heads in rank order, the all-to-all's send buffer."""
    if not kernel_available(k, table):
        return kv_send_reference(k, v, weight, table, eps, heads, ranks, groups)
    return kv_send_kernel(k, v, weight, table, eps, heads, ranks, groups)


@rms_norm_rope_kv_send.register_fake
def _(k, v, weight, table, eps, heads, ranks, groups):
    B, s, C = k.shape
    return k.new_empty((groups, ranks * s, 2, B, heads // ranks // groups, C // heads))


@torch.library.custom_op("flashhead::rms_norm_rope_q_send", mutates_args=())
def rms_norm_rope_q_send(
    q: torch.Tensor, weight: torch.Tensor, table: torch.Tensor, eps: float, heads: int, ranks: int, groups: int,
    rank: int,
) -> torch.Tensor:  # fmt: skip
    """q normalised and rotated, of a shard (B, s, C) -> (G, N, s, B, hg, d): per group the other ranks' heads in
    rank order, then this rank's own (the part that stays)."""
    if not kernel_available(q, table):
        return q_send_reference(q, weight, table, eps, heads, ranks, groups, rank)
    return q_send_kernel(q, weight, table, eps, heads, ranks, groups, rank)


@rms_norm_rope_q_send.register_fake
def _(q, weight, table, eps, heads, ranks, groups, rank):
    B, s, C = q.shape
    return q.new_empty((groups, ranks, s, B, heads // ranks // groups, C // heads))
