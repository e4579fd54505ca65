"""The persistent_norms switch: Inductor's widened persistent-reduction heuristic, installed process-wide.

The heuristic only shapes Triton (GPU) kernels; here we check what decides it: the predicate, that every thread's
compiles get it, that the FX graph cache keeps graphs compiled with and without it apart, and that it comes off.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch._inductor.config as inductor_config
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V

from _util import ReductionFeatures
from flashhead.errors import ConfigError
from flashhead.pipeline import inductor_heuristics as heuristics
from flashhead.pipeline.speed import SpeedConfig, apply_process_settings, apply_thread_settings


@pytest.fixture
def switch_off():
    yield
    heuristics.set_persistent_norms(False)


def test_rows_up_to_the_limit_become_persistent(monkeypatch):
    # Inductor's own answer for these rows (no graph here to ask): looped, as for the DiT's 1,536-channel norms.
    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction", staticmethod(lambda *a: False))
    decide = heuristics.WideRowChoices.should_use_persistent_reduction
    assert decide(ReductionFeatures(1536, ReductionHint.INNER), False)
    assert decide(ReductionFeatures(2048, ReductionHint.INNER), False)
    assert not decide(ReductionFeatures(4096, ReductionHint.INNER), False)
    assert not decide(ReductionFeatures(1536, ReductionHint.OUTER), False)
    # cooperative reductions keep Inductor's answer
    assert not decide(ReductionFeatures(1536, ReductionHint.INNER), True)
    # the switch takes DEFAULT-hint reductions too (one of the block's norms; session 28), up to the same limit
    assert decide(ReductionFeatures(1536, ReductionHint.DEFAULT), False)
    assert not decide(ReductionFeatures(4096, ReductionHint.DEFAULT), False)
    # other hints are the caller's (block_bench --persistent-hints inner: session 27's rows-only predicate)
    rows_only = (ReductionHint.INNER,)
    assert not heuristics.wide_row_persistent(ReductionFeatures(1536, ReductionHint.DEFAULT), False, hints=rows_only)
    # graphs compiled under another predicate are cached apart
    assert heuristics.WideRowChoices().uuid() == heuristics.WideRowsCacheKey().uuid()
    assert heuristics.WideRowsCacheKey().uuid().endswith("inner-default")


def test_switch_is_per_thread_and_comes_off(switch_off):
    apply_process_settings(SpeedConfig(persistent_norms=True))
    assert isinstance(V.choices, heuristics.WideRowChoices)  # this thread's cached choices object was replaced
    # torch >= 2.12 keeps Inductor's settings per thread: a thread that compiles applies them itself.
    seen = []

    def worker():
        apply_thread_settings(SpeedConfig(persistent_norms=True))
        seen.append(V.choices)

    compiles = CompileCounter()
    double = torch.compile(lambda x: x * 2, backend=compiles)
    double(torch.ones(2))  # a compiled graph ...
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert isinstance(seen[0], heuristics.WideRowChoices)
    double(torch.ones(2))  # ... that survives the worker's applying the same state (no Dynamo reset)
    assert compiles.frame_count == 1
    apply_process_settings(SpeedConfig())
    assert inductor_config.inductor_choices_class is None and inductor_config.post_grad_custom_post_pass is None
    assert type(V.choices) is InductorChoices


def test_someone_elses_choices_class_is_not_replaced(monkeypatch):
    monkeypatch.setattr(inductor_config, "inductor_choices_class", InductorChoices)
    with pytest.raises(ConfigError, match="another Inductor choices class"):
        heuristics.set_persistent_norms(True)
    assert inductor_config.inductor_choices_class is InductorChoices


def test_fx_graph_cache_keeps_graphs_with_and_without_it_apart(switch_off):
    from torch._inductor.utils import fresh_cache

    def norm(x):
        return torch.nn.functional.layer_norm(x, (1536,)) * 2

    x = torch.randn(4, 1536)
    lookups = []
    with fresh_cache(), inductor_config.patch(fx_graph_cache=True):
        counters.clear()
        for on in (False, False, True, True, False):
            heuristics.set_persistent_norms(on)
            torch._dynamo.reset()
            torch.compile(norm)(x)
            lookups.append((counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]))
    # off: compiled, then from the cache; on: compiled anew (not the cached default graph), then cached; off: cached.
    assert lookups == [(0, 1), (1, 1), (1, 2), (2, 2), (3, 2)]


def test_optimized_preset_has_it():
    assert SpeedConfig.optimized().persistent_norms
    assert SpeedConfig.parse("persistent_norms=off", SpeedConfig.optimized()).persistent_norms is False
