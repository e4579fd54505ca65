"""The overlapped Ulysses all-to-all (head groups): 2 gloo processes, eager and Inductor-compiled.

Per-head attention does not depend on the other heads, so every head-group count must give exactly the
one-group result; compiled, the launches must come before the waits or nothing overlaps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from flashhead.errors import ConfigError
from flashhead.parallel.attention import SequenceParallelAttention, default_head_groups, sdpa_kernel, ulysses_attention

sys.path.insert(0, str(Path(__file__).parent))
import _sp_worker as worker  # noqa: E402
from _sp_worker import torchrun  # noqa: E402


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("sp_groups"), "ulysses-groups", "ulysses-inductor", "dit-compiled",
                    "ulysses-own-first")


def test_every_head_group_count_equals_one_group_bit_for_bit(ranks):
    """12 heads on 2 ranks (6 each), 37 tokens in uneven shards (19 / 18): G = 2, 3, 6 == G = 1 exactly."""
    q, k, v = worker.attention_inputs(12)
    one = torch.cat([r["ulysses-groups.1"] for r in ranks], dim=1)
    torch.testing.assert_close(one, sdpa_kernel(q, k, v), rtol=0, atol=1e-5)
    assert [r["ulysses-groups.1"].shape[1] for r in ranks] == [19, 18]
    for groups in worker.HEAD_GROUPS[1:]:
        for r in ranks:
            assert torch.equal(r[f"ulysses-groups.{groups}"], r["ulysses-groups.1"]), groups


def test_inductor_launches_every_group_before_waiting(ranks):
    """Compiled (Inductor, CPU): same numbers as eager, and the generated code keeps the pipeline."""
    for r in ranks:
        for groups in (1, 3):
            torch.testing.assert_close(r[f"ulysses-inductor.{groups}"], r["ulysses-groups.1"], rtol=0, atol=1e-6)
        order = r["ulysses-inductor.3.order"]
        # per group: the other ranks' queries, their output's launch, then this rank's own queries
        assert order.count("launch") == 6 and order.count("attend") == 6, order
        assert order[:3] == ["launch"] * 3, order  # all q / k / v transfers in flight before the first wait
        output_launches = [i for i, e in enumerate(order) if e == "launch"][3:]
        for i in output_launches:
            assert order[i - 1] == "attend", order  # each group's output leaves right after the kernel computing it
        # Each is sent while this rank's own queries of the same group are attended (the last one's too: no output
        # transfer is exposed), and only then is the next group's input awaited, under both of them.
        for i in output_launches:
            assert order[i + 1] == "attend" and order[i + 2] == "wait", order
        last_attend = max(i for i, e in enumerate(order) if e == "attend")
        assert order[last_attend + 1 :] == ["wait"] * 3, order  # the outputs are awaited only at the end


def test_own_first_attends_the_first_groups_own_block_while_it_is_in_flight(ranks):
    """ulysses_own_first: the first group's own queries against own keys, merged by log-sum-exp with the rest: equal
    to one group within float rounding, exact for every other head; compiled, that block runs between the input
    launches and the first wait."""
    for rank, r in enumerate(ranks):
        expected = r["ulysses-groups.1"]
        for groups in (2, 3):
            got = r[f"ulysses-own-first.{groups}"]
            merged = torch.zeros(12, dtype=torch.bool)
            merged[rank * 6 : rank * 6 + 6 // groups] = True  # this rank's heads of its first group
            assert torch.equal(got[:, :, ~merged], expected[:, :, ~merged]), groups
            torch.testing.assert_close(got[:, :, merged], expected[:, :, merged], rtol=0, atol=1e-6)
            assert not torch.equal(got[:, :, merged], expected[:, :, merged])  # the merge did run
        torch.testing.assert_close(r["ulysses-own-first.compiled"], expected, rtol=0, atol=1e-6)
        order = r["ulysses-own-first.order"]
        assert order[:4] == ["launch"] * 3 + ["attend"] and order[4] == "wait", order


def test_compiled_sequence_parallel_dit_with_head_groups(ranks):
    """compile_dit's per-block torch.compile, 4 heads on 2 ranks in 2 groups == the eager one-process DiT, and the
    compiled block launches both groups' all-to-alls before waiting for the first."""
    dit = worker.tiny_random_dit(4)
    with torch.no_grad():
        expected = dit(*worker.dit_inputs(dit))
    for r in ranks:
        torch.testing.assert_close(r["dit-compiled"], expected, rtol=0, atol=1e-5)
        order = r["dit-compiled.order"]  # the block's graph, compiled inside the SP forward's Inductor settings
        assert order.count("launch") == 4 and order[:2] == ["launch", "launch"], order
        # Both groups' q / k / v leave from one buffer, the stack the norm / RoPE kernel writes into: no copy
        # into rank-major order per group (that copy and the float64 RoPE cost ~140 us per Pro layer on H100).
        first, second = r["dit-compiled.sends"][:2]
        assert first == second, r["dit-compiled.sends"]


def test_default_head_groups_and_bad_counts():
    # Pro's 12 heads: 6 per rank on 2 GPUs -> 2 groups; 3 on 4 -> 3; 1 on 12 -> 1 (nothing to pipeline)
    assert [default_head_groups(12, n) for n in (1, 2, 3, 4, 6, 12)] == [2, 2, 2, 3, 2, 1]
    assert default_head_groups(12, 5) == 1  # ring attention
    assert SequenceParallelAttention(0, 2, 12).head_groups == 2
    assert SequenceParallelAttention(0, 5, 12, head_groups=4).head_groups == 1  # ring: no head groups
    with pytest.raises(ConfigError, match="head_groups 4 must divide the 6 heads"):
        SequenceParallelAttention(0, 2, 12, head_groups=4)
    q = torch.zeros(1, 4, 12, 8)
    with pytest.raises(ConfigError, match="head_groups 0 must divide"):
        ulysses_attention(q, q, q, (4, 4), 0, head_groups=0)
