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
