"""Per-stage breakdown of benchmark results, as stacked bars (one panel per model), for the docs.

Each bar is `LABEL=PATH[#KEY/KEY...]`: a `flashhead bench` JSON, or a part of a results file reached by its keys
(docs/results/sessionNN.json keep every run's JSON under "runs"); in a speed-matrix JSON a key names a row.

    python benchmarks/plot_bench.py --out docs/img/speed-stages-session30.png \\
        "plain eager, H100=docs/results/speed_matrix_h100_2026-11-26f_pro.json#plain" \\
        "--optimized, H200=docs/results/session30.json#runs/94_ab_pro_cutlass_rope/pro_base"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_matrix import plot  # noqa: E402  (the speed matrix's own drawing: same stages, same colours)


def resolve(spec: str) -> tuple[str, dict, str | None]:
    """`LABEL=PATH[#KEY/KEY...]` -> the label, the JSON object it names, and the GPU a speed matrix names for it.
    The last "=" ends the label (a label may name a switch setting; a path and its keys hold none)."""
    label, sep, target = spec.rpartition("=")
    if not sep or not label or not target:
        raise SystemExit(f"error: {spec!r} is not LABEL=PATH[#KEY/KEY...]")
    path, _, keys = target.partition("#")
    try:
        node = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: cannot read {path}: {e}") from None
    gpu = None
    for key in filter(None, keys.split("/")):
        if isinstance(node, dict) and isinstance(node.get("rows"), list):  # a speed matrix: rows by name
            gpu = next((r.get("gpu") for r in node["rows"] if r.get("row") == "environment"), gpu)
            node = next((r for r in node["rows"] if r.get("row") == key), None)
        else:
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            raise SystemExit(f"error: {path} has no {key!r} on the way to {keys!r}")
    if not isinstance(node, dict):
        raise SystemExit(f"error: {target} is not a JSON object")
    return label, node, gpu


def load_bar(spec: str) -> dict:
    """One bar's row for `speed_matrix.plot`: label, model, FPS, per-stage ms and the chunk period."""
    label, node, gpu = resolve(spec)
    target = spec.rpartition("=")[2]
    missing = [k for k in ("model", "steady_fps", "stage_ms_per_chunk") if not node.get(k)]
    if missing:
        raise SystemExit(f"error: {target} is not a benchmark result (no {', '.join(missing)})")
    stages = {k: v for k, v in node["stage_ms_per_chunk"].items() if v is not None}
    frames = node.get("new_frames_per_chunk")
    chunk_ms = node.get("chunk_ms") or (1000.0 * frames / node["steady_fps"] if frames else sum(stages.values()))
    gpu = gpu or node.get("gpu") or node.get("environment", {}).get("gpu", "")
    return {"row": label, "model": node["model"], "steady_fps": node["steady_fps"], "chunk_ms": chunk_ms,
            "stage_ms_per_chunk": stages, "gpu": gpu}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bars", nargs="+", metavar="LABEL=PATH[#KEY/KEY...]")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default="flashhead, one stream, 512x512: where a chunk's time goes")
    args = parser.parse_args()
    rows = [load_bar(spec) for spec in args.bars]
    if not plot(rows, args.out, title=args.title):
        raise SystemExit("error: nothing drawn (matplotlib missing?)")
    print(json.dumps({"png": str(args.out), "bars": [{k: r[k] for k in ("row", "model", "steady_fps")} for r in rows]}))


if __name__ == "__main__":
    main()
