"""Writing an evaluation report: JSON for machines, one self-contained HTML page for people.

The HTML embeds everything (matplotlib PNGs and JPEG thumbnails as base64 data URIs), so the single
file can be mailed, attached to an issue or committed.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from flashhead.atomic import atomic_path

# (key in report["metrics"], label, better direction, how to print it)
HEADLINE = [
    ("fid", "FID", "↓", "{:.2f}"),
    ("fvd", "FVD", "↓", "{:.2f}"),
    ("sync_c", "Sync-C (SyncNet confidence)", "↑", "{:.2f}"),
    ("sync_d", "Sync-D (SyncNet distance)", "↓", "{:.2f}"),
    ("csim", "CSIM (dlib, to the reference)", "↑", "{:.3f}"),
    ("csim_arcface", "CSIM (ArcFace)", "↑", "{:.3f}"),
    ("lmd_mouth", "LMD mouth (px)", "↓", "{:.2f}"),
    ("lmd_face", "LMD face (px)", "↓", "{:.2f}"),
    ("av_offset_energy_vs_gt", "AV offset vs ground truth, weight-free (frames)", "0", "{:+.1f}"),
    ("drift_colour_slope_per_min", "Colour drift (ΔE / min)", "↓", "{:+.2f}"),
    ("drift_identity_slope_per_min", "Identity drift (CSIM / min)", "0", "{:+.3f}"),
    ("speed", "Speed (FPS)", "↑", "{:.1f}"),
]
REFERENCE_ROWS = {"sync_c": "sync_c_gt", "sync_d": "sync_d_gt", "csim": "csim_gt"}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(report: dict, path: str | Path) -> None:
    with atomic_path(path) as tmp:  # a reader never sees half a report
        tmp.write_text(json.dumps(_jsonable(report), indent=2, ensure_ascii=False) + "\n")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=84, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _jpeg(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _sync_plot(videos: list[dict]) -> str | None:
    fig, ax = _plt().subplots(figsize=(7.5, 2.8))
    drawn = False
    for v in videos:
        for key, label in (("sync", "SyncNet"), ("av_offset_energy", "energy")):
            entry = v.get(key, {})
            if entry.get("status") == "ok":
                d = np.array(entry["mean_dists"])
                shifts = np.arange(len(d)) - len(d) // 2
                ax.plot(-shifts, d, marker=".", label=f"{v['name']} ({label})")
                drawn = True
                break
    if not drawn:
        return None
    ax.set_xlabel("AV offset (frames; + = video lags audio)")
    ax.set_ylabel("mean distance")
    ax.set_title("Offset search: mean distance per candidate offset (minimum = estimated offset)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig)


def _drift_plot(videos: list[dict]) -> str | None:
    rows = [v for v in videos if v.get("drift", {}).get("status") == "ok"]
    if not rows:
        return None
    fig, (a1, a2) = _plt().subplots(2, 1, figsize=(7.5, 4.6), sharex=True)
    for v in rows:
        d = v["drift"]
        t = np.array(d["window_centres_s"])
        a1.plot(t, d["colour_delta_e"], marker="o", label=f"{v['name']} ({d['colour_slope_per_min']:+.2f}/min)")
        if d.get("identity_csim") is not None:
            a2.plot(t, d["identity_csim"], marker="o", label=f"{v['name']} ({d['identity_slope_per_min']:+.3f}/min)")
    a1.set_ylabel("colour ΔE to ref")
    a2.set_ylabel("CSIM to ref")
    a2.set_xlabel(f"time (s), {rows[0]['drift']['window_s']:g} s windows")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        if a.lines:
            a.legend(fontsize=7)
    a1.set_title("Drift per window (slope per minute in the legend)")
    return _png(fig)


def _per_frame_plot(videos: list[dict]) -> str | None:
    have_csim = [v for v in videos if v.get("csim", {}).get("status") == "ok"]
    have_lmd = [v for v in videos if v.get("lmd", {}).get("status") == "ok"]
    if not have_csim and not have_lmd:
        return None
    fig, (a1, a2) = _plt().subplots(1, 2, figsize=(7.5, 2.6))
    for v in have_csim:
        a1.plot(v["csim"]["per_frame"], marker=".", label=v["name"])
    for v in have_lmd:
        a2.plot(v["lmd"]["per_frame_mouth"], label=v["name"])
    a1.set_title("CSIM per scored frame")
    a2.set_title("mouth LMD per frame (px)")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        if a.lines:
            a.legend(fontsize=6)
    return _png(fig)


def _value(entry: dict | None, fmt: str) -> tuple[str, str]:
    if not entry:
        return "–", "not computed"
    if entry.get("status") != "ok":
        return "unavailable", entry.get("reason", "")
    if "value" not in entry:
        return "ok", ""
    note = f"{entry['videos']} videos" if "videos" in entry else ""
    if "n_pred" in entry:
        note = f"{entry['n_pred']} pred / {entry['n_gt']} real samples"
    return fmt.format(entry["value"]), note


def render_html(report: dict) -> str:
    """The report as one self-contained HTML page."""
    m, videos = report["metrics"], report["videos"]
    e = html.escape
    rows = []
    for key, label, better, fmt in HEADLINE:
        value, note = _value(m.get(key), fmt)
        ref = m.get(REFERENCE_ROWS.get(key, ""), None)
        ref_text = _value(ref, fmt)[0] if ref else ""
        cls = "na" if value == "unavailable" else ""
        rows.append(
            f"<tr class='{cls}'><td>{e(label)}</td><td class='dir'>{better}</td><td class='num'>{e(value)}</td>"
            f"<td class='num'>{e(ref_text)}</td><td class='note'>{e(note)}</td></tr>"
        )
    per_video = []
    for v in videos:

        def cell(key: str, field: str, fmt: str, v=v) -> str:
            x = v.get(key, {})
            return fmt.format(x[field]) if x.get("status") == "ok" and x.get(field) is not None else "–"

        per_video.append(
            "<tr>"
            + "".join(
                f"<td>{e(str(c))}</td>"
                for c in (
                    v["name"],
                    v["frames_pred"],
                    cell("sync", "sync_c", "{:.2f}"),
                    cell("sync", "sync_d", "{:.2f}"),
                    cell("av_offset_energy_vs_gt", "value", "{:+d}"),
                    cell("csim", "value", "{:.3f}"),
                    cell("lmd", "lmd_mouth", "{:.2f}"),
                    cell("drift", "colour_slope_per_min", "{:+.2f}"),
                    cell("drift", "identity_slope_per_min", "{:+.3f}"),
                )
            )
            + "</tr>"
        )
    flagged = []
    for v in videos:
        d = v.get("drift", {})
        kinds = [k for k in ("colour", "identity") if d.get(f"{k}_drift")]
        if kinds:
            flagged.append(f"{v['name']} ({', '.join(kinds)})")
    flagged_html = (
        f"<p class='flag'>⚠ drift flagged: {e(', '.join(flagged))}</p>" if flagged else "<p>No drift flagged.</p>"
    )
    plots = [p for p in (_sync_plot(videos), _drift_plot(videos), _per_frame_plot(videos)) if p]
    frames_html = []
    for v in videos:
        thumbs = v.get("_thumbs")
        if not thumbs:
            continue
        pred, gt = thumbs
        cells = "".join(
            f"<figure><img src='{_jpeg(p)}'><img src='{_jpeg(g)}'><figcaption>frame {i + 1}/3</figcaption></figure>"
            for i, (p, g) in enumerate(zip(pred, gt, strict=True))
        )
        frames_html.append(f"<h3>{e(v['name'])}</h3><div class='frames'>{cells}</div>")
    protocol = report.get("protocol")
    speed = m.get("speed", {})
    speed_html = (
        f"<pre>{e(json.dumps(speed['benchmark'], indent=2))}</pre>"
        if speed.get("status") == "ok"
        else "<p>none given</p>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flashhead evaluation</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; font-size: 14px; }}
th {{ background: #f3f3f3; }} .num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.dir {{ color: #777; }} .note {{ color: #666; font-size: 12px; max-width: 520px; }}
tr.na td {{ color: #999; }} img.plot {{ max-width: 100%; display: block; margin: 0.5em 0; }}
.flag {{ color: #b45309; font-weight: 600; }}
.frames {{ display: flex; gap: 12px; flex-wrap: wrap; }} figure {{ margin: 0; }}
figure img {{ width: 160px; display: inline-block; margin-right: 2px; }}
figcaption {{ font-size: 11px; color: #666; }} code, pre {{ background: #f6f6f6; padding: 2px 4px; }}
</style></head><body>
<h1>flashhead evaluation report</h1>
<p>{e(report["created"])} · flashhead {e(report["flashhead_version"])} · {len(videos)} video pair(s) ·
{e(str(report["seconds"]))} s<br>predictions <code>{e(report["pred_dir"])}</code> · ground truth
<code>{e(report["gt_dir"])}</code>{" · protocol <b>" + e(protocol["name"]) + "</b>" if protocol else ""}</p>
<h2>Metrics</h2>
<table><tr><th>metric</th><th></th><th>prediction</th><th>ground truth</th><th>note</th></tr>{"".join(rows)}</table>
{flagged_html}
<h2>Per video</h2>
<table><tr><th>video</th><th>frames</th><th>Sync-C</th><th>Sync-D</th><th>AV offset vs GT (energy)</th><th>CSIM</th>
<th>LMD mouth</th><th>colour drift /min</th><th>identity drift /min</th></tr>{"".join(per_video)}</table>
<h2>Plots</h2>
{"".join(f"<img class='plot' src='{p}'>" for p in plots)}
<h2>Frames: prediction (left) and ground truth (right)</h2>
{"".join(frames_html)}
<h2>Speed benchmark</h2>{speed_html}
<h2>Protocol</h2>
<p>{e(protocol["description"]) if protocol else "none (all paired videos, all frames)"}</p>
<p class="note">Metric definitions, weights and what was verified: docs/evaluation.md. "Unavailable" metrics need
weights that cannot be shipped; the reason says where to put them.</p>
</body></html>
"""


def write_report(report: dict, json_path: str | Path, html_path: str | Path | None = None) -> None:
    """Save the report as JSON and (by default next to it, `.html`) as a self-contained HTML page."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, json_path)
    html_path = Path(html_path) if html_path else json_path.with_suffix(".html")
    page = render_html(report)
    with atomic_path(html_path) as tmp:
        tmp.write_text(page)
