"""Every speed switch keeps the output: full-size Lite and Pro (random weights), same seed, plain eager bf16
against each switch and against all of them, PSNR >= 40 dB on the uint8 frames (run on the device).

FP8 and decode_new_only are approximate by design: their PSNR is printed, not asserted.
"""

from __future__ import annotations

import json
import math
import wave

import numpy as np
import pytest
import torch

from _util import MEDIA

pytestmark = pytest.mark.gpu

CASES = {
    "rope_table": "rope_table=on",
    "cond_cache": "cond_cache=on",
    "attention_cudnn": "attention=cudnn",
    "attention_flash": "attention=flash",
    "cudnn_benchmark": "cudnn_benchmark=on",
    "pinned_memory": "pinned_memory=on",
    "audio_stream": "audio_stream=on",
    "compile_color": "compile_color=on",
    "compile_dit": "compile_dit=on,rope_table=on",
    "cuda_graphs": "cuda_graphs=on",
    "compile_vae": "compile_vae=on",
    "all": "optimized",
}
REPORT_ONLY = {"decode_new_only": "decode_new_only=on", "fp8": "fp8=on"}  # fp8 last: it cannot be undone


def speech_16k(seconds: float) -> np.ndarray:
    with wave.open(str(MEDIA / "audio" / "speech_en_two_speakers_16k_30s.wav")) as w:
        pcm = np.frombuffer(w.readframes(int(seconds * 16000)), dtype=np.int16)
    return pcm.astype(np.float32) / 32768


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def stream_frames(pipe, switches: str) -> np.ndarray:
    from flashhead.pipeline.speed import SpeedConfig
    from flashhead.pipeline.stream import StreamEngine

    speed = SpeedConfig.optimized() if switches == "optimized" else SpeedConfig.parse(switches)
    pipe.optimize(speed)
    engine = StreamEngine(pipe)
    image = np.random.default_rng(0).integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)
    audio = speech_16k(2 * pipe.new_frames / 25)  # two chunks: a first one and a later one
    session = engine.open_session(image, seed=0)
    session.push_audio(audio)
    session.end()
    frames = np.concatenate([c.frames for c in engine.run_until_idle()])
    return frames


@pytest.fixture(scope="module", params=["lite", "pro"])
def plain(request):
    from flashhead.benchmark import BenchSettings, build_pipeline

    pipe, _ = build_pipeline(BenchSettings(model=request.param))  # official config, random weights, bf16
    return pipe, stream_frames(pipe, "")


@pytest.mark.parametrize("case", list(CASES) + list(REPORT_ONLY))
def test_switch_keeps_the_frames(plain, case):
    pipe, reference = plain
    if case == "fp8":
        pytest.importorskip("torchao")
    try:
        frames = stream_frames(pipe, {**CASES, **REPORT_ONLY}[case])
    finally:
        if case != "fp8":
            pipe.optimize(None)
    assert frames.shape == reference.shape
    value = psnr(frames, reference)
    print(json.dumps({"model": pipe.name, "case": case, "psnr_db": None if math.isinf(value) else round(value, 2)}))
    if case in CASES:
        assert value >= 40.0, f"{case}: {value:.1f} dB against the plain bf16 path"
    torch.cuda.synchronize()
