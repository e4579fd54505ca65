"""Sequence parallel on CPU: 2 gloo processes (torchrun) against the single-process computation.

The worker (tests/parallel/_sp_worker.py) saves each rank's results; the references are computed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _util import REPO
from flashhead.errors import ConfigError
from flashhead.parallel import partition_tokens
from flashhead.parallel.attention import sdpa_kernel
from flashhead.parallel.vae import decode_strip, split_decode, strip_bounds

WORKER = Path(__file__).with_name("_sp_worker.py")
sys.path.insert(0, str(WORKER.parent))
import _sp_worker as worker  # noqa: E402


def torchrun(out: Path, *cases: str, nproc: int = 2) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), str(out), *cases]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc)]


@pytest.fixture(scope="module")
def core(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("sp_core"), "ulysses", "ring", "dit-4", "dit-3", "decode")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("sp_pipe"), "pipeline-plain", "pipeline-rope_table+cond_cache")


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


def test_split_decode_gathers_the_strips(core):
    """halo=2 really splits the 8 latent rows: the result is the strips' decode, and close to the full decode."""
    from _tiny import tiny_vae

    vae, latent = tiny_vae("pro"), worker.split_decode_latent()
    with torch.no_grad():
        strips = torch.cat([decode_strip(vae, latent, a, b, 2) for a, b in strip_bounds(8, 2)], dim=-2)
        full = vae.decode(latent)
    for r in core:
        torch.testing.assert_close(r["decode"], strips, rtol=0, atol=1e-6)
    assert not torch.equal(strips, full)  # it is approximate; the bound is what docs/performance.md states
    psnr = 10 * torch.log10(4 / (strips - full).pow(2).mean())
    assert psnr > 20


def test_split_decode_single_rank_and_wide_halo_are_exact():
    from _tiny import tiny_vae
    from flashhead.parallel import SequenceParallelGroup

    vae, latent = tiny_vae("pro"), worker.split_decode_latent()
    with torch.no_grad():
        full = vae.decode(latent)
        # one rank, or a halo that covers the frame: plain decode, no collective needed
        assert torch.equal(split_decode(vae, latent, SequenceParallelGroup(0, 1, torch.device("cpu"))), full)
        assert torch.equal(split_decode(vae, latent, SequenceParallelGroup(1, 2, torch.device("cpu")), halo=8), full)


@pytest.mark.parametrize("speed", ["plain", "rope_table+cond_cache"])
def test_two_process_pipeline_equals_single_process(pipeline, speed):
    """Tiny Pro pipeline: two chunks and a whole 1.2 s video under 2 processes == one process (plain and fast path)."""
    from _tiny import tiny_pipeline

    pipe = tiny_pipeline("pro")[0]
    expected = worker.pipeline_run(pipe, None if speed == "plain" else speed.replace("+", ","))
    got = pipeline[0]
    assert not any(k.startswith("pipeline") for k in pipeline[1])  # followers return nothing
    for key in ("a_latents", "a_video", "b_latents", "b_video"):
        torch.testing.assert_close(got[f"pipeline-{speed}.{key}"], expected[key], rtol=0, atol=2e-5)
    frames, ref = got[f"pipeline-{speed}.frames"].numpy(), expected["frames"].numpy()
    assert frames.shape == ref.shape and len(ref) == 30
    # uint8 frames: float32 reduction order may move a value across a rounding boundary, nothing more
    assert np.abs(frames.astype(int) - ref.astype(int)).max() <= 1
