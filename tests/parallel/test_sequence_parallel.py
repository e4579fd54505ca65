"""Sequence parallel on CPU: 2 gloo processes (torchrun) against the single-process computation.

The worker (tests/parallel/_sp_worker.py) saves each rank's results; the references are computed here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from flashhead.errors import ConfigError
from flashhead.parallel import partition_tokens
from flashhead.parallel.attention import sdpa_kernel
from flashhead.parallel.vae import split_decode, split_encode

sys.path.insert(0, str(Path(__file__).parent))
import _sp_worker as worker  # noqa: E402
from _sp_worker import torchrun  # noqa: E402


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("sp_core"), "ulysses", "ring", "dit-4", "dit-3", "decode", "encode")


def test_partition_keeps_segments_inside_frames():
    pro = partition_tokens(9, 1024, 2)  # Pro on 2 GPUs: 9 frames do not halve, so half frames
    assert pro.sizes == (4608, 4608) and pro.segment == 512
    assert pro.segment_frames(1) == [4, 5, 5, 6, 6, 7, 7, 8, 8]
    assert partition_tokens(9, 1024, 3).sizes == (3072,) * 3 and partition_tokens(9, 1024, 3).segment == 1024
    odd = partition_tokens(1, 37, 2)  # a prime frame: single tokens, uneven shards
    assert odd.sizes == (19, 18) and odd.segment == 1
    for n in range(1, 9):
        p = partition_tokens(5, 256, n)  # Lite on any N
        assert p.total == 1280 and max(p.sizes) - min(p.sizes) <= p.segment and 256 % p.segment == 0
        assert all(a % p.segment == 0 for a in p.starts)
    with pytest.raises(ConfigError, match="cannot be split"):
        partition_tokens(1, 2, 3)


@pytest.mark.parametrize("case", ["ulysses", "ring"])
def test_parallel_attention_equals_single_process(core, case):
    """Ulysses (4 heads over 2 ranks) and ring (3 heads: do not divide) on uneven shards of 37 tokens."""
    q, k, v = worker.attention_inputs(4 if case == "ulysses" else 3)
    expected = sdpa_kernel(q, k, v)
    got = torch.cat([r[case] for r in core], dim=1)
    assert [r[case].shape[1] for r in core] == [19, 18]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("heads", [4, 3])
def test_sequence_parallel_dit_equals_single_process(core, heads):
    """Whole DiT forward (batch 2, two timesteps, 3 frames of 16 tokens split into half frames), fp32."""
    dit = worker.tiny_random_dit(heads)
    with torch.no_grad():
        expected = dit(*worker.dit_inputs(dit))
    for r in core:  # every rank returns the whole velocity
        torch.testing.assert_close(r[f"dit-{heads}"], expected, rtol=0, atol=1e-5)


def test_split_decode_gathers_exact_strips(core):
    """Wan (Pro): 2 gloo ranks decode 4 latent rows each, gathered on both, equal to the full decode (fp32)."""
    from _tiny import tiny_vae

    vae, latent = tiny_vae("pro"), worker.split_decode_latent()
    with torch.no_grad():
        full = vae.decode(latent)
    for r in core:
        torch.testing.assert_close(r["decode"], full, rtol=0, atol=1e-5)


def test_split_encode_gathers_exact_strips(core):
    """Wan (Pro) motion re-encode: 2 gloo ranks encode 5 latent rows each, gathered on both == the full encode."""
    from _tiny import tiny_vae

    vae, video = tiny_vae("pro"), worker.split_encode_video()
    with torch.no_grad():
        full = vae.encode(video)
    for r in core:
        assert r["encode"].shape == full.shape == (1, 16, 2, 10, 2)
        torch.testing.assert_close(r["encode"], full, rtol=0, atol=1e-5)


def test_split_encode_single_rank_and_refusal():
    from _tiny import tiny_vae
    from flashhead.parallel import SequenceParallelGroup

    pro, video = tiny_vae("pro"), worker.split_encode_video()
    one = SequenceParallelGroup(0, 1, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(split_encode(pro, video, one), pro.encode(video))
    with pytest.raises(ConfigError, match="split encode needs the Wan2.1 VAE"):
        split_encode(tiny_vae("lite"), video, one)


def test_split_decode_single_rank_and_wide_halo_are_exact():
    from _tiny import tiny_vae
    from flashhead.parallel import SequenceParallelGroup

    pro, lite = tiny_vae("pro"), tiny_vae("lite")
    latent = worker.split_decode_latent()
    lite_latent = torch.randn(1, 128, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        # one rank: plain decode; LTX with a halo that covers the frame: plain decode; no collective needed
        one = SequenceParallelGroup(0, 1, torch.device("cpu"))
        assert torch.equal(split_decode(pro, latent, one), pro.decode(latent))
        wide = split_decode(lite, lite_latent, SequenceParallelGroup(1, 2, torch.device("cpu")), halo=4)
        assert torch.equal(wide, lite.decode(lite_latent))
