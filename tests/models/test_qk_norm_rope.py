"""The fused_qk_rope switch: the self-attention's q / k RMS norm and RoPE as one op (a Triton kernel on CUDA).

On the CPU the op is the eager composition, so the DiT with the switch must give the plain path's output exactly;
the Triton kernel itself runs here under Triton's interpreter where Triton is installed (CI has no Triton: those
cases skip, and tests/models/test_gpu_qk_norm_rope.py checks the compiled kernel on the device).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _tiny import eager_and_compiled_block, tiny_dit
from _util import OpLog, load_fixture, rel_l2
from flashhead.errors import ConfigError
from flashhead.models import qk_norm_rope as fused
from flashhead.models.dit import apply_rope, rope_table
from flashhead.pipeline.fast_path import apply_module_switches
from flashhead.pipeline.speed import SpeedConfig

has_triton = importlib.util.find_spec("triton") is not None


def case(dtype: torch.dtype, batch: int, grid: tuple[int, int, int], heads: int, head_dim: int, seed: int = 0):
    torch.manual_seed(seed)
    tokens = grid[0] * grid[1] * grid[2]
    x = (torch.randn(batch, tokens, heads * head_dim) * 3).to(dtype)
    weight = (torch.rand(heads * head_dim) + 0.5).to(dtype)
    return x, weight, rope_table(head_dim, grid, torch.device("cpu"), torch.float32)


def test_reference_is_the_attention_layers_norm_and_rotation():
    model = tiny_dit("lite").to(torch.bfloat16)
    attn = model.blocks[0].self_attn
    x = torch.randn(2, 24, model.config.dim, dtype=torch.bfloat16)
    grid = (2, 3, 4)
    table = model.rope(grid, x.device, table=True, dtype=torch.float32)
    with torch.no_grad():
        plain = apply_rope(attn.norm_q(attn.q(x)).unflatten(-1, (attn.num_heads, -1)), table)
        ours = fused.qk_norm_rope(attn.q(x), attn.norm_q.weight, table, attn.num_heads, attn.norm_q.eps)
    assert ours.shape == plain.shape == (2, 24, attn.num_heads, model.config.dim // attn.num_heads)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["lite", "pro"])
def test_the_switch_runs_the_op_and_keeps_the_official_output(variant):
    model = tiny_dit(variant)
    t, _ = load_fixture(f"parity_dit_{variant}_tiny")
    args = t["case1/x"], t["case1/timestep"], t["case1/context"], t["case1/y"]
    with torch.no_grad():
        plain = model(*args)
    apply_module_switches(model, torch.nn.Identity(), SpeedConfig(rope_table=True, rope_fp32=True, fused_qk_rope=True))
    assert all(block.self_attn.fused_qk_rope for block in model.blocks)
    with OpLog() as log, torch.no_grad():
        switched = model(*args)
    assert log.names.count("flashhead.qk_norm_rope.default") == 2 * len(model.blocks)  # q and k of each block
    torch.testing.assert_close(switched, plain, rtol=0, atol=0)  # on the CPU: the same composition
    assert rel_l2(switched, t["case1/output"]) <= 1e-5
    apply_module_switches(model, torch.nn.Identity(), SpeedConfig())
    with OpLog() as log, torch.no_grad():
        model(*args)
    assert "flashhead.qk_norm_rope.default" not in log.names


def test_the_compiled_block_calls_the_op():
    model = tiny_dit("pro")
    model.set_fused_qk_rope(True)
    eager, compiled, code = eager_and_compiled_block(model, rope_dtype=torch.float32)
    assert "flashhead.qk_norm_rope" in code
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_the_switch_needs_the_float32_table():
    with pytest.raises(ConfigError, match="rope_fp32"):
        SpeedConfig(rope_table=True, fused_qk_rope=True)
    assert SpeedConfig.parse("rope_table=on,rope_fp32=on,fused_qk_rope=on").fused_qk_rope


def test_launch_refuses_a_float64_table():
    if not has_triton:
        pytest.skip("Triton is not installed")
    x, weight, _ = case(torch.float32, 1, (1, 2, 2), 2, 12)
    with pytest.raises(ValueError, match="float32 RoPE table"):
        fused.launch(x, weight, rope_table(12, (1, 2, 2), torch.device("cpu")), 2, 1e-6)


# Triton reads TRITON_INTERPRET when it is imported, and torch may have imported it already: the interpreted kernel
# runs in a process of its own.
INTERPRET = """
import sys, torch
from flashhead.models.qk_norm_rope import launch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/.."]  # this file and tests/ (its helpers)
from test_qk_norm_rope import case
dtype, batch, grid, heads, head_dim = eval(sys.argv[2])
x, weight, table = case(dtype, batch, grid, heads, head_dim)
torch.save(launch(x, weight, table, heads, 1e-6), sys.argv[3])
"""


def interpreted(tmp_path, dtype, batch, grid, heads, head_dim) -> torch.Tensor:
    """The Triton kernel's output under Triton's CPU interpreter."""
    if not has_triton:
        pytest.skip("Triton is not installed (the kernel is checked on the device)")
    out = tmp_path / "out.pt"
    args = repr((dtype, batch, grid, heads, head_dim))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", INTERPRET, str(Path(__file__).parent), args, str(out)], env=env, check=True)
    return torch.load(out)


@pytest.mark.parametrize(
    "batch,grid,heads,head_dim", [(2, (2, 3, 4), 2, 12), (1, (1, 2, 2), 12, 128), (3, (3, 4, 4), 3, 24)]
)
def test_the_kernel_computes_the_reference_float32(tmp_path, batch, grid, heads, head_dim):
    x, weight, table = case(torch.float32, batch, grid, heads, head_dim)
    out = interpreted(tmp_path, torch.float32, batch, grid, heads, head_dim)
    ref = fused.reference(x, weight, table, heads, 1e-6)
    assert out.shape == ref.shape
    # Only the row's sum of squares is added in another order: a few float32 ulps at most.
    torch.testing.assert_close(out, ref, rtol=4e-7, atol=4e-7)
    # Every channel pair sits where the reference puts it: a swapped pair or a wrong table row is far off.
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()


def test_the_kernel_rounds_to_bfloat16_where_the_reference_does(tmp_path):
    # The interpreter rounds float32 -> bf16 towards zero (the GPU to nearest even), three times on the way (norm,
    # weight, rotation), each off by up to one ulp (2^-7 of the value): the exact comparison is the GPU test's.
    x, weight, table = case(torch.bfloat16, 2, (2, 3, 4), 12, 128)
    out = interpreted(tmp_path, torch.bfloat16, 2, (2, 3, 4), 12, 128).float()
    ref = fused.reference(x, weight, table, 12, 1e-6).float()
    # The rotation keeps each pair's length, and a bf16 rounding errs by its length's ulps, not the value's.
    pair_length = ref.unflatten(-1, (-1, 2)).norm(dim=-1, keepdim=True).expand(*ref.shape[:-1], -1, 2).flatten(-2)
    assert ((out - ref).abs() <= pair_length * 2**-5).all()
    # A wrong pair partner, sign or table row errs by the order of the value itself.
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
