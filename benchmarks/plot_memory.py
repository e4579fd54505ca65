"""GPU memory of benchmark results, as grouped bars: each stage's peak in the steady stream, the whole run's peak
(warm-up included), what the process reserved at the end and what it held after giving the allocator's cache back.

Bars are given as in plot_bench.py (`LABEL=PATH[#KEY/KEY...]`, a `flashhead bench` JSON or a part of a results
file); a figure the JSON lacks (older runs) is left out.

    python benchmarks/plot_memory.py --out docs/img/memory-session32.png \\
        "--optimized=docs/results/session32.json#runs/105_ab_pro_whole_chunk_memory/pro_base" \\
        "per-frame loop=docs/results/session32.json#runs/105_ab_pro_whole_chunk_memory/pro_vae_whole_chunk_off"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot_bench import resolve  # noqa: E402

STAGES = ("audio_features", "dit", "vae_decode", "vae_encode_motion", "color_correction")
TOTALS = {"peak_gpu_memory_gib": "whole run's peak", "gpu_memory_reserved_gib": "reserved at the end",
          "gpu_memory_held_gib": "held after empty_cache"}  # fmt: skip


def load_memory(spec: str) -> dict:
    """One group: its label, GPU and GiB by figure (stage peaks first, then the totals), from a bench JSON."""
    label, node, gpu = resolve(spec)
    stages = node.get("stage_peak_gpu_memory_gib") or {}
    figures = {f"{k} peak": stages[k] for k in STAGES if stages.get(k) is not None}
    figures.update({name: node[k] for k, name in TOTALS.items() if node.get(k) is not None})
    if not figures:
        raise SystemExit(f"error: {spec} has no GPU memory figures (a CPU run, or a bench from before session 31)")
    return {"label": label, "gpu": gpu or node.get("environment", {}).get("gpu", ""), "gib": figures}


def plot_memory(groups: list[dict], out: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(dict.fromkeys(n for g in groups for n in g["gib"]))  # every figure once, in first-seen order
    height = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) * len(groups) + 1.5))
    for i, group in enumerate(groups):
        ys = [j + i * height for j, n in enumerate(names) if n in group["gib"]]
        values = [group["gib"][n] for n in names if n in group["gib"]]
        bars = ax.barh(ys, values, height=height, label=f"{group['label']} ({group['gpu']})" if group["gpu"] else
                       group["label"])  # fmt: skip
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=2, fontsize=8)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(names))], names)
    ax.invert_yaxis()
    ax.set_xlabel("GiB")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("groups", nargs="+", metavar="LABEL=PATH[#KEY/KEY...]")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default="flashhead, one stream, 512x512: GPU memory")
    args = parser.parse_args(argv)
    groups = [load_memory(spec) for spec in args.groups]
    if not plot_memory(groups, args.out, args.title):
        raise SystemExit("error: nothing drawn (matplotlib missing?)")
    print(json.dumps({"png": str(args.out), "groups": groups}))


if __name__ == "__main__":
    main()
