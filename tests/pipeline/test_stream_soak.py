"""Ten minutes of audio through one stream: memory and time per chunk stay flat (infinite-length claim)."""

from __future__ import annotations

import json
import resource
import time

import numpy as np
import pytest

from _tiny import tiny_pipeline
from _util import MEDIA
from flashhead.media.audio_io import load_audio
from flashhead.pipeline.stream import StreamEngine


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.slow
def test_ten_minutes_of_audio_in_one_stream_stays_flat():
    pipe, _, _ = tiny_pipeline("lite", height=32, width=32)
    speech, _ = load_audio(MEDIA / "audio" / "speech_en_two_speakers_16k_30s.wav")
    audio = np.tile(speech, 20)[: 600 * 16000]  # 10 minutes
    engine = StreamEngine(pipe)
    session = engine.open_session(np.full((32, 32, 3), 120, np.uint8), seed=0)
    piece = 16000  # one second at a time, generating as soon as chunks are ready
    chunk_ms, rss, frames = [], [], 0
    for start in range(0, len(audio), piece):
        session.push_audio(audio[start : start + piece])
        t0 = time.perf_counter()
        produced = engine.step()
        if produced:
            chunk_ms.append(1000 * (time.perf_counter() - t0))
            rss.append(rss_mib())
            frames += sum(len(c.frames) for c in produced)
    session.end()
    frames += sum(len(c.frames) for c in engine.run_until_idle())
    assert frames == 600 * 25
    n = len(chunk_ms) // 10
    first, last = np.median(chunk_ms[n : 2 * n]), np.median(chunk_ms[-n:])
    report = {
        "chunks": len(chunk_ms), "frames": frames,
        "chunk_ms_median_early": round(float(first), 1), "chunk_ms_median_late": round(float(last), 1),
        "rss_mib_early": round(rss[n], 1), "rss_mib_late": round(rss[-1], 1), "rss_mib_max": round(max(rss), 1),
    }  # fmt: skip
    print("SOAK", json.dumps(report))
    assert last < 1.5 * first + 5  # no growth in time per chunk
    assert rss[-1] - rss[n] < 50  # no growth in memory (MiB) after warm-up
