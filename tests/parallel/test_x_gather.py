"""X-gather sequence-parallel self-attention (flashhead.parallel.attention.x_gather_self_attention), 2 gloo ranks.

Every rank gathers the blocks' input, projects q / k / v of the whole sequence for its own heads, all-reduces the
RMS norms' sums of squares and sends its heads' outputs back by all-to-all: the whole DiT must equal one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from flashhead.errors import ConfigError
from flashhead.parallel.attention import SequenceParallelAttention

sys.path.insert(0, str(Path(__file__).parent))
import _sp_worker as worker  # noqa: E402
from _sp_worker import torchrun  # noqa: E402

CASES = ("dit-x_gather", "dit-x_gather-uneven", "dit-x_gather-compiled")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("sp_xg"), *CASES)


@pytest.mark.parametrize("case", CASES)
def test_sequence_parallel_dit_with_x_gather_equals_single_process(ranks, case):
    """4 heads on 2 ranks in 2 head groups, batch 2: 48 tokens (even shards) or 27 (uneven, 14 / 13), eager and
    with compile_dit's per-block Inductor compile; the self-attention modules run the X-gather forward."""
    worker.assert_module_split_matches_one_process(ranks, case)


def test_compiled_x_gather_overlaps_its_transfers(ranks):
    """Inductor (CPU), the first block's graph: the gather is launched first and the own shard is projected before
    waiting for it; the norms' all-reduce runs under the v projections; each head group's output leaves right
    after its attention kernel."""
    for r in ranks:
        order = r["dit-x_gather-compiled.order"]
        launches = [i for i, e in enumerate(order) if e == "launch"]
        assert len(launches) == 4 and launches[0] == 0, order  # gather, all-reduce, 2 all-to-alls back
        assert order[1] == "matmul" and order.index("wait") > 1, order
        assert order[launches[1] + 1] == "matmul", order  # the all-reduce, then the v projections
        attends = [i for i, e in enumerate(order) if e == "attend"]
        assert order[attends[0] + 1] == "launch" and order[attends[1] + 1] == "launch", order


def test_x_gather_configuration():
    xg = SequenceParallelAttention(0, 2, 12, method="x_gather")
    assert xg.method == "x_gather" and xg.head_groups == 2 and xg.overlaps_in_graphs
    with pytest.raises(ConfigError, match="x_gather attention needs heads"):
        SequenceParallelAttention(0, 5, 12, method="x_gather")
    q = torch.zeros(1, 4, 12, 8)
    xg.sizes = (4, 4)
    with pytest.raises(RuntimeError, match="whole self-attention modules"):
        xg(q, q, q)


def test_x_gather_installs_and_uninstalls_on_the_blocks_and_refuses_quantized_weights():
    """No process group needed: installing only swaps classes and kernels."""
    from flashhead.models.dit import SelfAttention
    from flashhead.parallel.dit import GatheredSelfAttention, SequenceParallelDiT
    from flashhead.parallel.group import SequenceParallelGroup

    dit = worker.tiny_random_dit(4)
    group = SequenceParallelGroup(rank=0, world_size=2, device=torch.device("cpu"))
    sp = SequenceParallelDiT(dit, group, method="x_gather")
    assert all(type(b.self_attn) is GatheredSelfAttention and b.self_attn.kernel is sp.attention for b in dit.blocks)
    sp.uninstall()
    assert all(type(b.self_attn) is SelfAttention and b.self_attn.kernel is None for b in dit.blocks)

    class Quantized(torch.Tensor):  # stands in for a torchao float8 weight
        pass

    block = dit.blocks[1].self_attn
    block.q.weight = torch.nn.Parameter(block.q.weight.detach().as_subclass(Quantized))
    with pytest.raises(ConfigError, match="not with fp8"):
        SequenceParallelDiT(dit, group, method="x_gather")
