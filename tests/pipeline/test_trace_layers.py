"""benchmarks/trace_layers.py: layers between marker kernels, GPU time by kind, and the time no compute kernel runs."""

from __future__ import annotations

import pytest

from _util import load_benchmark


def trace_layers():
    return load_benchmark("trace_layers")


def k(name, ts, dur, tid=7, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": tid, "ts": ts, "dur": dur}


def layer(t0):
    return [
        k("nvjet_sm90_gelubias_TNN", t0, 10),
        k("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", t0 + 20, 30),
        k("ncclDevKernel_SendRecv", t0 + 45, 40, tid=9),  # waiting for the peer: not compute
        k("nvjet_sm90_tst_bias_TNN", t0 + 60, 10),
        k("triton_poi_fused_add", t0 + 65, 10, tid=8),  # overlaps the GEMM on another stream
        k("Memset (Device)", t0 + 90, 2, cat="gpu_memset"),
    ]


def test_layers_kinds_and_time_without_compute():
    events = layer(0) + layer(100) + layer(200) + layer(600) + [k("nvjet_sm90_gelubias_TNN", 700, 10)]
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 5, "dur": 500})
    report = trace_layers().layer_report({"traceEvents": events}, listing=True)
    assert report["layers"] == 3  # 0-100, 100-200, 600-700; 200-600 holds a chunk boundary (over twice the median)
    assert report["period_us"]["median"] == 100
    # covered by compute: 0-10, 20-50, 60-75, 90-92 = 57 of 100
    assert report["no_compute_us"] == 43
    assert report["kernel_us_by_kind"] == {"attention": 30, "gemm": 20, "memset_memcpy": 2, "nccl": 40, "triton": 10}
    names = [row[3] for row in report["median_layer"]]
    assert names[:2] == ["nvjet_sm90_gelubias_TNN", "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"]


def test_listing_table_shows_the_time_without_compute_before_each_kernel():
    events = layer(0) + layer(100) + layer(200) + [k("nvjet_sm90_gelubias_TNN", 300, 10)]
    report = trace_layers().layer_report({"traceEvents": events}, listing=True)
    lines = trace_layers().listing_table(report["median_layer"])
    gaps = [line[24:30].strip() for line in lines]
    # GEMM at 0; attention after 10 idle; NCCL (blank); GEMM after 10 (attention ended at 50); the Triton kernel
    # overlaps that GEMM (0); the memset after 15 (compute ended at 75)
    assert gaps == ["0.0", "10.0", "", "10.0", "0.0", "15.0"], lines
    assert lines[1].endswith("cudnn_generated_fort_native_sdpa_sm90_flash_fprop")


def test_too_few_markers_is_an_error():
    with pytest.raises(ValueError, match="fewer than 3"):
        trace_layers().layer_report({"traceEvents": layer(0)})
