"""Per-chunk milliseconds of each Wan2.1 decode convolution under two `benchmarks/conv_algos.py` runs (e.g. cuDNN
trying its first 10 algorithms against all of them), as horizontal bars, largest first.

    python3 benchmarks/plot_conv_algos.py conv10.json conv0.json --out wan-decode-convs.png [--top 12]

A convolution's share is its calls per chunk times its median time alone. The PNG is written through a temporary
file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flashhead.atomic import atomic_path  # noqa: E402


def shares(report: dict) -> dict[tuple, float]:
    """(input shape, weight shape, calls) -> milliseconds per chunk (rows that differ only in strides, summed)."""
    out: dict[tuple, float] = {}
    for r in report["convolutions"]:
        key = (tuple(r["input"]), tuple(r["weight"]), r["count"])
        out[key] = out.get(key, 0.0) + r["count"] * r["ms"]
    return out


def label(key: tuple) -> str:
    x, w, calls = key
    kind = "x".join(map(str, w[2:]))
    return f"{w[1]}->{w[0]} ch, {kind}, {'x'.join(map(str, x[2:]))} in, {calls} calls"


def legend_label(name: str, table: dict[tuple, float], report: dict) -> str:
    """The run's name, its milliseconds per chunk in all and, for a --search-only run, what its search cost."""
    search = report.get("search_s")
    return f"{name}: {sum(table.values()):.0f} ms in all" + (f", search {search:.1f} s" if search is not None else "")


def plot(reports: list[dict], names: list[str], out: Path, top: int) -> None:
    tables = [shares(r) for r in reports]
    keys = sorted(tables[0], key=lambda k: -tables[0][k])[:top]
    y = np.arange(len(keys))
    height = 0.8 / len(tables)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(keys) + 1.5))
    for i, (table, name) in enumerate(zip(tables, names, strict=True)):
        legend = legend_label(name, table, reports[i])
        ax.barh(y + i * height, [table.get(k, 0.0) for k in keys], height, label=legend)
    ax.set_yticks(y + height * (len(tables) - 1) / 2, [label(k) for k in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per Pro chunk (calls x median time alone)")
    ax.set_title(f"Wan2.1 decode convolutions, {reports[0].get('gpu') or 'CPU'}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as part:
        fig.savefig(part, dpi=110, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", type=Path, nargs="+")
    parser.add_argument("--names", default=None, help="comma-separated legend names (default: cuDNN limit of each)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    reports = [json.loads(p.read_text()) for p in args.reports]
    names = args.names.split(",") if args.names else [f"cuDNN benchmark_limit {r['benchmark_limit']}" for r in reports]
    plot(reports, names, args.out, args.top)
    print(args.out)


if __name__ == "__main__":
    main()
