"""The EMA's fused update is the per-parameter blend it replaced, bit for bit."""

from __future__ import annotations

import torch

from flashhead.train.ema import EMA


def test_fused_update_equals_a_lerp_per_parameter():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    model[1].requires_grad_(False)  # frozen parameters are averaged too (they just stay put)
    ema = EMA(model, decay=0.99)
    expected = {name: t.clone() for name, t in ema.shadow.items()}
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        ema.update(step)
        for name, p in model.named_parameters():
            expected[name].lerp_(p.detach(), 1 - min(0.99, (1 + step) / (10 + step)))
        for name, tensor in expected.items():
            assert torch.equal(ema.shadow[name], tensor), (step, name)
    assert not torch.equal(ema.shadow["0.weight"], model[0].weight)  # an average, not a copy
