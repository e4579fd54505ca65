"""KV-gather sequence-parallel attention (flashhead.parallel.attention.kv_gather_attention) on CPU, 2 gloo ranks.

Each rank keeps its queries, gathers every rank's keys / values in one all-gather and merges the per-block
results by their log-sum-exp: equal to attention over the whole sequence, for any head count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from flashhead.errors import ConfigError
from flashhead.parallel.attention import (
    SequenceParallelAttention,
    attention_with_lse,
    merge_attention,
    sdpa_kernel,
)

sys.path.insert(0, str(Path(__file__).parent))
import _sp_worker as worker  # noqa: E402
from _sp_worker import torchrun  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("sp_kv"), "kv_gather", "kv_gather-inductor", "dit-kv_gather")


def test_merging_blocks_by_log_sum_exp_is_attention_over_their_union():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 11, 8, generator=g) for _ in range(3))  # (B, H, s, d)
    whole = sdpa_kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    blocks = [attention_with_lse(q, k[:, :, a:b], v[:, :, a:b]) for a, b in ((0, 4), (4, 5), (5, 11))]
    out, lse = attention_with_lse(q, k, v)
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-1, -2) / 8**0.5, dim=-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(merge_attention(*zip(*blocks, strict=True)), whole, rtol=0, atol=1e-5)


def test_kv_gather_equals_single_process(ranks):
    """3 heads (Ulysses cannot split them over 2 ranks), uneven shards of 37 tokens."""
    q, k, v = worker.attention_inputs(3)
    expected = sdpa_kernel(q, k, v)
    assert [r["kv_gather"].shape[1] for r in ranks] == [19, 18]
    torch.testing.assert_close(torch.cat([r["kv_gather"] for r in ranks], dim=1), expected, rtol=0, atol=1e-5)


def test_compiled_kv_gather_attends_to_its_own_block_before_waiting(ranks):
    """Inductor (CPU): same numbers, and the gather is launched before the local block's attention and waited
    after it, so the transfer overlaps that attention."""
    for r in ranks:
        torch.testing.assert_close(r["kv_gather-inductor"], r["kv_gather"], rtol=0, atol=1e-5)
        order = r["kv_gather-inductor.order"]
        assert order.count("launch") == 1 and order[0] == "launch", order
        assert order.index("attend") < order.index("wait"), order


def test_sequence_parallel_dit_with_kv_gather_equals_single_process(ranks):
    dit = worker.tiny_random_dit(3)
    with torch.no_grad():
        expected = dit(*worker.dit_inputs(dit))
    for r in ranks:
        torch.testing.assert_close(r["dit-kv_gather"], expected, rtol=0, atol=1e-5)


def test_method_choice_and_refusals():
    assert SequenceParallelAttention(0, 2, 12).method == "ulysses_kv_first"  # 2 head groups: k / v first
    assert SequenceParallelAttention(0, 2, 12, head_groups=1).method == "ulysses"
    assert SequenceParallelAttention(0, 12, 12).method == "ulysses"  # 1 head per rank: nothing to pipeline
    assert SequenceParallelAttention(0, 5, 12).method == "ring"
    kv = SequenceParallelAttention(0, 2, 12, method="kv_gather")
    assert kv.method == "kv_gather" and kv.head_groups == 1 and kv.overlaps_in_graphs
    with pytest.raises(ConfigError, match="divisible"):
        SequenceParallelAttention(0, 5, 12, method="ulysses")
    with pytest.raises(ConfigError, match="kv_gather"):
        SequenceParallelAttention(0, 2, 12, method="allgather")
