"""Fixtures of the training tests: one torch thread, and a small synthetic dataset on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flashhead.data.shards import ShardWriter
from train.helpers import synthetic_clip


@pytest.fixture(autouse=True)
def one_thread():
    """Two OpenMP threads on a shared 2-core machine spin-wait on each other; one is faster and steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory) -> Path:
    """6 train clips (2-4 s) and 2 val clips in one shard folder."""
    out = tmp_path_factory.mktemp("synth")
    with ShardWriter(out, shard_max_clips=4) as writer:
        for i in range(6):
            writer.write(synthetic_clip(f"train{i}", 2.0 + 0.4 * i, seed=i))
        for i in range(2):
            writer.write(synthetic_clip(f"val{i}", 2.5, seed=100 + i, split="val"))
    return out
