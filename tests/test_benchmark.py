"""The benchmark's stream figures: steady FPS is a chunk per period after the first chunk."""

from __future__ import annotations

import threading
import time

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
    deliveries, parts = [], []
    engine = StreamEngine(pipe)
    first, total, frames = run_stream(engine, image, samples, deliveries=deliveries, first_frame_parts=parts)
    # Where the first frame's time went: its round queued (on the CPU everything runs as it is queued, so that is
    # nearly all of it), then the host's wait for the frames.
    (split,) = parts
    assert 0 < split["round_queued_ms"] <= 1000 * first + 1 and 0 <= split["host_wait_ms"] <= 1000 * first
    assert sum(n for _, n in deliveries) == len(frames) == -(-len(samples) // 640)  # a frame per started 40 ms
    times = [t for t, _ in deliveries]
    assert times == sorted(times) and times[0] >= first and times[-1] <= total
    assert len(deliveries) >= 3 and all(n == pipe.new_frames for _, n in deliveries[:-1])
    period = (deliveries[-1][0] - deliveries[0][0]) / (len(deliveries) - 1)
    assert steady_fps(deliveries, pipe.new_frames) == pytest.approx(pipe.new_frames / period)
    # What the benchmarks call: the same stream's frames, its time and its steady rate.
    again, seconds, steady = timed_stream(engine, image, samples)
    assert np.array_equal(again, frames) and seconds > 0 and 0 < steady < float("inf")


def test_a_first_chunk_in_two_pieces_counts_once_and_batched_rounds_are_timed_after_both_kinds_of_chunk():
    """early_first_frames (Pro): the first frame is timed at the first piece, the steady pace by whole chunks; the
    streams measurement warms up on a first and a later round at its batch size and then times two later rounds."""
    from flashhead.benchmark import measure_streams
    from flashhead.pipeline.speed import SpeedConfig

    pipe, _, _ = tiny_pipeline("pro")
    image = np.random.default_rng(1).integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)
    samples = (0.1 * np.sin(np.arange(int(3.0 * 16000)) / 16000 * 2 * np.pi * 180)).astype(np.float32)
    pipe.optimize(SpeedConfig(pinned_memory=True, early_first_frames=True))
    try:
        deliveries = []
        first, _, frames = run_stream(StreamEngine(pipe), image, samples, deliveries=deliveries)
        assert sum(n for _, n in deliveries) == len(frames)
        assert [n for _, n in deliveries[:-1]] == [pipe.new_frames] * (len(deliveries) - 1)  # pieces merged
        assert first < deliveries[0][0]  # the first frames came before the rest of their chunk

        calls = []  # (batch size, whether the decode was asked to pause for first frames)
        original = pipe.generate_chunks
        pipe.generate_chunks = lambda refs, *a, **k: calls.append((len(refs), k.get("first_frames") is not None)) \
            or original(refs, *a, **k)  # fmt: skip
        try:
            result = measure_streams(pipe, image, samples, pipe.new_frames * 640, 2)
        finally:
            del pipe.generate_chunks
    finally:
        pipe.optimize(SpeedConfig())
    assert calls == [(2, True), (2, False), (2, False), (2, False), (2, False)]  # the last one timed by stage
    two = result["by_streams"][2]
    assert two["round_ms"] > 0
    stages = two["stage_ms"]  # where the batched round's time went, every stage of the chunk
    assert {"audio_features", "dit", "vae_decode", "color_correction", "vae_encode_motion"} <= set(stages)
    assert all(ms > 0 for ms in stages.values())
    assert "dit_mfu" in two  # None on the CPU: no peak to divide by


def test_trace_of_a_stream_holds_every_stage_for_trace_stages(tmp_path):
    """`flashhead bench --trace`: a profiled stream whose Chrome trace names the stages (what
    benchmarks/trace_stages.py reads), written whole under the given name."""
    import gzip
    import json

    from flashhead.benchmark import write_trace

    pipe, _, _ = tiny_pipeline("lite")
    image = np.random.default_rng(2).integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)
    samples = (0.1 * np.sin(np.arange(2 * pipe.new_frames * 640) / 16000 * 2 * np.pi * 180)).astype(np.float32)
    path = tmp_path / "lite.json.gz"
    write_trace(StreamEngine(pipe), image, samples, path)
    events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    stages = {e["name"] for e in events if e.get("name", "").startswith("stage:")}
    assert {"stage:dit", "stage:vae_decode", "stage:vae_encode_motion", "stage:audio_features"} <= stages
    assert [p.name for p in tmp_path.iterdir()] == ["lite.json.gz"]  # no temporary left beside it


