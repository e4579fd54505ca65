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
from flashhead.models.norm_rope import kernel_available, reference, rms_norm_rope

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
    expected = reference(x, weight, table, 1e-6, heads)
    compiled = torch.compile(reference, dynamic=False)
    expected_compiled = compiled(x, weight, table, 1e-6, heads)
    for other in (expected, expected_compiled):
        differ = out != other
        assert differ.float().mean().item() <= 1e-4
        tolerance = (other.float().abs() * (2**-7 if dtype == torch.bfloat16 else 2**-22)).clamp_min(1e-6)
        assert ((out.float() - other.float()).abs() <= tolerance).all()
    kernels = cuda_kernels(lambda: rms_norm_rope(x, weight, table, 1e-6, heads))
    assert len(kernels) == 1 and "rms_norm_rope" in kernels[0], kernels
    print(json.dumps({"tokens": L, "dtype": str(dtype), "kernel_us": round(time_us(
        lambda: rms_norm_rope(x, weight, table, 1e-6, heads)), 1),
        "compiled_composition_us": round(time_us(lambda: compiled(x, weight, table, 1e-6, heads)), 1),
        "differing_vs_eager": (out != expected).sum().item()}))  # fmt: skip


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

    def close(got, expected):
        assert got.shape == expected.shape
        assert (got != expected).float().mean().item() <= 1e-4
        torch.testing.assert_close(got, expected, rtol=2**-7, atol=1e-6)

    kv = rms_norm_rope_kv_send(k, v, weight, table, 1e-6, **layout)
    close(kv, kv_send_reference(k, v, weight, table, 1e-6, **layout))
    assert torch.equal(kv[:, :, 1], kv_send_reference(k, v, weight, table, 1e-6, **layout)[:, :, 1])  # v as is
    for rank in range(ranks):
        close(rms_norm_rope_q_send(q, weight, table, 1e-6, **layout, rank=rank),
              q_send_reference(q, weight, table, 1e-6, **layout, rank=rank))  # fmt: skip
    kernels = cuda_kernels(lambda: rms_norm_rope_kv_send(k, v, weight, table, 1e-6, **layout))
    assert len(kernels) == 1 and "rms_norm_rope" in kernels[0], kernels
