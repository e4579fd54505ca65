"""The fused FFN GELU on the GPU (run on the device): one cuBLASLt kernel instead of a GEMM and a GELU kernel.

Shapes of the Pro DiT's first FFN layer on one GPU (9,216 tokens) and on each of two (4,608). The fused output
is compared with the two-kernel path in float32, where only the GEMM's own rounding differs, and in bfloat16,
where the fused path rounds the activation once instead of twice. Times are printed, not asserted.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from _util import cuda_ms
from flashhead.models.linear_gelu import linear_gelu

pytestmark = pytest.mark.gpu


def unfused(x, w, b):
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def kernels(fn, *args) -> list[str]:
    fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type.name == "CUDA" and "memset" not in e.name.lower()]


@pytest.mark.parametrize("tokens", [9216, 4608])
def test_fused_gelu_is_one_kernel_and_matches_the_two_kernel_path(tokens):
    torch.manual_seed(0)
    dim, hidden = 1536, 8960
    x = torch.randn(1, tokens, dim, device="cuda")
    w = torch.randn(hidden, dim, device="cuda") / dim**0.5
    b = torch.randn(hidden, device="cuda") * 0.1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.testing.assert_close(linear_gelu(x, w, b), unfused(x, w, b), rtol=1e-4, atol=1e-4)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    fused, plain = linear_gelu(xb, wb, bb).float(), unfused(xb, wb, bb).float()
    exact = unfused(x, w, b)
    # Not further from float32 than the two-kernel bf16 path (one rounding of the activation instead of two).
    assert (fused - exact).abs().mean() <= (plain - exact).abs().mean() * 1.05
    assert (fused - plain).abs().max() <= 0.05
    fused_kernels, plain_kernels = kernels(linear_gelu, xb, wb, bb), kernels(unfused, xb, wb, bb)
    assert len(fused_kernels) == 1 and len(plain_kernels) == 2, (fused_kernels, plain_kernels)
    row = {"tokens": tokens, "fused_ms": cuda_ms(linear_gelu, xb, wb, bb),
           "two_kernels_ms": cuda_ms(unfused, xb, wb, bb), "fused_kernel": fused_kernels[0],
           "gpu": torch.cuda.get_device_name()}  # fmt: skip
    print(json.dumps(row))
