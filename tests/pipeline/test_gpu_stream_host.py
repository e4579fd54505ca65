"""The streaming engine's host work between chunks does not wait for the GPU (run on the device).

With audio_stream and pinned_memory the engine encodes the next chunk's audio on a side stream and draws and stages
the next chunk's noise while the GPU still runs the current chunk. Any blocking copy there (a host-made index
tensor, a pageable waveform) holds the host until the side stream's queue, starved by the decode, has run, and the
GPU idles between chunks (a 5-6 ms gap per Pro chunk in the session-8 trace). The profiler records every CUDA
runtime call the host makes while it prepares the next chunk's audio and noise: none may synchronise (CUDA's sync
debug mode misses the blocking copy this test was written for). The CPU twin: tests/models/test_audio.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity

from _util import speech_16k

pytestmark = pytest.mark.gpu

# The profiler itself calls cudaDeviceSynchronize when it starts and stops; the engine never does.
SYNCS = ("cudaStreamSynchronize", "cudaEventSynchronize")


@pytest.mark.parametrize("model", ["tiny", "lite"])  # the shipped mel encoder; wav2vec2 (random init)
def test_side_stream_audio_is_encoded_without_a_host_sync(model):
    from flashhead.benchmark import BenchSettings, build_pipeline
    from flashhead.pipeline.speed import SpeedConfig
    from flashhead.pipeline.stream import StreamEngine

    pipe = build_pipeline(BenchSettings(model=model, dtype="bfloat16"))[0]
    # audio_stream off: the rounds below leave the next slice for the call under the profiler
    pipe.optimize(SpeedConfig.parse("pinned_memory=on"))
    engine = StreamEngine(pipe)
    image = np.random.default_rng(0).integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)
    session = engine.open_session(image, seed=0)
    session.push_audio(speech_16k(4 * pipe.new_frames / 25))
    for _ in range(2):  # allocations, kernel choices
        assert engine.step()[0].frames.shape[0] > 0
    assert session.audio_ahead is None and session.buffered_samples >= session.slice_samples
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine._encode_audio_ahead([session])
        staged = pipe.stage_noise(pipe.draw_noise(session.generator))
    syncs = [e.name for e in prof.events() if e.name in SYNCS]
    assert not syncs, syncs
    assert session.audio_ahead is not None and session.audio_ahead.context.is_cuda
    assert staged.initial.is_cuda and all(r.is_cuda for r in staged.renoise or [])


def test_opening_a_session_queues_the_portraits_encode_and_marks_its_end():
    """With pinned_memory, open_session returns before the GPU has encoded the portrait (no host sync) and records an
    event after the encode, which a server waits for before `ready`; the event completes once the GPU is done."""
    from flashhead.benchmark import BenchSettings, build_pipeline
    from flashhead.pipeline.speed import SpeedConfig
    from flashhead.pipeline.stream import StreamEngine

    pipe = build_pipeline(BenchSettings(model="tiny", dtype="bfloat16"))[0]
    pipe.optimize(SpeedConfig.parse("pinned_memory=on"))  # the portrait and the posterior noise go up unblocking
    engine = StreamEngine(pipe)
    image = np.random.default_rng(0).integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)
    engine.close_session(engine.open_session(image, seed=0).id)  # kernels, allocations
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        session = engine.open_session(image, seed=0)
    assert not [e.name for e in prof.events() if e.name in SYNCS]
    engine.close_session(session.id)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU work queued before the next session's encode
    session = engine.open_session(image, seed=0)
    assert isinstance(session.reference_encoded, torch.cuda.Event) and not session.reference_ready()
    session.reference_encoded.synchronize()
    assert session.reference_ready()
