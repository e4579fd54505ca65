"""The tiny Pro pipeline under 2 gloo processes (torchrun) against one process: chunks, a whole video.

Split from test_sequence_parallel.py (same worker, tests/parallel/_sp_worker.py) to keep each file short.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _sp_worker as worker  # noqa: E402
from _sp_worker import torchrun  # noqa: E402

# The KV-gather and X-gather splits of self-attention (pipeline_kv, pipeline_xg) run the fast path: the engine's
# streaming code path.
CASES = ("pipeline-plain", "pipeline-rope_table+cond_cache", "pipeline_kv-rope_table+cond_cache",
         "pipeline_xg-rope_table+cond_cache")  # fmt: skip
STREAM = "stream-rope_table+cond_cache"  # launch_ahead off: a split pipeline's engine launches ahead anyway
# Each rank's strip decoded in vae_whole_chunk's calls (two sessions batched: calls bounded over the batch)
STREAM_WHOLE = "stream-rope_table+cond_cache+vae_whole_chunk+vae_conv_pad"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return torchrun(tmp_path_factory.mktemp("sp_pipe"), *CASES, STREAM, STREAM_WHOLE)


@pytest.fixture(scope="module")
def expected():
    """One single-process reference for both: the fast switches used here do not change float32 results."""
    from _tiny import tiny_pipeline

    return worker.pipeline_run(tiny_pipeline("pro")[0], None)


@pytest.mark.parametrize("case", CASES)
def test_two_process_pipeline_equals_single_process(pipeline, expected, case):
    """Tiny Pro pipeline: two chunks (and the first's split motion re-encode) and a whole 1.2 s video under 2
    processes == one process (plain and fast path; Ulysses, KV-gather and X-gather attention)."""
    got = pipeline[0]
    # followers return nothing but whether they split-encoded the motion frames with the leader (Wan: they do)
    assert [k for k in pipeline[1] if k.endswith("follower_encoded")] == [f"{c}.follower_encoded" for c in CASES]
    assert bool(pipeline[1][f"{case}.follower_encoded"])
    # ... and colour-corrected its block of every chunk's frames (2 chunks, then the whole video's chunks)
    colored = pipeline[1][f"{case}.follower_colored"].tolist()
    assert len(colored) >= 3 and set(colored) == {expected["a_video"].shape[2]}
    for key in ("a_latents", "a_video", "a_motion", "b_latents", "b_video"):
        # Latents move by ~1e-6 (KV gather sums each softmax in two parts, X gather each RMS norm; Ulysses projects
        # half the tokens, whose float32 GEMMs some CPUs round differently: AMD EPYC, session 11), and the tiny
        # random VAE's decode amplifies that ~100x in the videos.
        atol = 2e-3 if key.endswith("video") else 2e-5
        label = lambda m, key=key: f"{key}: {m}"  # noqa: E731
        torch.testing.assert_close(got[f"{case}.{key}"], expected[key], rtol=0, atol=atol, msg=label)
    frames, ref = got[f"{case}.frames"].numpy(), expected["frames"].numpy()
    assert frames.shape == ref.shape and len(ref) == 30
    # uint8 frames: float32 reduction order may move a value across a rounding boundary, nothing more
    assert np.abs(frames.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("case", [STREAM, STREAM_WHOLE])
def test_two_process_stream_launching_rounds_ahead_equals_single_process(pipeline, case):
    """The leader's engine queues each next round before it waits for the current one's frames (as it always does
    when split, without the launch_ahead switch): the announcements reach the followers on the host-side group, in
    order, and the frames are one process's (plain), with the per-frame strip decode and with whole chunks."""
    from _tiny import tiny_pipeline

    expected = worker.stream_run(tiny_pipeline("pro")[0], None)
    got = pipeline[0]
    flights = got[f"{case}.in_flight"].tolist()
    assert flights[1:-1] and all(flights[1:-1]) and not flights[0] and not flights[-1]  # rounds launched ahead
    call_frames = set(got[f"{case}.decoder_call_frames"].tolist())
    assert call_frames == {1} if case == STREAM else max(call_frames) > 1  # the strips' loop, or whole-chunk calls
    for i in (0, 1):
        frames, ref = got[f"{case}.frames{i}"].numpy(), expected[f"frames{i}"].numpy()
        assert frames.shape == ref.shape and len(ref) == round(int(16000 * (2.3, 1.1)[i]) / 640)
        assert np.abs(frames.astype(int) - ref.astype(int)).max() <= 1
