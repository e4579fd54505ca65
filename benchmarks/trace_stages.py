"""Which stage launched each piece of GPU work in a torch.profiler Chrome trace, and what ran outside every stage.

    python benchmarks/trace_stages.py trace.json.gz        # prints JSON

`StageTimer` wraps each pipeline stage in `record_function("stage:<name>")`. A kernel (or copy / memset) belongs
to the stage whose host range holds the runtime call that launched it (Kineto links the two by their
`correlation` id; a CUDA-graph replay's kernels link to the graph launch). Per chunk that splits the GPU's busy
time into the stages and the rest, the part a per-stage table cannot show (sp_bench: ~20 ms per chunk outside
the timed stages on 1 and 2 GPUs), with the rest's biggest kernels by name. Also the host side (`host`): how
busy the thread running the stages was, how much of it was waiting for the GPU, and each stage's host time,
runtime calls and launches: whether the host or the GPU sets the pace. And the pacing (`pacing`): the GPU time
from one DiT to the next, the chunk loop's stream waiting between stages, and the long host runtime calls.
"""

from __future__ import annotations

import bisect
import gzip
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from flashhead.pipeline.timing import STAGE_PREFIX

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
OUTSIDE = "(outside every stage)"


def load_trace(path: str | Path) -> dict:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (microseconds in, milliseconds out)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1000