def test_a_batched_round_is_profiled_beside_the_stream_trace(tmp_path):
    """`flashhead bench --trace T --streams N`: one more batched round under the profiler, its trace beside T, with
    the round's stages named, so trace_stages.py can say which kernels a batched round spends its time in."""
    import gzip
    import json

    from flashhead.benchmark import measure_streams, streams_trace_path

    pipe, _, _ = tiny_pipeline("lite")
    image = np.random.default_rng(3).integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)
    samples = (0.1 * np.sin(np.arange(2 * pipe.new_frames * 640) / 16000 * 2 * np.pi * 180)).astype(np.float32)
    trace = tmp_path / "lite.json.gz"
    assert streams_trace_path(trace, 3) == tmp_path / "lite.streams3.json.gz"
    assert streams_trace_path(tmp_path / "t.json", 3).name == "t.streams3.json.gz"
    calls = []
    original = pipe.generate_chunks
    pipe.generate_chunks = lambda refs, *a, **k: calls.append(len(refs)) or original(refs, *a, **k)
    try:
        result = measure_streams(pipe, image, samples, pipe.new_frames * 640, 3, trace=trace)
    finally:
        del pipe.generate_chunks
    assert calls == [3] * 6  # 2 warm-up, 2 timed, 1 by stage, 1 profiled: every round batched
    assert result["by_streams"][3]["trace"] == str(tmp_path / "lite.streams3.json.gz")
    events = json.loads(gzip.decompress((tmp_path / "lite.streams3.json.gz").read_bytes()))["traceEvents"]
    stages = [e["name"] for e in events if e.get("name", "").startswith("stage:")]
    assert stages.count("stage:dit") == 1  # one round, not a stream
    assert {"stage:vae_decode", "stage:vae_encode_motion", "stage:color_correction"} <= set(stages)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lite.streams3.json.gz"]


def test_video_encode_is_timed_with_the_encoder_that_ran():
    from flashhead.benchmark import video_encode_ms
    from flashhead.media.video_io import nvenc_unavailable_reason

    frames = np.random.default_rng(0).integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    audio = np.zeros(16000 * 10 // 25, np.float32)
    used, ms = video_encode_ms(frames, audio, 25, 16000, "libx264")
    assert used == "libx264" and ms > 0
    used, _ = video_encode_ms(frames, audio, 25, 16000, "auto")
    reason = nvenc_unavailable_reason()
    assert used == (f"libx264 (auto: {reason})" if reason else "h264_nvenc")


@pytest.mark.slow
def test_bench_reports_every_stage_of_the_issue_on_the_cpu():
    """`flashhead bench`'s report on the shipped tiny model (CPU, float32): every stage the speed issue lists,
    video encode included, with the switches and the encoder that ran."""
    from flashhead.benchmark import BenchSettings, run_benchmark

    report = run_benchmark(
        BenchSettings(model="tiny", device="cpu", dtype="float32", seconds=1.2, switches={"video_encoder": "auto"}),
        progress=False,
    )
    stages = report["stage_ms_per_chunk"]
    expected = {"audio_features", "dit", "vae_decode", "vae_encode_motion", "color_correction", "video_encode"}
    assert expected <= set(stages) and all(stages[k] > 0 for k in expected)
    assert report["video_encoder"].startswith(("libx264", "h264_nvenc"))
    assert report["switches"]["video_encoder"] == "auto" and report["steady_fps"] > 0
    assert report["time_to_first_frame_ms"] > 0 and report["dit_ms_per_step"] > 0
    assert report["time_to_first_frame_more_audio_ms"] > 0 and report["session_open_ms"] > 0


def test_video_encode_without_pyav_reports_why_and_no_time(monkeypatch):
    """A GPU image with torch alone (no PyAV): the benchmark's other figures stand, the encode stage says why."""
    import sys

    from flashhead.benchmark import video_encode_ms

    monkeypatch.delitem(sys.modules, "flashhead.media.video_io", raising=False)
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    frames = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    used, ms = video_encode_ms(frames, np.zeros(1280, dtype=np.float32), 25, 16000, "auto")
    assert ms is None and used.startswith("none:") and "av" in used


def test_each_phase_is_named_and_redrawn_while_it_runs():
    import io

    from tqdm import tqdm

    from flashhead.benchmark import _phase

    out = io.StringIO()
    bar = tqdm(total=2, desc="bench", file=out, mininterval=0)
    with _phase(bar, "warm-up: compile", every=0.02):
        time.sleep(0.3)  # a long step: the bar's clock must move while it runs, not only at its end
    drawn = [line for line in out.getvalue().split("\r") if "warm-up: compile" in line]
    assert bar.n == 1 and len(drawn) >= 5
    with pytest.raises(RuntimeError), _phase(bar, "steady stream", every=0.02):
        raise RuntimeError("a failed step")
    assert bar.n == 1  # a failed step is not counted as done
    assert not [t for t in threading.enumerate() if t.name == "bench-progress"]  # its redraw thread has stopped
    bar.close()


def test_dit_mfu_says_it_is_counted_against_the_bf16_peak_and_flags_fp8():
    """The DiT's MFU is always against the dense bf16 peak; with fp8's float8 linears (twice that peak) the report
    says so, so an fp8 figure is not read as the bf16 path's."""
    from flashhead.benchmark import dit_utilisation

    pipe, _, _ = tiny_pipeline("lite")
    plain = dit_utilisation(pipe, 1.0)
    assert plain["dit_mfu_basis"] == "dense bf16 peak"
    pipe.dit._flashhead_fp8 = True  # what quantize_fp8 marks (float8 needs a GPU)
    assert "fp8" in dit_utilisation(pipe, 1.0)["dit_mfu_basis"]
