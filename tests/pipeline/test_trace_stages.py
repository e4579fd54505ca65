"""benchmarks/trace_stages.py: GPU work is charged to the stage whose host range launched it (by Kineto's
correlation ids), the rest is listed by kernel, busy time is the union of kernel intervals; and StageTimer
leaves the named ranges it relies on in a real profiler trace."""

from __future__ import annotations

import json

import torch

from _util import load_benchmark
from flashhead.pipeline.timing import StageTimer


def trace_stages():
    return load_benchmark("trace_stages")


def x(cat, name, ts, dur, pid=1, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur, "args": args}


def test_kernels_are_charged_to_the_launching_stage():
    events = [
        x("user_annotation", "stage:dit", 0, 100),
        x("user_annotation", "stage:vae_decode", 200, 100),
        x("user_annotation", "stage:color_correction", 220, 10),  # nested inside the decode range
        x("cuda_runtime", "cudaLaunchKernel", 10, 1, correlation=1),
        x("cuda_runtime", "cudaGraphLaunch", 50, 1, correlation=2),
        x("cuda_runtime", "cudaLaunchKernel", 150, 1, correlation=3),  # between the stages
        x("cuda_runtime", "cudaLaunchKernel", 225, 1, correlation=4),  # in the nested range
        x("cuda_runtime", "cudaLaunchKernel", 250, 1, correlation=5),  # in the decode, after the nested range
        x("cuda_runtime", "cudaMemcpyAsync", 160, 1, correlation=6),
        x("user_annotation", "stage:dit", 0, 1000, tid=2),  # another thread's range holds no launch of tid 1
        x("kernel", "gemm", 20, 3000, pid=0, tid=7, correlation=1, device=0),
        x("kernel", "graph_kernel", 3100, 1000, pid=0, tid=7, correlation=2, device=0),
        x("kernel", "to_uint8", 5000, 500, pid=0, tid=7, correlation=3, device=0),
        x("kernel", "to_uint8", 5200, 500, pid=0, tid=8, correlation=3, device=0),  # overlaps the one before
        x("kernel", "match_colors", 6000, 200, pid=0, tid=7, correlation=4, device=0),
        x("kernel", "conv", 6300, 700, pid=0, tid=7, correlation=5, device=0),
        x("gpu_memcpy", "Memcpy DtoH", 7000, 1000, pid=0, tid=9, correlation=6, device=0),
        x("kernel", "unlaunched", 9000, 100, pid=0, tid=7, correlation=99, device=0),
    ]
    report = trace_stages().stage_breakdown({"traceEvents": events})
    assert report["gpu_ms_by_stage"] == {
        "dit": 4.0, "(outside every stage)": 2.1, "vae_decode": 0.7, "color_correction": 0.2,
    }  # fmt: skip
    assert report["outside_top"] == [["to_uint8", 2, 1.0], ["Memcpy DtoH", 1, 1.0], ["unlaunched", 1, 0.1]]
    assert report["top_by_stage"] == {  # each stage's own kernels, biggest first
        "dit": [["gemm", 1, 3.0], ["graph_kernel", 1, 1.0]], "vae_decode": [["conv", 1, 0.7]],
        "color_correction": [["match_colors", 1, 0.2]],
    }  # fmt: skip
    assert report["tensor_core_ms_by_stage"] == {"dit": 3.0, "vae_decode": 0.0, "color_correction": 0.0,
                                                 "(outside every stage)": 0.0}  # fmt: skip
    tc = trace_stages().is_tensor_core_kernel
    assert tc("nvjet_sm90_tst_192x192_64x4_4x2_h_bz_coopB_bias_TNN") and tc("sm90_xmma_fprop_implicit_gemm_bf16")
    assert tc("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") and tc("void cutlass::Kernel2<x>")
    assert not tc("triton_poi_fused_convolution_52") and not tc("triton_per_fused__scaled_dot_product_cudnn_attention")
    # Busy (microseconds): 20..3020, 3100..4100, 5000..5700 (two overlapping kernels), 6000..6200, 6300..8000,
    # 9000..9100; the span runs from 20 to 9100.
    assert report["devices"]["0"] == {"busy_ms": 6.7, "span_ms": 9.08}


