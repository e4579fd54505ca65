"""The streaming engine's host work between chunks does not wait for the GPU (run on the device).

With audio_stream and pinned_memory the engine encodes the next chunk's audio on a side stream and draws and stages
the next chunk's noise while the GPU still runs the current chunk. Any blocking copy there (a host-made index
tensor, a pageable waveform) holds the host until the side stream's queue, starved by the decode, has run, and the
GPU idles between chunks (a 5-6 ms gap per Pro chunk in the session-8 trace). CUDA's sync debug mode turns every
synchronising call into an error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _util import speech_16k

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model", ["tiny", "lite"])  # the shipped mel encoder; wav2vec2 (random init)
def test_next_chunk_audio_and_noise_are_prepared_without_a_host_sync(model):
    from flashhead.benchmark import BenchSettings, build_pipeline
    from flashhead.pipeline.speed import SpeedConfig
    from flashhead.pipeline.stream import StreamEngine

    pipe = build_pipeline(BenchSettings(model=model, dtype="bfloat16"))[0]
    pipe.optimize(SpeedConfig.parse("pinned_memory=on,audio_stream=on"))
    engine = StreamEngine(pipe)
    image = np.random.default_rng(0).integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)
    session = engine.open_session(image, seed=0)
    session.push_audio(speech_16k(3 * pipe.new_frames / 25))
    first = engine.step()  # the first round allocates and picks kernels; what follows is the steady state
    assert first and first[0].frames.shape[0] > 0
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine._encode_audio_ahead([session])
        staged = pipe.stage_noise(pipe.draw_noise(session.generator))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert session.audio_ahead is not None and session.audio_ahead.context.is_cuda
    assert staged.initial.is_cuda and all(r.is_cuda for r in staged.renoise or [])
