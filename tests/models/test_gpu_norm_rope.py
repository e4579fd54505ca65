"""The fused q / k RMSNorm + RoPE kernel on the GPU (run on the device): one kernel, the composition's values.

Shapes of the Pro DiT (9,216 tokens, 12 heads of 128) on one GPU and per rank on two (4,608). The kernel sums the
squares in another order than torch, so an element may differ from the composition by the rounding of the
normalised value: a few per million in bfloat16, never more than a unit in the last place. Times are printed.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from flashhead.models.dit import rope_table
from flashhead.models.norm_rope import HeadLayout, kernel_available, launch, reference, rms_norm_rope

pytestmark = pytest.mark.gpu


def cuda_kernels(fn) -> list[str]:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA"]


def time_us(fn, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeats * 1000


def assert_close_rotated(got: torch.Tensor, expected: torch.Tensor) -> None:
    """As close as two roundings of the same pair: the kernel sums the squares in another order, so a normalised
    value may round to the neighbouring one, and the rotation carries that to both channels of its pair. Bounded
    by the pair's length (rotation-invariant), not the element's (which may cancel to ~0)."""
    assert got.shape == expected.shape and got.dtype == expected.dtype
    bf16 = got.dtype == torch.bfloat16
    pair_length = expected.float().unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(*expected.shape[:-1], -1, 2)
    error = (got.float() - expected.float()).abs().flatten(-2)
    assert (error <= pair_length.flatten(-2) * (2**-7 if bf16 else 2**-20) + 1e-30).all()
    if bf16:  # and rarely: almost every element is the same bfloat16
        assert (got != expected).float().mean().item() <= 1e-3


TILINGS = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 4), (2, 8), (4, 4), (4, 8), (8, 8)]


@pytest.mark.parametrize("frames", [9, 5])  # 9 x 32 x 32 = 9,216 tokens (Pro); 5,120
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_the_composition(frames, dtype):
    torch.manual_seed(0)
    grid = (frames, 32, 32)
    L, heads, d = frames * 32 * 32, 12, 128
    table = rope_table(d, grid, torch.device("cuda"))
    x = (torch.randn(1, L, heads * d, device="cuda") * 3).to(dtype)
    weight = (torch.randn(heads * d, device="cuda") * 0.5 + 1).to(dtype)
    assert kernel_available(x, table)
    out = rms_norm_rope(x, weight, table, 1e-6, heads)
    compiled = torch.compile(reference, dynamic=False)
    assert_close_rotated(out, reference(x, weight, table, 1e-6, heads))
    assert_close_rotated(out, compiled(x, weight, table, 1e-6, heads))
    kernels = cuda_kernels(lambda: rms_norm_rope(x, weight, table, 1e-6, heads))
    assert len(kernels) == 1 and "rms_norm_rope" in kernels[0], kernels
    timings, layout = {}, HeadLayout.contiguous(heads, d)
    for tiling in TILINGS:  # every tiling computes the same values
        tiled = torch.empty_like(out)
        launch(x, weight, table, 1e-6, heads, tiled, (tiled.stride(0), tiled.stride(1)), layout, tiling=tiling)
        assert torch.equal(tiled, out), tiling
        timings[f"{tiling[0]}x{tiling[1]}"] = round(time_us(lambda t=tiling, o=tiled: launch(
            x, weight, table, 1e-6, heads, o, (o.stride(0), o.stride(1)), layout, tiling=t)), 1)  # fmt: skip
    composition_us = round(time_us(lambda: compiled(x, weight, table, 1e-6, heads)), 1)
    differing = (out != reference(x, weight, table, 1e-6, heads)).sum().item()
    print(json.dumps({"tokens": L, "dtype": str(dtype), "kernel_us_by_tokens_x_warps": timings,
                      "compiled_composition_us": composition_us, "differing_vs_eager": differing}))  # fmt: skip


@pytest.mark.parametrize("ranks, groups", [(2, 2), (2, 1), (4, 1)])
def test_send_buffers_hold_the_composition_in_their_order(ranks, groups):
    """The sequence-parallel ops: k (with v) and q written in the all-to-alls' send order, bfloat16, Pro's shard."""
    from flashhead.models.norm_rope import (
        kv_send_reference,
        q_send_reference,
        rms_norm_rope_kv_send,
        rms_norm_rope_q_send,
    )

    torch.manual_seed(0)
    s, heads, d = 9216 // ranks, 12, 128
    table = rope_table(d, (9, 32, 32), torch.device("cuda"))[:s].contiguous()
    k, v, q = (torch.randn(1, s, heads * d, device="cuda").bfloat16() * 3 for _ in range(3))
    weight = (torch.randn(heads * d, device="cuda") * 0.5 + 1).bfloat16()
    layout = {"heads": heads, "ranks": ranks, "groups": groups}

    kv = rms_norm_rope_kv_send(k, v, weight, table, 1e-6, **layout)
    assert_close_rotated(kv[:, :, 0], kv_send_reference(k, v, weight, table, 1e-6, **layout)[:, :, 0])
    assert torch.equal(kv[:, :, 1], kv_send_reference(k, v, weight, table, 1e-6, **layout)[:, :, 1])  # v as is
    for rank in range(ranks):
        assert_close_rotated(rms_norm_rope_q_send(q, weight, table, 1e-6, **layout, rank=rank),
                             q_send_reference(q, weight, table, 1e-6, **layout, rank=rank))  # fmt: skip
    kernels = cuda_kernels(lambda: rms_norm_rope_kv_send(k, v, weight, table, 1e-6, **layout))
    assert len(kernels) == 1 and "rms_norm_rope" in kernels[0], kernels
    kv_us = time_us(lambda: rms_norm_rope_kv_send(k, v, weight, table, 1e-6, **layout))
    q_us = time_us(lambda: rms_norm_rope_q_send(q, weight, table, 1e-6, **layout, rank=0))
    print(json.dumps({"ranks": ranks, "groups": groups, "kv_send_us": round(kv_us, 1), "q_send_us": round(q_us, 1)}))
