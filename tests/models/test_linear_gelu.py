"""The fused_gelu switch: the DiT's first FFN layer with its GELU as one op, which torch.compile keeps whole."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _tiny import eager_and_compiled_block, tiny_dit
from _util import OpLog, load_fixture, rel_l2
from flashhead.models.linear_gelu import linear_gelu
from flashhead.pipeline.fast_path import apply_module_switches
from flashhead.pipeline.speed import SpeedConfig


def run_case(model, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(our output, the official model's output) for the parity fixture's first case."""
    t, _ = load_fixture(f"parity_dit_{variant}_tiny")
    with torch.no_grad():
        out = model(t["case1/x"], t["case1/timestep"], t["case1/context"], t["case1/y"])
    return out, t["case1/output"]


def test_linear_gelu_is_the_tanh_gelu_of_the_linear_layer():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 7, 16), torch.randn(24, 16), torch.randn(24)
    out = linear_gelu(x, w, b)
    assert out.shape == (2, 7, 24)
    torch.testing.assert_close(out, F.gelu(F.linear(x, w, b), approximate="tanh"), rtol=0, atol=0)
    # The exact-erf GELU differs: the test would notice the wrong approximation.
    assert (out - F.gelu(F.linear(x, w, b))).abs().max() > 1e-5


@pytest.mark.parametrize("variant", ["lite", "pro"])
def test_fused_gelu_dit_runs_the_op_and_matches_the_official_output(variant):
    model = tiny_dit(variant)
    reference, official = run_case(model, variant)
    apply_module_switches(model, torch.nn.Identity(), SpeedConfig(fused_gelu=True))
    assert all(block.fused_gelu for block in model.blocks)
    with OpLog() as log:
        fused, _ = run_case(model, variant)
    assert log.names.count("flashhead.linear_gelu.default") == len(model.blocks)
    assert not any("gelu" in name and "linear_gelu" not in name for name in log.names)  # no GELU of its own
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-6)
    assert rel_l2(fused, official) <= 1e-5
    apply_module_switches(model, torch.nn.Identity(), SpeedConfig())
    with OpLog() as log:
        run_case(model, variant)
    assert "flashhead.linear_gelu.default" not in log.names


def test_the_compiled_block_keeps_the_op_whole():
    """Inductor must call the op, not decompose it into a GEMM and a pointwise GELU kernel of its own."""
    model = tiny_dit("pro")
    model.blocks[0].fused_gelu = True
    eager, compiled, code = eager_and_compiled_block(model, fullgraph=False)
    assert "flashhead.linear_gelu" in code
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_optimized_preset_fuses_the_gelu():
    assert SpeedConfig.optimized().fused_gelu and not SpeedConfig().fused_gelu