def test_host_side_of_the_stage_thread():
    events = [
        x("user_annotation", "stage:dit", 0, 100),
        x("user_annotation", "stage:vae_decode", 300, 200),
        x("cuda_runtime", "cudaGraphLaunch", 10, 80),  # a launch blocked on a full queue
        x("cuda_runtime", "cudaLaunchKernel", 310, 5),
        x("cuda_runtime", "cudaLaunchKernel", 320, 5),
        x("cuda_runtime", "cudaMemsetAsync", 330, 5),
        x("cpu_op", "aten::copy_", 600, 100),
        x("cuda_runtime", "cudaEventSynchronize", 800, 200),  # waiting for the GPU, outside the stages
        x("user_annotation", "stage:dit", 0, 2000, tid=2),  # one range on another thread: not the stage thread
    ]
    host = trace_stages().host_breakdown({"traceEvents": events})
    assert host["thread"] == [1, 1] and host["span_ms"] == 1.0
    # Busy: 0..100, 300..500, 600..700, 800..1000 = 0.6 ms of the 1 ms span; 0.2 ms of it waiting.
    assert (host["busy_ms"], host["busy_fraction"], host["waiting_ms"]) == (0.6, 0.6, 0.2)
    assert host["by_stage"] == {
        "dit": {"host_ms": 0.1, "ranges": 1, "runtime_calls": 1, "launches": 1},
        "vae_decode": {"host_ms": 0.2, "ranges": 1, "runtime_calls": 3, "launches": 2},
    }
    assert trace_stages().host_breakdown({"traceEvents": [x("cpu_op", "aten::mm", 0, 10)]}) == {}


def test_stage_timer_ranges_reach_the_profiler_trace(tmp_path):
    timer = StageTimer(sync=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with timer("dit"):
            torch.randn(64, 64) @ torch.randn(64, 64)
        with timer("vae_decode"):
            torch.randn(8, 8).sum()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    trace = trace_stages().load_trace(path)
    names = [e["name"] for e in trace["traceEvents"] if e.get("cat") == "user_annotation"]
    assert names.count("stage:dit") == 1 and names.count("stage:vae_decode") == 1
    assert set(timer.summary()) == {"dit", "vae_decode"}
    # No GPU here: nothing to charge, but the report is well formed (and JSON).
    report = trace_stages().stage_breakdown(trace)
    assert report["gpu_ms_by_stage"] == {} and report["devices"] == {} and json.dumps(report)


def test_pacing_of_the_chunk_loop():
    """DiT-to-DiT periods on the loop's stream, that stream's waits between stages (not the gaps inside a stage's
    range, which are its work on other streams, nor a side stream's work), and the long host calls."""
    g = "gpu_user_annotation"
    events = [
        x(g, "stage:dit", 0, 2000, pid=0, tid=7),
        x(g, "stage:vae_decode", 4000, 500, pid=0, tid=7),  # after a 2 ms wait on the loop stream
        x(g, "stage:dit", 5000, 1000, pid=0, tid=7),
        x(g, "stage:dit", 5000, 10, pid=0, tid=9),  # a sub-range on another stream: not the loop
        x(g, "stage:dit", 7500, 1000, pid=0, tid=7),
        x("kernel", "gemm", 0, 300, pid=0, tid=7, device=0),
        x("kernel", "gemm", 1800, 200, pid=0, tid=7, device=0),  # 1.5 ms inside the DiT: its other streams' time
        x("kernel", "side", 2200, 1500, pid=0, tid=9, device=0),  # the audio's stream: the loop still waits
        x("kernel", "conv", 4000, 500, pid=0, tid=7, device=0),
        x("kernel", "gemm", 5000, 1000, pid=0, tid=7, device=0),
        x("kernel", "gemm", 7500, 1000, pid=0, tid=7, device=0),
        x("cuda_runtime", "cudaGraphLaunch", 100, 25000),
        x("cuda_runtime", "cudaLaunchKernel", 200, 5),
    ]
    report = trace_stages().pacing({"traceEvents": events}, gap_ms=1.0, call_ms=20.0)
    assert report["dit_to_dit_ms"] == [5.0, 2.5]
    gaps = report["loop_stream_gaps"]["0"]
    # 2000..4000 between the DiT and the decode (2 ms), 6000..7500 between the DiT and the next one (1.5 ms).
    assert gaps["count"] == 2 and gaps["largest"] == [[2.0, "dit", "vae_decode"], [1.5, "dit", "dit"]]
    assert report["long_host_calls"] == [["cudaGraphLaunch", 25.0]]
    assert trace_stages().pacing({"traceEvents": []}) == {"dit_to_dit_ms": [], "loop_stream_gaps": {},
                                                          "long_host_calls": []}  # fmt: skip