def stage_breakdown(trace: dict, top: int = 12) -> dict:
    """GPU milliseconds per launching stage, GPU busy and span time, and the biggest kernels outside the stages."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    # Stage ranges per host thread, sorted by start: the innermost range holding a launch is the last one
    # starting before it that has not ended yet.
    ranges: dict[tuple, list[tuple[float, float, str]]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(STAGE_PREFIX):
            ranges[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"], e["name"][len(STAGE_PREFIX) :]))
    for spans in ranges.values():
        spans.sort()
    starts = {key: [s[0] for s in spans] for key, spans in ranges.items()}
    launches = {}
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):
            launches[e["args"]["correlation"]] = (e["pid"], e["tid"], e["ts"])

    def stage_of(correlation) -> str:
        if correlation not in launches:
            return OUTSIDE
        pid, tid, ts = launches[correlation]
        spans = ranges.get((pid, tid), [])
        last = bisect.bisect_right(starts.get((pid, tid), []), ts) - 1
        for i in range(last, max(last - 8, -1), -1):  # stages nest a level or two at most: 8 back is plenty
            if ts <= spans[i][1]:
                return spans[i][2]
        return OUTSIDE

    by_stage: dict[str, float] = defaultdict(float)
    kernels: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    busy: dict[object, list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        if e.get("cat") not in GPU_CATEGORIES:
            continue
        stage = stage_of(e.get("args", {}).get("correlation"))
        by_stage[stage] += e["dur"] / 1000
        kernels[stage][e["name"][:80]][0] += 1
        kernels[stage][e["name"][:80]][1] += e["dur"] / 1000
        busy[e.get("args", {}).get("device", e.get("pid"))].append((e["ts"], e["ts"] + e["dur"]))
    spans = {
        str(device): {
            "busy_ms": round(_union_ms(intervals), 2),
            "span_ms": round((max(b for _, b in intervals) - min(a for a, _ in intervals)) / 1000, 2),
        }
        for device, intervals in busy.items()
    }
    def ranked(stage: str) -> list:
        biggest = sorted(kernels.get(stage, {}).items(), key=lambda kv: kv[1][1], reverse=True)[:top]
        return [[name, int(count), round(ms, 2)] for name, (count, ms) in biggest]

    return {
        "gpu_ms_by_stage": {k: round(v, 2) for k, v in sorted(by_stage.items(), key=lambda kv: -kv[1])},
        "devices": spans,
        "outside_top": ranked(OUTSIDE),
        # Each stage's biggest kernels (name, launches, GPU ms): where a stage's time goes, e.g. in a batched round.
        "top_by_stage": {stage: ranked(stage) for stage in by_stage if stage != OUTSIDE},
        # The part of each stage's GPU time in tensor-core kernels (GEMMs, convolutions as implicit GEMMs,
        # attention): the compute-bound part, against which the rest (norms, elementwise, copies) is overhead.
        "tensor_core_ms_by_stage": {
            stage: round(float(sum(ms for name, (_, ms) in kernels[stage].items() if is_tensor_core_kernel(name))), 2)
            for stage in by_stage
        },
    }


TENSOR_CORE_MARKS = ("gemm", "nvjet", "xmma", "cutlass", "sdpa", "fmha", "flash_fwd", "flash_fprop", "wgmma")


def is_tensor_core_kernel(name: str) -> bool:
    """A GEMM, an implicit-GEMM convolution or an attention kernel by its name (cuBLAS nvjet / cutlass, cuDNN xmma
    and sdpa, FlashAttention); not Inductor's Triton kernels, whose names carry the aten ops they fuse
    ("convolution" in a pointwise kernel's name is the bias add after one)."""
    lower = name.lower()
    return not lower.startswith("triton_") and any(mark in lower for mark in TENSOR_CORE_MARKS)


HOST_CATEGORIES = ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver")
WAITS = ("cudaEventSynchronize", "cudaDeviceSynchronize", "cudaStreamSynchronize")
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def host_breakdown(trace: dict) -> dict:
    """The host thread that holds the stage ranges: how busy it was, how much of that was waiting for the GPU,
    and per stage its host milliseconds, runtime calls and kernel launches.

    Session 15 found the 2-GPU Pro stream host-bound this way: the thread was busy 95 % of the stream, ~160 ms
    of each chunk in launching the strip decode for ~110 ms of GPU work. A thread that is busy but mostly
    waiting (synchronising calls, or launches blocked on a full queue) means the GPU sets the pace.
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") in HOST_CATEGORIES]
    stages = [e for e in events if e["cat"] == "user_annotation" and str(e["name"]).startswith(STAGE_PREFIX)]
    if not stages:
        return {}
    thread = Counter((e["pid"], e["tid"]) for e in stages).most_common(1)[0][0]
    mine = [e for e in events if (e["pid"], e["tid"]) == thread]
    start, end = min(e["ts"] for e in mine), max(e["ts"] + e["dur"] for e in mine)
    busy = _union_ms([(e["ts"], e["ts"] + e["dur"]) for e in mine])
    waiting = _union_ms([(e["ts"], e["ts"] + e["dur"]) for e in mine if e["name"] in WAITS])
    calls = [e for e in mine if e["cat"] in ("cuda_runtime", "cuda_driver")]
    per_stage: dict[str, dict] = {}
    for r in stages:
        if (r["pid"], r["tid"]) != thread:
            continue
        name = r["name"][len(STAGE_PREFIX) :]
        inside = [c for c in calls if r["ts"] <= c["ts"] <= r["ts"] + r["dur"]]
        entry = per_stage.setdefault(name, {"host_ms": 0.0, "ranges": 0, "runtime_calls": 0, "launches": 0})
        entry["host_ms"] += r["dur"] / 1000
        entry["ranges"] += 1
        entry["runtime_calls"] += len(inside)
        entry["launches"] += sum(c["name"] in LAUNCHES for c in inside)
    span = (end - start) / 1000
    return {
        "thread": list(thread),
        "span_ms": round(span, 2),
        "busy_ms": round(busy, 2),
        "busy_fraction": round(busy / span, 3) if span else None,
        "waiting_ms": round(waiting, 2),
        "by_stage": {k: {**v, "host_ms": round(v["host_ms"], 2)} for k, v in per_stage.items()},
    }


def pacing(trace: dict, gap_ms: float = 1.0, call_ms: float = 20.0, top: int = 8) -> dict:
    """What set each chunk's period: the GPU time from one DiT's start to the next (its ranges on the stream that
    ran the most DiT time: the chunk loop's), that stream's idle gaps of at least `gap_ms` with the stage of the
    work on each side, and the host runtime calls of at least `call_ms`.

    Session 19 found a 2-GPU chunk 19 ms slower than its neighbour this way: the host sat 286 ms inside the DiT's
    cudaGraphLaunch, then launched the next round's audio before the decode, and the loop waited for the decode.
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    # The stage ranges on the GPU, once: ((pid, stream), start, end, stage).
    stages = [
        ((e.get("pid"), e.get("tid")), e["ts"], e["ts"] + e["dur"], e["name"][len(STAGE_PREFIX) :])
        for e in events
        if e.get("cat") == "gpu_user_annotation" and str(e.get("name", "")).startswith(STAGE_PREFIX)
    ]
    dit = defaultdict(list)
    for key, start, end, name in stages:
        if name == "dit":
            dit[key].append((start, end - start))
    main = max(dit, key=lambda k: sum(d for _, d in dit[k])) if dit else None  # (pid, stream) of the chunk loop
    starts = sorted(dit[main]) if dit else []
    periods = [round((b[0] - a[0]) / 1000, 2) for a, b in zip(starts, starts[1:], strict=False)]

    gpu_ranges = sorted((start, end, name) for _, start, end, name in stages if end > start)

    def stage_at(ts: float) -> str:
        holding = [name for a, b, name in gpu_ranges if a <= ts <= b]
        return holding[-1] if holding else OUTSIDE

    # A gap inside one of the loop stream's own stage ranges is that stage's work on its other streams (captured
    # side streams of the sequence-parallel DiT), not the loop waiting.
    loop_ranges = [(start, end) for key, start, end, _ in stages if key == main]

    def inside_a_stage(start: float, end: float) -> bool:
        return any(a <= start and end <= b for a, b in loop_ranges)

    # Gaps on the chunk loop's stream: the GPU may be busy elsewhere (a side stream's audio) while the loop waits.
    work: dict[object, list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        if e.get("cat") in GPU_CATEGORIES and (e.get("pid"), e.get("tid")) == main:
            work[e.get("args", {}).get("device", e.get("pid"))].append((e["ts"], e["ts"] + e["dur"]))
    gaps = {}
    for device, intervals in work.items():
        found, reach = [], None
        for start, end in sorted(intervals):
            if reach is not None and start - reach >= gap_ms * 1000 and not inside_a_stage(reach, start):
                found.append((round((start - reach) / 1000, 2), stage_at(reach - 1), stage_at(start + 1)))
            reach = end if reach is None else max(reach, end)
        found.sort(reverse=True)
        gaps[str(device)] = {"count": len(found), "total_ms": round(sum(g[0] for g in found), 2),
                             "largest": [list(g) for g in found[:top]]}  # fmt: skip

    calls = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver") and e["dur"] >= call_ms * 1000]
    calls.sort(key=lambda e: -e["dur"])
    return {
        "dit_to_dit_ms": periods,
        "loop_stream_gaps": gaps,
        "long_host_calls": [[e["name"], round(e["dur"] / 1000, 2)] for e in calls[:top]],
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: trace_stages.py TRACE.json[.gz]")
    trace = load_trace(sys.argv[1])
    print(json.dumps({**stage_breakdown(trace), "host": host_breakdown(trace), "pacing": pacing(trace)}, indent=1))
