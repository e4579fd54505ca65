"""Inductor's persistent-reduction heuristic widened to the DiT's 1,536-channel norms (the `persistent_norms` switch).

Inductor holds a row in registers and reads it once (a "persistent" reduction) only for rows of up to 1,024 values;
longer rows become a loop that reads the row twice (statistics, then normalise). Every DiT block runs five norms
over 1,536 channels (LayerNorm x3, RMSNorm on q and k), so each compiled block pays the second read five times.
Raising the limit to 2,048 for inner (row-wise) reductions makes them one-pass: a compiled Pro block 2.387 ->
2.341 ms in a CUDA graph on an H100 (benchmarks/block_bench.py --persistent-rows), ~5.6 ms per 4-step Pro chunk.
One of the five (the norm after the cross-attention's residual add) reaches Inductor with the DEFAULT reduction
hint, not INNER, and stayed looped; taking DEFAULT too made it one-pass as well: 52.8 -> 28.6 us, the block 2.350 ->
2.331 ms in a CUDA graph on an H200 (session 28; ~2.3 ms per Pro chunk). Same arithmetic in a different loop shape;
only the order of the float32 sums can differ.

Installed through the hook torch documents for out-of-tree heuristics (`torch._inductor.config.inductor_choices_class`),
for every compile of a thread: Inductor has no per-module setting. The FX graph cache
keys do not see a heuristic, so a no-op post-grad pass with its own uuid keeps the graphs compiled under it apart
from those compiled without it (otherwise a cached default graph would be reused and the switch do nothing).
"""

from __future__ import annotations

import torch
from torch._inductor import config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.runtime.hints import ReductionHint

from flashhead.errors import ConfigError

PERSISTENT_ROW_LIMIT = 2048  # covers the DiT's 1,536 channels; Inductor's own limit is 1,024
# Row reductions (INNER) and those Inductor gives no shape hint (DEFAULT: one of the block's norms; session 28).
PERSISTENT_HINTS = (ReductionHint.INNER, ReductionHint.DEFAULT)
_CACHE_TAG = f"flashhead-wide-rows-{PERSISTENT_ROW_LIMIT}-" + "-".join(h.name.lower() for h in PERSISTENT_HINTS)


def wide_row_persistent(
    features,
    cooperative_reduction: bool,
    max_values: int = PERSISTENT_ROW_LIMIT,
    hints: tuple[ReductionHint, ...] = PERSISTENT_HINTS,
) -> bool:
    """Inductor's answer, or True for a reduction with one of `hints` over a fixed number of values up to
    `max_values` (the switch's defaults; benchmarks/block_bench.py tries others)."""
    if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
        return True
    numel = features.reduction_numel
    return (
        not cooperative_reduction
        and features.get_reduction_hint() in hints
        and bool(getattr(numel, "is_number", False))
        and int(numel) <= max_values
    )


class WideRowChoices(InductorChoices):
    """InductorChoices with reductions of PERSISTENT_HINTS up to PERSISTENT_ROW_LIMIT values persistent."""

    @staticmethod
    def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
        return wide_row_persistent(features, cooperative_reduction)

    def uuid(self) -> str:  # newer torch keys its caches on the choices' uuid
        return _CACHE_TAG


class WideRowsCacheKey(CustomGraphPass):
    """Does nothing to the graph; its uuid enters the FX graph cache key (see the module docstring)."""

    def __call__(self, graph) -> None:
        pass

    def uuid(self) -> str:
        return _CACHE_TAG


_process_on = False  # the state the process's compiled graphs were made under


def set_persistent_norms(on: bool) -> None:
    """Install (or remove) the widened heuristic for the calling thread's compiles (torch >= 2.12 keeps Inductor's
    settings per thread: a thread that compiles calls this too; `apply_thread_settings` does).

    A change of the process's state drops every compiled graph (`torch._dynamo.reset`): Dynamo would otherwise keep
    running the graphs compiled under the other heuristic, since nothing it guards on changed. They compile again at
    their next call, mostly from the FX graph cache. Leaves alone a choices class or post-grad pass that someone else
    installed: ConfigError rather than replace it.
    """
    global _process_on
    ours = inductor_config.inductor_choices_class is WideRowChoices
    if on and not ours:
        if inductor_config.inductor_choices_class is not None or inductor_config.post_grad_custom_post_pass is not None:
            raise ConfigError("persistent_norms: another Inductor choices class or post-grad pass is installed")
        inductor_config.inductor_choices_class = WideRowChoices
        inductor_config.post_grad_custom_post_pass = WideRowsCacheKey()
    elif not on and ours:
        inductor_config.inductor_choices_class = None
        inductor_config.post_grad_custom_post_pass = None
    if on != ours:
        _reset_thread_choices()
    if on != _process_on:
        _process_on = on
        torch._dynamo.reset()


def _reset_thread_choices() -> None:
    # This thread may already hold a choices object made from the previous class (V's handler is made lazily, once
    # per thread, from the config): drop it so the next compile here makes one from the current class.
    from torch._inductor import virtualized

    key = getattr(getattr(virtualized, "_choices", None), "_key", None)
    if key is not None and hasattr(virtualized.threadlocal, key):
        delattr(virtualized.threadlocal, key)
