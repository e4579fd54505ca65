"""Loss and step-time curves of `benchmarks/fsdp_train.py` runs, one row of panels per JSON file.

    python3 benchmarks/plot_fsdp.py stage1.json [stage2.json ...] --out fsdp.png

Stage 1: the training loss per step with its 20-step running mean, and the step time. Stage 2: the fake score's
loss (every iteration) and the student's regression loss (generator steps) with running means, and the iteration
time split into generator and fake-score-only iterations. The PNG is written through a temporary file.
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


def running_mean(values: list[float], window: int = 20) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return v
    kernel = np.ones(min(window, len(v))) / min(window, len(v))
    return np.convolve(v, kernel, mode="valid")


def curve(ax, steps: list[int], values: list[float], label: str, colour: str) -> None:
    window = max(3, min(20, len(values) // 5))  # the regression loss has a point every critic_ratio iterations
    ax.plot(steps, values, ".", ms=2.5, alpha=0.35, color=colour)
    mean = running_mean(values, window)
    if len(mean):
        ax.plot(steps[len(steps) - len(mean) :], mean, "-", color=colour, label=f"{label} ({window}-step mean)")


def title(data: dict) -> str:
    gpus = f"{data.get('world_size', 1)} x {data.get('device', '?')}"
    return f"Stage {data['stage']}{' (tiny)' if data.get('tiny') else ''}, FSDP2 on {gpus}"


def plot_stage1(data: dict, loss_ax, time_ax) -> None:
    losses = data.get("losses") or []
    steps = list(range(1, len(losses) + 1))
    curve(loss_ax, steps, losses, "loss", "C0")
    loss_ax.set_ylabel("flow-matching loss")
    times = data.get("step_times_s") or []
    time_ax.plot(range(1, len(times) + 1), times, "-", color="C2", lw=0.8)
    time_ax.set_ylabel("step time (s)")


def plot_stage2(data: dict, loss_ax, time_ax) -> None:
    rows = data.get("iterations") or []
    for key, label, colour in (("critic", "fake score", "C0"), ("regression", "student regression", "C1")):
        picked = [r for r in rows if key in r]
        curve(loss_ax, [r["step"] + 1 for r in picked], [r[key] for r in picked], label, colour)
    loss_ax.set_ylabel("loss")
    for generator, colour, label in ((True, "C3", "generator + fake score"), (False, "C2", "fake score only")):
        picked = [r for r in rows if r["generator_step"] == generator]
        time_ax.plot([r["step"] + 1 for r in picked], [r["step_time_s"] for r in picked], ".", ms=3, color=colour,
                     label=label)  # fmt: skip
    time_ax.set_ylabel("iteration time (s)")
    time_ax.legend(fontsize=7)


def read_run(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
        if data["stage"] not in (1, 2):
            raise ValueError(f"stage {data['stage']}")
    except (OSError, ValueError, KeyError, TypeError) as e:  # one line, not a traceback
        why = f"{type(e).__name__}: {e}"
        raise SystemExit(f"plot_fsdp.py: {path} is not a readable fsdp_train.py result ({why})") from None
    return data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="fsdp_train.py JSON files")
    ap.add_argument("--out", required=True, help="PNG to write")
    args = ap.parse_args(argv)
    runs = [read_run(p) for p in args.runs]
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.4 * len(runs)), squeeze=False)
    for data, (loss_ax, time_ax) in zip(runs, axes, strict=True):
        (plot_stage1 if data["stage"] == 1 else plot_stage2)(data, loss_ax, time_ax)
        loss_ax.set_title(title(data), fontsize=9)
        loss_ax.legend(fontsize=7)
        for ax in (loss_ax, time_ax):
            ax.set_xlabel("step" if data["stage"] == 1 else "iteration")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(args.out)
    with atomic_path(out) as part:
        fig.savefig(part, format=out.suffix[1:] or "png", dpi=110)
    print(out)


if __name__ == "__main__":
    main()
