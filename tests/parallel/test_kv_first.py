"""Ulysses with k / v sent before q is projected (`ulysses_kv_first`), 2 gloo ranks.

The self-attention modules run `kv_first_self_attention`: k / v of every head group leave first, q is projected
while they are in flight and goes only to the other ranks, and each rank attends its own queries of the first group
before awaiting the others'. The whole DiT must equal plain Ulysses bit for bit (eager), and one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from flashhead.parallel.attention import SequenceParallelAttention

sys.path.insert(0, str(Path(__file__).parent))
import _sp_worker as worker  # noqa: E402
from _sp_worker import torchrun  # noqa: E402

CASES = ("dit-ulysses_kv_first", "dit-ulysses_kv_first-uneven", "dit-ulysses_kv_first-compiled")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("sp_kvf"), *CASES)


@pytest.mark.parametrize("case", CASES)
def test_kv_first_dit_equals_ulysses_and_single_process(ranks, case):
    """4 heads on 2 ranks in 2 head groups, batch 2: 48 tokens (even shards) or 27 (uneven, 14 / 13), eager and
    with compile_dit's per-block Inductor compile."""
    worker.assert_module_split_matches_one_process(ranks, case)
    if not case.endswith("compiled"):  # the same kernels on the same data as plain Ulysses: no rounding apart
        for r in ranks:
            assert torch.equal(r[case], r[f"{case}.ulysses"])


def test_kv_first_projects_k_and_v_by_one_gemm_over_shared_weights(ranks):
    """The modules hold k's and v's weights as one tensor whose halves are the k / v parameters (no second copy);
    uninstalling gives them storage of their own again, with the same values."""
    for r in ranks:
        for case in CASES:
            assert r[f"{case}.fused"].tolist() == [[True, True, True, True]] * 2, case  # per block
            assert r[f"{case}.unfused"].tolist() == [[False, False, True, True]] * 2, case


def test_fused_key_value_follows_a_cast_and_loaded_weights():
    from flashhead.models.dit import SelfAttention
    from flashhead.parallel.attention import key_value_projection
    from flashhead.parallel.dit import KVFirstSelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(16, 2, 1e-6)
    attn.__class__ = KVFirstSelfAttention
    attn.fuse_key_value()
    x = torch.randn(1, 5, 16)
    k, v = key_value_projection(attn, x)
    torch.testing.assert_close(k, attn.k(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(v, attn.v(x), rtol=0, atol=1e-6)
    attn.load_state_dict({name: t + 1 for name, t in attn.state_dict().items()})  # in place: the fused halves follow
    torch.testing.assert_close(key_value_projection(attn, x)[1], attn.v(x), rtol=0, atol=1e-6)
    attn.double()  # new tensors: fusing again rebuilds the fused weight from them
    attn.fuse_key_value()
    assert attn.kv_weight.dtype == torch.float64 and attn.k.weight.data_ptr() == attn.kv_weight.data_ptr()
    torch.testing.assert_close(key_value_projection(attn, x.double())[0], attn.k(x.double()), rtol=0, atol=1e-12)


def test_kv_first_on_three_ranks_equals_single_process(tmp_path):
    """3 ranks (6 heads, 2 per rank in 2 groups): the middle rank's queries for the others are not one block."""
    ranks = torchrun(tmp_path, "dit-ulysses_kv_first", nproc=3)
    dit = worker.tiny_random_dit(6)
    inputs = worker.dit_inputs(dit)
    with torch.no_grad():
        expected = dit(*inputs)
    for r in ranks:
        torch.testing.assert_close(r["dit-ulysses_kv_first"], expected, rtol=0, atol=1e-5)
        assert torch.equal(r["dit-ulysses_kv_first"], r["dit-ulysses_kv_first.ulysses"])


def test_compiled_kv_first_hides_every_input_transfer(ranks):
    """Inductor (CPU), the first block's graph: k / v of group 0 projected and launched before q is projected; then
    q of group 0, k / v of group 1 and q of group 1 are launched in that order (NCCL runs them one after another);
    group 0's own queries are attended before any query transfer is awaited; every group's output leaves right
    after the kernel computing it."""
    for rank, r in enumerate(ranks):
        order = r["dit-ulysses_kv_first-compiled.order"]
        assert order.count("launch") == 6 and order.count("attend") == 4 + 1, order  # + 1: cross-attention
        first_launch = order.index("launch")
        assert order[:first_launch].count("matmul") == 1, order  # the k / v projection only (one GEMM)
        assert order[first_launch + 1] == "matmul", order  # q, while k / v of group 0 are in flight
        assert order[first_launch + 2 : first_launch + 5] == ["launch"] * 3, order
        assert order[first_launch + 5 : first_launch + 8] == ["wait", "attend", "wait"], order  # own queries of group 0
        attends = [i for i, e in enumerate(order) if e == "attend"][:4]  # own 0, others 0, others 1, own 1
        assert [order[i + 1] for i in attends] == ["wait", "launch", "launch", "wait"], order
        assert order[attends[3] - 1] == "launch", order  # group 1's output in flight under its own queries
        # what each launch sends (split sizes; 24 tokens per rank): k / v to every rank, q / outputs to the other
        kv, other = [24, 24], [0, 24] if rank == 0 else [24, 0]
        assert r["dit-ulysses_kv_first-compiled.launch_sizes"] == [kv, other, kv, other, other, other]
        # k / v of both groups leave from one stacked buffer, and so do q of both groups, which the own-query
        # attention reads in place too (no copy per slice, per collective or per attention input)
        case = "dit-ulysses_kv_first-compiled"
        sent, queries = r[f"{case}.send_buffers"], r[f"{case}.query_buffers"]
        assert sent[0] == sent[2] and sent[1] == sent[3] != sent[0], sent
        assert queries[0] == queries[3] == sent[1], (queries, sent)  # own queries of groups 0 and 1


def test_kv_first_configuration():
    kvf = SequenceParallelAttention(0, 2, 12, method="ulysses_kv_first")
    assert kvf.head_groups == 2 and kvf.overlaps_in_graphs
    q = torch.zeros(1, 4, 12, 8)
    kvf.sizes = (4, 4)
    with pytest.raises(RuntimeError, match="whole self-attention modules"):
        kvf(q, q, q)
