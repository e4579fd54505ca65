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


def test_a_stage_inside_another_does_not_reset_the_outer_peak(monkeypatch):
    """The early first frames' colour correction runs inside the decode stage: its start must not reset the peak
    counter the decode stage reads at its end (stand-in counters: this runs on the CPU too)."""
    state = {"peak": 0, "resets": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])

    def reset():
        state["peak"], state["resets"] = 0, state["resets"] + 1

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    timer = StageTimer(memory=True)
    with timer("vae_decode"):
        state["peak"] = 900
        with timer("color_correction"):
            state["peak"] = max(state["peak"], 100)
    assert state["resets"] == 1
    assert timer.peak_bytes == {"vae_decode": 900, "color_correction": 900}
