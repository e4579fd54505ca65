"""The benchmark's stream figures: steady FPS is a chunk per period after the first chunk."""

from __future__ import annotations

import numpy as np
import pytest

from _tiny import tiny_pipeline
from flashhead.benchmark import run_stream, steady_fps, timed_stream
from flashhead.pipeline.stream import StreamEngine


def test_steady_fps_is_a_chunk_per_period_between_the_first_and_the_last_hand_out():
    # First chunk after 0.9 s (its latency), then one every 0.5 s; the final one is short but costs a whole period.
    deliveries = [(0.9, 24), (1.4, 24), (1.9, 24), (2.4, 24), (2.9, 7)]
    assert steady_fps(deliveries, 24) == pytest.approx(24 / 0.5)
    # Launching ahead, the chunks in between are handed out late (once the next one is queued): no bias.
    assert steady_fps([(0.9, 24), (1.8, 24), (2.3, 24), (2.8, 24), (2.9, 7)], 24) == pytest.approx(24 / 0.5)
    assert steady_fps(deliveries[:1], 24) is None  # one chunk: no pace yet


def test_run_stream_reports_every_chunk_as_it_is_handed_out():
    pipe, _, _ = tiny_pipeline("lite")
    image = np.random.default_rng(0).integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)
    samples = (0.1 * np.sin(np.arange(int(2.3 * 16000)) / 16000 * 2 * np.pi * 180)).astype(np.float32)
    deliveries = []
    engine = StreamEngine(pipe)
    first, total, frames = run_stream(engine, image, samples, deliveries=deliveries)
    assert sum(n for _, n in deliveries) == len(frames) == -(-len(samples) // 640)  # a frame per started 40 ms
    times = [t for t, _ in deliveries]
    assert times == sorted(times) and times[0] >= first and times[-1] <= total
    assert len(deliveries) >= 3 and all(n == pipe.new_frames for _, n in deliveries[:-1])
    period = (deliveries[-1][0] - deliveries[0][0]) / (len(deliveries) - 1)
    assert steady_fps(deliveries, pipe.new_frames) == pytest.approx(pipe.new_frames / period)
    # What the benchmarks call: the same stream's frames, its time and its steady rate.
    again, seconds, steady = timed_stream(engine, image, samples)
    assert np.array_equal(again, frames) and seconds > 0 and 0 < steady < float("inf")
