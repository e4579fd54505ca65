"""The funnel report: report.json (for programs) and report.html (plots and tables for people).

Units: the first three stages (probe, dedup, scenes) take input files; scene slicing turns them into
segments, which every later stage takes. Each row says how many units and hours entered the stage and
how many left it; every rejection names the input file, the stage and the reason.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
from pathlib import Path
from typing import Any

from flashhead.atomic import atomic_path
from flashhead.data.curate.config import CurateConfig
from flashhead.data.curate.process import FILE_STAGES, STAGES, Outcome


def funnel(files: list[Path], durations: dict[str, float], outcomes: list[Outcome]) -> list[dict[str, Any]]:
    rows = []
    count, seconds = len(files), sum(durations.values())
    for stage in FILE_STAGES:
        gone = [o for o in outcomes if o.stage == stage and o.segment is None and o.reason]
        files_gone = {o.input for o in gone if stage != "scenes"}
        lost = sum(durations.get(name, 0.0) for name in files_gone) if stage != "scenes" else 0.0
        if stage == "scenes":  # files in, segments out
            segments = [o for o in outcomes if o.segment is not None]
            rows.append(_row(stage, count, seconds, len(segments), sum(o.seconds for o in segments), len(gone)))
            count, seconds = len(segments), sum(o.seconds for o in segments)
        else:
            rows.append(_row(stage, count, seconds, count - len(files_gone), seconds - lost, len(gone)))
            count, seconds = count - len(files_gone), seconds - lost
    segments = [o for o in outcomes if o.segment is not None]
    for i, stage in enumerate(STAGES[len(FILE_STAGES) :], start=len(FILE_STAGES)):
        entering = [o for o in segments if STAGES.index(o.stage) >= i]
        leaving = [o for o in entering if STAGES.index(o.stage) > i or o.reason is None]
        rows.append(_row(stage, len(entering), sum(o.seconds for o in entering), len(leaving),
                         sum(o.seconds for o in leaving), len(entering) - len(leaving)))  # fmt: skip
    return rows


def _row(stage: str, n_in: int, s_in: float, n_out: int, s_out: float, rejected: int) -> dict[str, Any]:
    return {
        "stage": stage,
        "unit": "file" if stage in ("probe", "dedup") else "segment",
        "in": n_in,
        "out": n_out,
        "hours_in": round(s_in / 3600, 6),
        "hours_out": round(s_out / 3600, 6),
        "rejected": rejected,
    }


def write_report(
    out: Path,
    cfg: CurateConfig,
    files: list[Path],
    durations: dict[str, float],
    outcomes: list[Outcome],
    timings: dict[str, float],
    skipped: dict[str, str],
    wall: float,
    workers: int,
) -> dict[str, Any]:
    rows = funnel(files, durations, outcomes)
    processed = sum(durations.values())
    cpu = sum(timings.values())
    report = {
        "inputs": len(files),
        "input_hours": round(processed / 3600, 6),
        "kept_clips": sum(o.reason is None for o in outcomes),
        "kept_hours": round(sum(o.seconds for o in outcomes if o.reason is None) / 3600, 6),
        "funnel": rows,
        "skipped_stages": [{"stage": s, "reason": r} for s, r in skipped.items()],
        "rejected": [
            {k: v for k, v in dataclasses.asdict(o).items() if k not in ("key", "info")} for o in outcomes if o.reason
        ],
        "kept": [dataclasses.asdict(o) for o in outcomes if o.reason is None],
        "time": {
            "cpu_seconds_per_stage": {s: round(timings.get(s, 0.0), 3) for s in STAGES if s in timings},
            "cpu_seconds": round(cpu, 3),
            # clip-seconds of input video curated per second of one core (the whole run, resumed parts too)
            "clip_seconds_per_core_second": round(processed / cpu, 3) if cpu else None,
            "wall_seconds_this_run": round(wall, 3),
            "workers": workers,
        },
        "config": cfg.to_dict(),
    }
    _atomic_write(out / "report.json", json.dumps(report, indent=1).encode())
    _atomic_write(out / "report.html", _html(report).encode())
    return report


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _plots(report: dict[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["funnel"]
    stages = [r["stage"] for r in rows]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    y = range(len(rows))[::-1]
    ax1.barh(y, [r["hours_in"] for r in rows], color="#cfd8e3", label="in")
    ax1.barh(y, [r["hours_out"] for r in rows], color="#2a6f97", label="out")
    ax1.set(yticks=list(y), yticklabels=stages, xlabel="hours", title="Hours into and out of each stage")
    ax1.legend()
    ax2.barh(y, [r["rejected"] for r in rows], color="#c44536")
    ax2.set(yticks=list(y), yticklabels=stages, xlabel="rejected (files or segments)", title="Rejections by stage")
    times = report["time"]["cpu_seconds_per_stage"]
    ax3.barh(range(len(times))[::-1], list(times.values()), color="#6a994e")
    ax3.set(yticks=list(range(len(times))[::-1]), yticklabels=list(times), xlabel="CPU seconds",
            title="Where the time goes")  # fmt: skip
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def _html(report: dict[str, Any]) -> str:
    t = report["time"]
    skipped = _table(report["skipped_stages"], ["stage", "reason"]) if report["skipped_stages"] else "<p>none</p>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>flashhead curation report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}}th{{background:#eef}}</style></head><body>
<h1>Curation report</h1>
<p>{report['inputs']} input files ({report['input_hours'] * 60:.2f} min) &rarr; {report['kept_clips']} clips
({report['kept_hours'] * 60:.2f} min). {t['cpu_seconds']:.1f} CPU s in all:
{_fmt(t['clip_seconds_per_core_second'])} clip-seconds per core-second; this run {t['wall_seconds_this_run']:.1f} s
wall with {t['workers']} worker(s).</p>
<img alt="funnel" src="data:image/png;base64,{_plots(report)}">
<h2>Funnel</h2>{_table(report['funnel'], ['stage', 'unit', 'in', 'out', 'hours_in', 'hours_out', 'rejected'])}
<h2>Skipped stages</h2>{skipped}
<h2>Rejected</h2>{_table(report['rejected'], ['input', 'segment', 'start', 'end', 'stage', 'reason'])}
<h2>Kept clips</h2>{_table(report['kept'], ['key', 'input', 'start', 'end', 'info'])}
</body></html>
"""
