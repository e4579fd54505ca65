"""Where sequence parallel pays (flashhead.parallel.policy) and what the pipeline does where it does not."""

from __future__ import annotations

import pytest
import torch

from flashhead.parallel import SequenceParallelGroup
from flashhead.parallel.policy import MIN_TOKENS_PER_RANK, chunk_tokens, split_pays


def test_official_models_on_two_gpus():
    pro = chunk_tokens((16, 9, 64, 64), (1, 2, 2))  # 512 x 512, Wan2.1 latent, 2 x 2 patches
    lite = chunk_tokens((128, 5, 16, 16), (1, 1, 1))  # LTX latent, 1 x 1 patches
    assert (pro, lite) == (9216, 1280)
    assert split_pays(pro, 2) and split_pays(pro, 4)
    assert not split_pays(lite, 2)  # measured 0.57x of one GPU
    assert not split_pays(pro, 1) and not split_pays(pro, 8)  # 1,152 tokens per rank
    assert split_pays(MIN_TOKENS_PER_RANK * 3, 3) and not split_pays(MIN_TOKENS_PER_RANK * 3 - 1, 3)


@pytest.mark.parametrize("rank", [0, 1])
def test_small_model_is_not_split_and_followers_return(rank, caplog):
    """Too few tokens: no runner, the follower's follow() returns at once, the leader says why."""
    from _tiny import tiny_pipeline

    pipe = tiny_pipeline("pro")[0]
    group = SequenceParallelGroup(rank, 2, torch.device("cpu"))  # no collective runs on this path
    with caplog.at_level("WARNING"):
        pipe.parallelize(group)
    assert not pipe.sequence_parallel
    assert ("running on one GPU" in caplog.text) == (rank == 0)
    if rank:
        pipe.follow()  # returns: nothing will be announced
    pipe.release_followers()  # a no-op on the leader
    assert pipe.parallelize(group, force=True).sequence_parallel  # forced: split anyway (tests, benchmarks)
    pipe.parallelize(None)
    assert not pipe.sequence_parallel
