"""Per-stage wall-clock timing that is correct on GPUs (synchronises around each stage when asked)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

STAGE_PREFIX = "stage:"  # profiler range names


class StageTimer:
    """Collects milliseconds per named stage: `with timer("vae_decode"): ...`.

    With `sync=True` CUDA work is synchronised before and after each stage so that asynchronous kernels
    are charged to the stage that launched them; that costs a little throughput, so the benchmark's
    steady-state FPS runs without a timer. With `memory=True` (and sync) each stage's peak of allocated GPU memory is
    recorded too: the allocator's peak counter is reset at each outermost stage's start (a stage inside another
    reports the peak since the outer one began), so a caller that wants the process's overall peak reads it before
    (`max_memory_allocated`).
    """

    def __init__(self, sync: bool = True, memory: bool = False):
        self.sync = sync and torch.cuda.is_available()
        self.memory = memory and self.sync
        self.records: dict[str, list[float]] = defaultdict(list)
        self.peak_bytes: dict[str, int] = {}
        self._depth = 0  # stages open now

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
            if self.memory and self._depth == 0:  # a stage inside another keeps the outer one's peak counting
                torch.cuda.reset_peak_memory_stats()
        self._depth += 1
        start = time.perf_counter()
        try:
            # Named range for profiler traces (benchmarks/trace_stages.py charges GPU work to the stage that
            # launched it); next to free when no profiler runs.
            with torch.profiler.record_function(STAGE_PREFIX + name):
                yield
        finally:
            self._depth -= 1
            if self.sync:
                torch.cuda.synchronize()
                if self.memory:
                    peak = torch.cuda.max_memory_allocated()
                    self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), peak)
            self.records[name].append((time.perf_counter() - start) * 1000)

    def summary(self) -> dict[str, dict[str, float]]:
        """{stage: {"mean_ms", "median_ms", "count"}} over everything recorded, and "peak_gib" with `memory`."""
        out = {}
        for name, values in self.records.items():
            ordered = sorted(values)
            out[name] = {
                "mean_ms": round(sum(values) / len(values), 3),
                "median_ms": round(ordered[len(ordered) // 2], 3),
                "count": len(values),
            }
            if name in self.peak_bytes:
                out[name]["peak_gib"] = round(self.peak_bytes[name] / 2**30, 2)
        return out

    def reset(self) -> None:
        self.records.clear()
        self.peak_bytes.clear()


class NullTimer:
    """A timer that records nothing (the default)."""

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        yield
