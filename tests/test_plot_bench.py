"""benchmarks/plot_bench.py and plot_memory.py: per-stage bars (time, GPU memory) from bench JSONs and from parts of the
docs' results files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _util import REPO, load_benchmark

RESULTS = REPO / "docs" / "results"


def test_bars_come_from_a_bench_json_a_results_file_and_a_speed_matrix_row(tmp_path):
    plot_bench = load_benchmark("plot_bench")
    bench = {"model": "pro", "new_frames_per_chunk": 28, "steady_fps": 56.0, "environment": {"gpu": "GPU X"},
             "stage_ms_per_chunk": {"dit": 300.0, "vae_decode": 150.0, "video_encode": None}}  # fmt: skip
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    bar = plot_bench.load_bar(f"mine={path}")
    # The chunk period from the FPS (28 frames at 56 FPS: 500 ms); a stage that did not run is left out.
    assert bar == {"row": "mine", "model": "pro", "steady_fps": 56.0, "chunk_ms": 500.0, "gpu": "GPU X",
                   "stage_ms_per_chunk": {"dit": 300.0, "vae_decode": 150.0}}  # fmt: skip
    nested = plot_bench.load_bar(f"s30={RESULTS / 'session30.json'}#runs/94_ab_pro_cutlass_rope/pro_base")
    assert nested["model"] == "pro" and nested["gpu"] == "NVIDIA H200" and nested["stage_ms_per_chunk"]["dit"] > 0
    row = plot_bench.load_bar(f"plain={RESULTS / 'speed_matrix_h100_2026-11-26f_pro.json'}#plain")
    assert row["gpu"].startswith("NVIDIA H100") and row["chunk_ms"] > sum(row["stage_ms_per_chunk"].values()) * 0.5


def test_the_script_writes_a_png_and_names_a_missing_key_in_one_line(tmp_path):
    script = str(REPO / "benchmarks" / "plot_bench.py")
    out = tmp_path / "stages.png"
    done = subprocess.run(
        [sys.executable, script, "--out", str(out),
         f"lite={RESULTS / 'session30.json'}#runs/97_ab_lite_rope/lite_base",
         f"pro={RESULTS / 'session30.json'}#runs/94_ab_pro_cutlass_rope/pro_base"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [b["model"] for b in json.loads(done.stdout)["bars"]] == ["lite", "pro"]
    missing = f"x={RESULTS / 'session30.json'}#runs/no_such_run"
    bad = subprocess.run([sys.executable, script, "--out", str(tmp_path / "x.png"), missing],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "no 'no_such_run'" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_memory_groups_take_the_figures_a_bench_has_and_labels_may_hold_an_equals_sign(tmp_path):
    plot_memory = load_benchmark("plot_memory")
    bench = {"model": "pro", "environment": {"gpu": "GPU X"}, "peak_gpu_memory_gib": 29.5,
             "stage_peak_gpu_memory_gib": {"dit": 3.8, "vae_decode": 26.3},
             "gpu_memory_reserved_gib": 68.9}  # fmt: skip
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"runs": {"a": bench}}))
    group = plot_memory.load_memory(f"vae_whole_chunk=on={path}#runs/a")
    assert group == {"label": "vae_whole_chunk=on", "gpu": "GPU X",
                     "gib": {"dit peak": 3.8, "vae_decode peak": 26.3, "whole run's peak": 29.5,
                             "reserved at the end": 68.9}}  # fmt: skip
    out = tmp_path / "memory.png"
    plot_memory.main(["--out", str(out), f"one={path}#runs/a", f"two={RESULTS / 'session32.json'}"
                      "#runs/105_ab_pro_whole_chunk_memory/pro_vae_whole_chunk_off"])  # fmt: skip
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cpu_run = tmp_path / "cpu.json"
    cpu_run.write_text(json.dumps({"model": "tiny", "peak_gpu_memory_gib": None}))
    with pytest.raises(SystemExit, match="no GPU memory figures"):
        plot_memory.load_memory(f"cpu={cpu_run}")


def test_a_batched_rounds_split_gives_its_per_stream_time_rates_and_stream_bounds(tmp_path):
    """benchmarks/plot_batched_round.py on trace_stages.py's split of a 2-stream Lite round: per stream and stage
    the GPU ms and its tensor-core part, the stage's FLOPs and rate, and the two bounds on real-time streams."""
    plot = load_benchmark("plot_batched_round")
    stages = {"gpu_ms_by_stage": {"dit": 60.0, "vae_decode": 30.0, "vae_encode_motion": 10.0,
                                  "color_correction": 4.0, "(outside every stage)": 2.0},
              "tensor_core_ms_by_stage": {"dit": 50.0, "vae_decode": 24.0, "vae_encode_motion": 8.0,
                                          "color_correction": 0.0, "(outside every stage)": 0.0}}  # fmt: skip
    path, png = tmp_path / "stages.json", tmp_path / "round.png"
    path.write_text(json.dumps(stages))
    result = plot.main([str(path), "--model", "lite", "--streams", "2", "--out", str(png)])
    assert result["chunk_ms"] == 960.0  # Lite: 24 new frames at 25 fps
    dit = result["stages"]["dit"]
    assert dit["ms_per_stream"] == 30.0 and dit["tensor_core_ms_per_stream"] == 25.0
    assert 14.0 < dit["tflop_per_stream"] < 14.5  # four steps of the full-size Lite DiT
    assert dit["tensor_core_tflops"] == round(dit["tflop_per_stream"] * 2 / 0.050, 1)
    assert 7.0 < result["stages"]["vae_decode"]["tflop_per_stream"] < 8.5
    assert result["gpu_ms_per_stream"] == 53.0 and result["tensor_core_ms_per_stream"] == 41.0
    assert result["streams_at_measured_gpu_time"] == round(960 / 53, 1)
    assert result["streams_if_only_tensor_core_kernels"] == round(960 / 41, 1)
    needed = 24 * result["tflop_per_stream"] * 1e12 / 0.96 / 989e12
    assert result["peak_fraction_needed_for_24"] == pytest.approx(needed, abs=0.002)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
