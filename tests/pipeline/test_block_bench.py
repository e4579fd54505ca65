"""benchmarks/block_bench.py's `--persistent-rows` heuristic, on the CPU (the block itself needs a GPU)."""

from __future__ import annotations

import torch._inductor.config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

from _util import ReductionFeatures, load_benchmark


def test_inner_reductions_up_to_the_limit_become_persistent(monkeypatch):
    bench = load_benchmark("block_bench")
    monkeypatch.setattr(inductor_config, "fx_graph_cache", True)  # restored after the test
    # Inductor's own answer for these rows (no graph here to ask): looped, as for the DiT's 1,536-channel norms.
    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction", staticmethod(lambda *a: False))
    with bench.persistent_rows(2048):
        choices = V.choices
        assert choices.should_use_persistent_reduction(ReductionFeatures(1536, ReductionHint.INNER), False)
        assert not choices.should_use_persistent_reduction(ReductionFeatures(4096, ReductionHint.INNER), False)
        assert not choices.should_use_persistent_reduction(ReductionFeatures(1536, ReductionHint.OUTER), False)
        assert not choices.should_use_persistent_reduction(ReductionFeatures(1536, ReductionHint.INNER), True)
        assert inductor_config.fx_graph_cache is False  # the cache key does not see the handler
    assert type(V.choices) is not type(choices)  # Inductor's heuristics are back
    assert [(r["hint"], r["persistent"]) for r in bench.REDUCTIONS[-4:]] == [
        ("INNER", True), ("INNER", False), ("OUTER", False), ("INNER", False)
    ]  # each decision logged for the JSON
    with bench.persistent_rows(2048, "inner,default"):
        assert V.choices.should_use_persistent_reduction(ReductionFeatures(1536, ReductionHint.DEFAULT), False)
        assert not V.choices.should_use_persistent_reduction(ReductionFeatures(1536, ReductionHint.OUTER), False)


def test_one_block_flops_counts_the_block_at_its_token_grid():
    from flashhead.models.dit import official_config
    from flashhead.pipeline.flops import dit_forward_flops

    bench = load_benchmark("block_bench")
    for model, tokens, latent in (("pro", (9, 32, 32), (9, 64, 64)), ("lite", (5, 16, 16), (5, 16, 16))):
        config = official_config(model)
        per_block = bench.one_block_flops(config, tokens, batch=2)
        terms = dit_forward_flops(config, latent, batch=2, by_term=True)
        blocks = sum(v for k, v in terms.items() if k.startswith(("self_attention", "cross_attention", "ffn")))
        assert per_block == blocks / config["num_layers"]
    # Pro's block at 9,216 tokens: ~1.29 TFLOP (its 9 x 32 x 32 tokens, not 9 x 16 x 16).
    assert 1.2e12 < bench.one_block_flops(official_config("pro"), (9, 32, 32), batch=1) < 1.4e12
