"""Per DiT layer, from a torch.profiler Chrome trace: the layer period, GPU time by kind of kernel, and the time in
which no compute kernel runs (exposed transfers and launch gaps).

    python benchmarks/trace_layers.py trace.json.gz                     # JSON summary (medians over the layers)
    python benchmarks/trace_layers.py trace.json.gz --listing           # also every kernel of the median layer
    python benchmarks/trace_layers.py trace.json.gz --table             # those as text: stream, start, duration, gap

A layer starts at each launch of a marker kernel that runs once per block and step (default: the FFN's first
GEMM with its fused GELU epilogue, "gelubias"); layers are the spans between consecutive markers that are no
longer than twice the median (the others hold a chunk boundary). Kinds: attention, GEMM, NCCL, Triton (Inductor's
fused kernels), memset / memcpy, other; every stream counts (work beside the DiT, such as the next chunk's audio
on a side stream, is in its layer's sums). "no_compute_us" is the part of the period covered by no kernel but
NCCL's: on a sequence-parallel rank that is where it waits for the other ranks.
"""

from __future__ import annotations

import argparse
import json
import statistics

from trace_stages import GPU_CATEGORIES, load_trace  # benchmarks/, the script's folder


def kind(name: str) -> str:
    low = name.lower()
    if "nccl" in low:
        return "nccl"
    if any(key in low for key in ("sdpa", "flash", "fmha", "attention_kernel")):
        return "attention"
    if any(key in low for key in ("nvjet", "gemm", "splitkreduce", "cutlass")):
        return "gemm"
    if low.startswith("triton"):
        return "triton"
    if low.startswith(("memset", "memcpy")):
        return "memset_memcpy"
    return "other"


def _covered(intervals: list[tuple[float, float]], start: float, stop: float) -> float:
    """Length of the part of [start, stop) that the union of the intervals covers."""
    total, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, stop)
        if b > a:
            total += b - a
            reach = b
    return total


def layer_report(trace: dict, marker: str = "gelubias", listing: bool = False) -> dict:
    events = sorted(
        (e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES),
        key=lambda e: e["ts"],
    )
    starts = [e["ts"] for e in events if marker in e["name"]]
    if len(starts) < 3:
        raise ValueError(f"fewer than 3 kernels named like {marker!r}: no layers to measure")
    spans = list(zip(starts, starts[1:], strict=False))
    typical = statistics.median(b - a for a, b in spans)
    spans = [(a, b) for a, b in spans if b - a <= 2 * typical]
    rows = []
    for a, b in spans:
        inside = [e for e in events if a <= e["ts"] < b]
        by_kind: dict[str, float] = {}
        for e in inside:
            by_kind[kind(e["name"])] = by_kind.get(kind(e["name"]), 0.0) + e["dur"]
        compute = [(e["ts"], e["ts"] + e["dur"]) for e in inside if kind(e["name"]) != "nccl"]
        rows.append({"period": b - a, "no_compute": (b - a) - _covered(compute, a, b), **by_kind})
    kinds = sorted({k for row in rows for k in row} - {"period", "no_compute"})
    report = {
        "layers": len(rows),
        "period_us": {
            "median": round(statistics.median(r["period"] for r in rows), 1),
            "p10": round(statistics.quantiles([r["period"] for r in rows], n=10)[0], 1) if len(rows) > 1 else None,
            "p90": round(statistics.quantiles([r["period"] for r in rows], n=10)[-1], 1) if len(rows) > 1 else None,
        },
        "no_compute_us": round(statistics.median(r["no_compute"] for r in rows), 1),
        "kernel_us_by_kind": {k: round(statistics.median(r.get(k, 0.0) for r in rows), 1) for k in kinds},
    }
    if listing:
        order = sorted(range(len(rows)), key=lambda i: rows[i]["period"])
        a, b = spans[order[len(order) // 2]]
        report["median_layer"] = [
            [e.get("tid"), round(e["ts"] - a, 1), round(e["dur"], 1), e["name"][:80]]
            for e in events
            if a <= e["ts"] < b
        ]
    return report


def listing_table(listing: list) -> list[str]:
    """`median_layer` rows as text: stream, start and duration (us), the time before the kernel in which no compute
    kernel ran (blank for NCCL's), name."""
    lines, reach = [], 0.0
    for tid, start, dur, name in listing:
        compute = kind(name) != "nccl"
        gap = f"{max(start - reach, 0.0):6.1f}" if compute else ""
        lines.append(f"{tid!s:>6} {start:8.1f} {dur:7.1f} {gap:>6}  {name}")
        if compute:
            reach = max(reach, start + dur)
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--marker", default="gelubias", help="a kernel-name part that occurs once per layer")
    parser.add_argument("--listing", action="store_true", help="every kernel of the median layer")
    parser.add_argument("--table", action="store_true", help="the median layer's kernels as a text table")
    args = parser.parse_args()
    report = layer_report(load_trace(args.trace), args.marker, args.listing or args.table)
    if args.table:
        print(json.dumps({k: v for k, v in report.items() if k != "median_layer"}))
        print("\n".join(listing_table(report["median_layer"])))
    else:
        print(json.dumps(report, indent=1))
