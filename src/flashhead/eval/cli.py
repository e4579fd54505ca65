"""`flashhead eval`: the command-line door to `flashhead.eval.evaluate`.

`eval_command` carries typer `Annotated` parameter docs, so the main CLI wires it in with

    from flashhead.eval.cli import eval_command
    app.command("eval")(friendly_errors(eval_command))

and `flashhead eval --help` lists every option below. It returns the exit code (0 on success);
user errors raise `FlashHeadError` subclasses for `friendly_errors` to print.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

log = logging.getLogger(__name__)


def eval_command(
    pred: Annotated[Path, typer.Option("--pred", help="Folder of generated videos (paired with --gt by file name).")],
    gt: Annotated[Path, typer.Option("--gt", help="Folder of ground-truth videos.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report JSON path; the HTML page goes next to it.")] = Path(
        "report.json"
    ),
    html: Annotated[Path | None, typer.Option("--html", help="HTML report path (default: --out with .html).")] = None,
    protocol: Annotated[
        str | None, typer.Option("--protocol", help="hdtf or vfhq: the report's protocol (videos, frames, sampling).")
    ] = None,
    inception: Annotated[
        str | None, typer.Option("--inception", help="FID Inception weights (.pth) or hf:OWNER/REPO/FILE.")
    ] = None,
    i3d: Annotated[str | None, typer.Option("--i3d", help="StyleGAN-V i3d_torchscript.pt for FVD.")] = None,
    syncnet: Annotated[str | None, typer.Option("--syncnet", help="syncnet_v2.model for Sync-C / Sync-D.")] = None,
    arcface: Annotated[
        str | None, typer.Option("--arcface", help="Optional ArcFace ONNX / TorchScript for a second CSIM.")
    ] = None,
    speed: Annotated[
        Path | None, typer.Option("--speed", help="Benchmark JSON (FPS, ...) to include in the report.")
    ] = None,
    references: Annotated[
        Path | None,
        typer.Option("--references", help="Folder of reference portraits by video name (default: GT frame 0)."),
    ] = None,
    max_frames: Annotated[
        int | None, typer.Option("--max-frames", help="Evaluate at most this many frames per video.")
    ] = None,
    fid_stride: Annotated[int, typer.Option("--fid-stride", help="Use every k-th frame for FID.")] = 1,
    device: Annotated[str, typer.Option("--device", help="torch device for the networks (cpu, cuda).")] = "cpu",
) -> int:
    """Evaluate generated talking-head videos: FID, FVD, Sync-C/D, CSIM, LMD, drift and speed."""
    from flashhead.atomic import make_folder
    from flashhead.errors import ConfigError
    from flashhead.eval.report import write_report
    from flashhead.eval.suite import EvalConfig, evaluate
    from flashhead.pipeline.registry import check_device

    check_device(device)  # a GPU this machine lacks: one line now, not torch's AssertionError inside a metric
    config = EvalConfig(
        inception=inception,
        i3d=i3d,
        syncnet=syncnet,
        arcface=arcface,
        speed=str(speed) if speed else None,
        protocol=protocol,
        references=str(references) if references else None,
        max_frames=max_frames,
        fid_frame_stride=fid_stride,
        device=device,
    )
    for path, option in ((out, "--out"), (html or out.with_suffix(".html"), "--html")):  # before hours of scoring
        if path.is_dir():
            raise ConfigError(f"{option} {path}: a folder; give a file path, e.g. {path / 'report.json'}")
        make_folder(path.parent, f"{option}'s folder")
    report = evaluate(pred, gt, config)
    write_report(report, out, html)
    for key, entry in report["metrics"].items():
        if isinstance(entry, dict) and entry.get("status") == "unavailable":
            log.warning("%s unavailable: %s", key, entry["reason"])
    _print_summary(report, out, html or out.with_suffix(".html"))
    return 0


def _print_summary(report: dict, out: Path, html: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from flashhead.eval.report import HEADLINE, _value

    table = Table(title=f"flashhead eval — {len(report['videos'])} video pair(s)")
    for col in ("metric", "", "value", "note"):
        table.add_column(col)
    for key, label, better, fmt in HEADLINE:
        value, note = _value(report["metrics"].get(key), fmt)
        table.add_row(label, better, value, escape(note[:90]))
    console = Console()
    console.print(table)
    console.print(f"report: {out}  ·  {html}")
