"""StageTimer: milliseconds per stage, and with `memory` each stage's peak of allocated GPU memory."""

from __future__ import annotations

import time

import pytest
import torch

from flashhead.pipeline.timing import StageTimer


def test_stages_are_timed_and_memory_needs_a_gpu():
    timer = StageTimer(memory=True)
    for _ in range(2):
        with timer("sleep"):
            time.sleep(0.01)
    summary = timer.summary()
    assert summary["sleep"]["count"] == 2 and summary["sleep"]["mean_ms"] >= 10
    if not torch.cuda.is_available():
        assert not timer.memory and "peak_gib" not in summary["sleep"]  # nothing to measure on the CPU
    timer.reset()
    assert timer.summary() == {} and timer.peak_bytes == {}


@pytest.mark.gpu
def test_each_stage_reports_its_own_peak():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    timer = StageTimer(memory=True)
    keep = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # allocated before: in every stage's peak
    with timer("big"):
        torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    with timer("small"):
        torch.empty(2**20, dtype=torch.uint8, device="cuda")
    summary = timer.summary()
    assert summary["big"]["peak_gib"] >= 0.74  # 256 + 512 MiB
    assert 0.24 <= summary["small"]["peak_gib"] < 0.5  # the big stage's peak is not carried over
    del keep
