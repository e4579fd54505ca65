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
    """A chunk of a 10-minute-old stream costs what a chunk of a new stream costs, and memory does not grow.

    The late chunks are compared with a control stream opened for the last minute and stepped in turn with the
    old one (its own engine, same pipeline), so both see the same load on the machine: comparing with the
    stream's own early chunks, minutes apart, measured the machine's other work as much as the stream.
    """
    pipe, _, _ = tiny_pipeline("lite", height=32, width=32)
    speech, _ = load_audio(MEDIA / "audio" / "speech_en_two_speakers_16k_30s.wav")
    audio = np.tile(speech, 20)[: 600 * 16000]  # 10 minutes
    portrait = np.full((32, 32, 3), 120, np.uint8)
    engine = StreamEngine(pipe)
    session = engine.open_session(portrait, seed=0)
    control_engine, control = StreamEngine(pipe), None
    piece = 16000  # one second at a time, generating as soon as chunks are ready
    chunk_ms, control_ms, rss, frames = [], [], [], 0
    for second, start in enumerate(range(0, len(audio), piece)):
        if second == 540:  # the last minute: a new stream beside the old one
            rss_before_control = rss_mib()
            control = control_engine.open_session(portrait, seed=1)
        session.push_audio(audio[start : start + piece])
        t0 = time.perf_counter()
        produced = engine.step()
        if produced:
            chunk_ms.append(1000 * (time.perf_counter() - t0))
            rss.append(rss_mib())
            frames += sum(len(c.frames) for c in produced)
        if control is not None:
            control.push_audio(audio[start : start + piece])
            t0 = time.perf_counter()
            if control_engine.step():
                control_ms.append(1000 * (time.perf_counter() - t0))
    session.end()
    frames += sum(len(c.frames) for c in engine.run_until_idle())
    assert frames == 600 * 25
    n = len(chunk_ms) // 10
    skip = 5  # the control's first chunks (no motion frames yet, caches filling)
    early, late = np.median(chunk_ms[n : 2 * n]), np.median(chunk_ms[-n:])
    fresh = np.median(control_ms[skip:])
    report = {
        "chunks": len(chunk_ms), "frames": frames, "control_chunks": len(control_ms),
        "chunk_ms_median_early": round(float(early), 1), "chunk_ms_median_late": round(float(late), 1),
        "chunk_ms_median_new_stream_meanwhile": round(float(fresh), 1),
        "rss_mib_early": round(rss[n], 1), "rss_mib_at_540s": round(rss_before_control, 1),
        "rss_mib_max": round(max(rss), 1),
    }  # fmt: skip
    print("SOAK", json.dumps(report))
    assert len(control_ms) - skip >= n // 2
    assert late < 1.5 * fresh + 5  # no growth in time per chunk with the stream's age
    assert rss_before_control - rss[n] < 50  # no growth in memory (MiB) after warm-up
