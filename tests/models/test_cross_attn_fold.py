"""The cross_attn_fold switch: the audio cross-attention and its output projection as two dense GEMMs.

The same maths in another order, so in float64 it must give the plain path's output to rounding, on the official
tiny fixtures; in bfloat16 its error against a float64 reference must stay at the plain path's. The compiled version
is checked on the device (tests/pipeline/test_gpu_speed.py, cases `cross_attn_fold*`).
"""

from __future__ import annotations

import pytest
import torch

from _tiny import eager_and_compiled_block, tiny_dit
from _util import load_fixture, rel_l2
from flashhead.models.dit import CrossAttention, folded_cross_attention
from flashhead.pipeline.fast_path import apply_module_switches
from flashhead.pipeline.speed import SpeedConfig


@pytest.mark.parametrize("variant", ["lite", "pro"])
def test_the_switch_keeps_the_official_output(variant):
    model = tiny_dit(variant).double()
    t, meta = load_fixture(f"parity_dit_{variant}_tiny")
    args = [t[f"case1/{k}"].double() for k in ("x", "timestep", "context", "y")]
    with torch.no_grad():
        plain = model(*args)
    apply_module_switches(model, torch.nn.Identity(), SpeedConfig(cross_attn_fold=True))
    assert all(block.cross_attn.folded for block in model.blocks)
    with torch.no_grad():
        folded = model(*args)
    assert rel_l2(folded, plain) < 1e-12
    assert rel_l2(folded.float(), t["case1/output"]) < 1e-4  # and still the official model's output
    apply_module_switches(model, torch.nn.Identity(), SpeedConfig())
    assert not any(block.cross_attn.folded for block in model.blocks)


def test_bfloat16_error_stays_at_the_plain_paths():
    # Pro's width and heads, a frame's worth of queries, 32 audio keys per frame.
    torch.manual_seed(0)
    attn = CrossAttention(1536, 12, 1e-6).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=1536**-0.5)
    x, context = torch.randn(3, 256, 1536, dtype=torch.float64), torch.randn(3, 32, 1536, dtype=torch.float64)
    with torch.no_grad():
        exact = attn(x, context)
        half = attn.to(torch.bfloat16)
        plain = half(x.bfloat16(), context.bfloat16()).double()
        half.folded = True
        folded = half(x.bfloat16(), context.bfloat16()).double()
    assert rel_l2(plain, exact) < 1e-2
    assert rel_l2(folded, exact) < 1.5 * rel_l2(plain, exact)


def test_heads_keys_and_shapes():
    torch.manual_seed(1)
    attn = CrossAttention(48, 3, 1e-6).double()
    q, k, v = torch.randn(5, 7, 48).double(), torch.randn(5, 4, 48).double(), torch.randn(5, 4, 48).double()
    with torch.no_grad():
        ours = folded_cross_attention(q, k, v, attn.o, 3)
        heads = [torch.softmax(q[..., h * 16 : (h + 1) * 16] @ k[..., h * 16 : (h + 1) * 16].mT / 4.0, -1)
                 @ v[..., h * 16 : (h + 1) * 16] for h in range(3)]  # fmt: skip
        reference = attn.o(torch.cat(heads, -1))
    assert ours.shape == (5, 7, 48)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


def test_fp8_leaves_the_cross_attention_unfolded(monkeypatch):
    # fp8 quantises the output projection's weights, which the fold reads as a matrix: the switch is then ignored.
    import flashhead.pipeline.fast_path as fast_path

    model = tiny_dit("lite")
    monkeypatch.setattr(fast_path, "quantize_fp8", lambda dit: setattr(dit, "_flashhead_fp8", True))
    apply_module_switches(model, torch.nn.Identity(), SpeedConfig(cross_attn_fold=True, fp8=True))
    assert not any(block.cross_attn.folded for block in model.blocks)


def test_the_folded_block_compiles_in_one_graph():
    model = tiny_dit("pro")
    model.set_cross_attn_fold(True)
    eager, compiled, _ = eager_and_compiled_block(model, rope_dtype=torch.float32)  # fullgraph: a break would raise
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
