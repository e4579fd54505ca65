"""The fused_norm_rope switch: q / k RMSNorm and RoPE as one op (a Triton kernel on CUDA, the composition off it)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from _tiny import tiny_dit
from _util import OpLog, load_fixture, rel_l2
from flashhead.models.dit import RMSNorm, apply_rope, rope_table
from flashhead.models.norm_rope import kernel_available, rms_norm_rope
from flashhead.pipeline.fast_path import apply_module_switches
from flashhead.pipeline.speed import SpeedConfig


def inputs(dtype=torch.float32, heads=4, head_dim=16, grid=(2, 3, 4), seed=0):
    torch.manual_seed(seed)
    L = grid[0] * grid[1] * grid[2]
    x = (torch.randn(2, L, heads * head_dim) * 3).to(dtype)
    weight = (torch.randn(heads * head_dim) * 0.5 + 1).to(dtype)
    return x, weight, rope_table(head_dim, grid, torch.device("cpu"))


def test_the_op_is_rmsnorm_then_rope_with_its_roundings():
    x, weight, table = inputs(torch.bfloat16)
    norm = RMSNorm(x.shape[-1], eps=1e-6).to(torch.bfloat16)
    norm.weight.data.copy_(weight)
    expected = apply_rope(norm(x).unflatten(-1, (4, -1)), table)
    out = rms_norm_rope(x, weight, table, 1e-6, 4)
    assert out.shape == (2, 24, 4, 16) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # The eps and the weight are used: other values change the result.
    assert not torch.equal(rms_norm_rope(x, weight * 2, table, 1e-6, 4), out)
    assert not torch.equal(
        rms_norm_rope(x * 1e-4, weight, table, 1e-2, 4), rms_norm_rope(x * 1e-4, weight, table, 1e-6, 4)
    )
    assert not kernel_available(x, table)  # CPU: the composition ran


def run_with_table(model, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The parity fixture's first case through the DiT with the real RoPE table (what rope_table switches on)."""
    t, _ = load_fixture(f"parity_dit_{variant}_tiny")
    with torch.no_grad():
        tokens, grid = model.patchify(t["case1/x"], t["case1/y"])
        time, t_mod = model.embed_time(t["case1/timestep"], tokens.shape[0], tokens.dtype)
        audio = model.embed_audio(t["case1/context"], tokens.dtype)
        rope = model.rope(grid, tokens.device, table=True)
        return model.forward_tokens(tokens, grid, time, t_mod, audio, rope), t["case1/output"]


@pytest.mark.parametrize("variant", ["lite", "pro"])
def test_fused_norm_rope_dit_runs_the_op_and_keeps_the_output(variant):
    model = tiny_dit(variant)
    with OpLog() as log:
        plain, official = run_with_table(model, variant)
    assert "flashhead.rms_norm_rope.default" not in log.names
    apply_module_switches(model, torch.nn.Identity(), SpeedConfig(rope_table=True, fused_norm_rope=True))
    assert all(block.self_attn.fused_norm_rope for block in model.blocks)
    with OpLog() as log:
        fused, _ = run_with_table(model, variant)
    assert log.names.count("flashhead.rms_norm_rope.default") == 2 * len(model.blocks)  # q and k
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)
    assert rel_l2(fused, official) <= 1e-5
    # Without the real table (rope_table off) the switch is off: the kernel reads only that table.
    apply_module_switches(model, torch.nn.Identity(), SpeedConfig(fused_norm_rope=True))
    assert not any(block.self_attn.fused_norm_rope for block in model.blocks)


def test_the_compiled_attention_keeps_the_op_whole():
    from torch._inductor.utils import run_and_get_code

    model = tiny_dit("pro")
    attn = model.blocks[0].self_attn
    attn.fused_norm_rope = True
    torch.manual_seed(0)
    x = torch.randn(1, 16, model.config.dim)
    rope = model.rope((2, 2, 4), x.device, table=True)
    with torch.no_grad():
        eager = attn(x, rope)
        torch._dynamo.reset()
        compiled, codes = run_and_get_code(torch.compile(attn, dynamic=False), x, rope)
    torch._dynamo.reset()
    assert any("flashhead.rms_norm_rope" in code for code in codes)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


INTERPRETED = """
import torch
from flashhead.models.dit import rope_table
from flashhead.models.norm_rope import kv_send_kernel, kv_send_reference, launch, q_send_kernel, q_send_reference
from flashhead.models.norm_rope import HeadLayout, reference
torch.manual_seed(0)
x, weight = torch.randn(2, 12, 12 * 128) * 3, torch.randn(12 * 128) * 0.5 + 1
table = rope_table(128, (2, 2, 3), torch.device("cpu"))
out = torch.empty(2, 12, 12, 128)
launch(x, weight, table, 1e-6, 12, out, (out.stride(0), out.stride(1)), HeadLayout.contiguous(12, 128))
torch.testing.assert_close(out, reference(x, weight, table, 1e-6, 12), rtol=1e-5, atol=1e-5)
# The sequence-parallel send buffers (B = 2, 12 tokens per rank's shard), against their compositions
v = torch.randn_like(x)
for ranks, groups in ((2, 2), (2, 1), (3, 2)):
    layout = {"heads": 12, "ranks": ranks, "groups": groups}
    for fn, ref, args in ((kv_send_kernel, kv_send_reference, (x, v)), (q_send_kernel, q_send_reference, (x,))):
        for rank in range(ranks) if fn is q_send_kernel else (0,):
            extra = {"rank": rank} if fn is q_send_kernel else {}
            got = fn(*args, weight, table, 1e-6, **layout, **extra)
            torch.testing.assert_close(got, ref(*args, weight, table, 1e-6, **layout, **extra), rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its CPU interpreter)")
def test_the_triton_kernel_in_the_interpreter():
    """The kernel itself, run by Triton's interpreter on the CPU in float32 (the interpreter rounds bfloat16 by
    truncation, unlike a GPU: tests/models/test_gpu_norm_rope.py checks bfloat16 on the device)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
