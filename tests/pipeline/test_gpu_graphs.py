"""Device test: CUDA-graph replays (flashhead.pipeline.graphs) give what the calls give, on new inputs each time.

The pipeline-level check (frames with `vae_cuda_graphs` against the plain path, Lite / Pro / tiny) is in
test_gpu_speed.py; here the pieces: a replay against the eager call, a failed capture, and the Wan strip decode and
encode that the sequence-parallel ranks replay (compiled, channels-last, kernel padding: the `--optimized` VAE).
"""

from __future__ import annotations

import logging

import pytest
import torch

from _tiny import tiny_vae
from flashhead.parallel.vae import decode_strip
from flashhead.parallel.wan_encode import WanStripEncoder
from flashhead.pipeline.fast_path import apply_vae_switches
from flashhead.pipeline.graphs import GraphedCall, graphed
from flashhead.pipeline.speed import SpeedConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_replay_equals_the_call_on_new_inputs_and_keeps_earlier_outputs():
    def fn(x, w, power):
        return torch.tanh(x @ w) ** power

    call = GraphedCall(fn, "fn")
    w = torch.randn(64, 64, device="cuda")
    inputs = [torch.randn(32, 64, device="cuda") for _ in range(3)]
    outs = [call(x, w, 2) for x in inputs]
    assert len(call.graphs) == 1 and next(iter(call.graphs.values())) is not None  # captured once, replayed
    for x, out in zip(inputs, outs, strict=True):  # each output is its own tensor, not the graph's buffer
        torch.testing.assert_close(out, fn(x, w, 2), rtol=0, atol=0)
    call(inputs[0], w, 3)
    assert len(call.graphs) == 2  # another setting, another graph


def test_failed_capture_runs_eagerly_with_a_warning(caplog):
    calls = []

    def refuses_capture(x):
        calls.append(torch.cuda.is_current_stream_capturing())
        if calls[-1]:
            raise RuntimeError("not capturable")
        return x * 2

    call = GraphedCall(refuses_capture, "refuses_capture")
    x = torch.ones(4, device="cuda")
    with caplog.at_level(logging.WARNING, logger="flashhead.pipeline.graphs"):
        first, second = call(x), call(x * 3)
    assert "capture failed" in caplog.text and "not capturable" in caplog.text
    assert list(call.graphs.values()) == [None] and calls.count(True) == 1  # tried once, then eager for good
    torch.testing.assert_close(first, x * 2)
    torch.testing.assert_close(second, x * 6)


def test_strip_decode_and_encode_replay_the_compiled_strips():
    vae = tiny_vae("pro").to("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    latents = [torch.randn(1, 16, 3, 8, 6, device="cuda", generator=gen) for _ in range(2)]
    videos = [torch.rand(1, 3, 5, 64, 48, device="cuda", generator=gen) * 2 - 1 for _ in range(2)]
    encoder = WanStripEncoder(vae.model)
    results = {}
    torch._dynamo.reset()
    for switch in (False, True):
        apply_vae_switches(vae, SpeedConfig(vae_conv_pad=True, vae_channels_last=True, compile_vae=True,
                                            vae_cuda_graphs=switch))  # fmt: skip
        with torch.no_grad():
            results[switch] = [decode_strip(vae, z, 4, 8, 0) for z in latents] + [
                graphed(vae, "strip_encode", encoder.features)(v, 0, 4) for v in videos
            ]
        if switch:
            assert all(g is not None for call in vae._graphed_calls.values() for g in call.graphs.values())
            assert set(vae._graphed_calls) == {"strip_decode", "strip_encode"}
    apply_vae_switches(vae, SpeedConfig())
    for got, want in zip(results[True], results[False], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(results[True][0], results[True][1])  # the replay read the second latent
