"""The distillation experiment of issue 7: a Stage-1 teacher distilled into a 4-step student, against the same
teacher sampled with 4 steps and no distillation, over long autoregressive rollouts of synthetic speech.

    python benchmarks/distill_experiment.py --teacher runs/distill/data/teacher \\
        --data data/synth-train --out runs/distill-exp --seconds 60 --set distill.total_steps=2000

1. Train: `flashhead train stage2` (configs/stage2_tiny_cpu.yaml unless --config) with the teacher folder,
   the shards in --data and the teacher's frame size; skipped when OUT/run/export exists (--retrain forces).
2. Evaluation clips: --eval-clips procedural synthetic clips of --seconds each (identities and sentences the
   training shards never saw: their own dataset seed), with the drawn mouth opening as lip-sync truth;
   or an existing shard folder (--eval-data).
3. Roll out the models through the real streaming pipeline from the clip's first frame and its audio:
   student (distilled sampler, 4 steps) and teacher (Euler, 4 steps, its audio CFG), same seed, same --dtype;
   and a control (not part of the verdict; --no-control skips it): the teacher's weights with the student's
   sampler and no training, which separates what the training did from what the sampler change does.
4. Per clip, per second: error to the ground-truth frames (MSE of pixels in [0, 1]); mouth opening read from
   the pixels (darkness of the mouth box) and its Pearson correlation with the truth over the whole clip;
   identity similarity of each frame to the reference (cosine of mean-removed 32x32 thumbnails: the face
   layout and colours, which identity drift changes) and its least-squares slope per minute.
5. OUT/results.json (all curves and the verdict: student error lower, mouth correlation at least as high,
   identity slope flatter), OUT/results.png (error and identity against time, mouth r bars, a mouth trace),
   OUT/results.md (the table for docs/distillation.md, also printed) and OUT/student-dit-fp16 (the student's
   DiT in float16, as the embedded model ships: the drop-in candidate for src/flashhead/assets/flashhead-tiny).

The mouth read-out is validated on the ground truth itself: `truth_mouth_corr` (pixels of the real frames vs
the drawn opening) is the ceiling a perfect generator would reach.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from flashhead.data.shards import iter_clips  # noqa: E402

log = logging.getLogger("distill_experiment")


# ---------------------------------------------------------------------------------------------------
# Metrics


CONTROL = "teacher_distilled_sampler"
LABELS = {
    "student": "distilled student (4 steps, no CFG)",
    "teacher_4step": "teacher, 4 Euler steps + audio CFG",
    CONTROL: "control: teacher weights, student's sampler (no training)",
}


def mouth_signal(frames: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(T,) darkness of the mouth box per frame: an open mouth shows the dark inside of the mouth."""
    out = np.empty(len(frames))
    for i, (frame, box) in enumerate(zip(frames, boxes, strict=True)):
        x0, y0, x1, y1 = np.round(box).astype(int)
        patch = frame[max(y0, 0) : max(y1, y0 + 1), max(x0, 0) : max(x1, x0 + 1)].astype(np.float64) / 255
        out[i] = 1 - patch.mean() if patch.size else np.nan
    return out


def thumbnail(frame: np.ndarray, size: int = 32) -> np.ndarray:
    import cv2

    small = cv2.resize(np.ascontiguousarray(frame), (size, size), interpolation=cv2.INTER_AREA).astype(np.float64)
    return (small - small.mean()).ravel()


def identity_similarity(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(T,) cosine similarity of each frame's mean-removed thumbnail to the reference's."""
    ref = thumbnail(reference)
    ref /= np.linalg.norm(ref) + 1e-12
    return np.array([float(thumbnail(f) @ ref / (np.linalg.norm(thumbnail(f)) + 1e-12)) for f in frames])


def per_second(values: np.ndarray, fps: int) -> np.ndarray:
    n = len(values) // fps
    return np.nanmean(values[: n * fps].reshape(n, fps), axis=1) if n else np.array([np.nanmean(values)])


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    ok = ~(np.isnan(a) | np.isnan(b))
    if ok.sum() < 3 or a[ok].std() == 0 or b[ok].std() == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def slope_per_minute(values_per_second: np.ndarray) -> float:
    t = np.arange(len(values_per_second)) + 0.5
    return float(np.polyfit(t / 60, values_per_second, 1)[0]) if len(t) >= 2 else float("nan")


def clip_metrics(frames: np.ndarray, truth: np.ndarray, mouth_open: np.ndarray, boxes: np.ndarray, fps: int) -> dict:
    n = min(len(frames), len(truth))
    frames, truth = frames[:n], truth[:n]
    mse = np.square((frames.astype(np.float64) - truth.astype(np.float64)) / 255).reshape(n, -1).mean(1)
    mouth = mouth_signal(frames, boxes[:n])
    ident = identity_similarity(frames, truth[0])
    ident_s = per_second(ident, fps)
    return {
        "frames": n,
        "mse": float(mse.mean()),
        "mse_per_second": per_second(mse, fps).tolist(),
        "mouth_corr": pearson(mouth, mouth_open[:n]),
        "mouth_signal": mouth.tolist(),
        "identity_per_second": ident_s.tolist(),
        "identity_slope_per_min": slope_per_minute(ident_s),
    }


# ---------------------------------------------------------------------------------------------------
# Steps


def train_student(args, size: int) -> Path:
    from flashhead.train.config import Stage2Config
    from flashhead.train.stage2 import train_stage2

    run = Path(args.out) / "run"
    if (run / "export" / "model_index.json").is_file() and not args.retrain:
        log.info("reusing the trained student in %s", run / "export")
        return run / "export"
    if args.retrain and run.exists():
        import shutil

        shutil.rmtree(run)
    overrides = [
        f"teacher.path={args.teacher}", f"data.roots=[{args.data}]", f"data.height={size}", f"data.width={size}",
        f"output_dir={run}", *args.set,
    ]  # fmt: skip
    cfg = Stage2Config.from_file(args.config, overrides)
    t0 = time.perf_counter()
    result = train_stage2(cfg)
    log.info("trained %d iterations in %.0f s", result.step, time.perf_counter() - t0)
    return result.export_dir


def eval_clips(args, size: int) -> list:
    folder = Path(args.eval_data) if args.eval_data else Path(args.out) / "eval-data"
    if not args.eval_data and not (folder / "manifest.parquet").is_file():
        from flashhead.data.cli import plan_clips, synth_dataset

        plans = plan_clips(args.eval_clips, seed=args.eval_seed, kind="procedural",
                           seconds=(args.seconds, args.seconds), val_fraction=0.0, portraits=[])  # fmt: skip
        synth_dataset(folder, plans, size=size, workers=args.workers)
    clips = list(iter_clips(folder))[: args.eval_clips]
    if not clips:
        raise SystemExit(f"error: no clips in {folder}")
    return clips


def rollout(pipe, clip, seconds: float, seed: int) -> np.ndarray:
    """(T, H, W, 3) uint8 frames generated from the clip's first frame and audio (streaming audio mode)."""
    from flashhead.pipeline.flashhead_pipeline import reference_generator
    from flashhead.train.data import resize_center_crop

    cfg = pipe.config
    n = min(len(clip.frames), int(round(seconds * cfg.fps)))
    first = resize_center_crop(clip.frames[:1], cfg.height, cfg.width).numpy()[0]
    waveform = torch.from_numpy(np.ascontiguousarray(clip.audio[: n * cfg.sample_rate // cfg.fps], np.float32))
    reference = pipe.encode_reference(first, generator=reference_generator(seed))
    with torch.inference_mode():
        return np.concatenate(list(pipe.iter_frames(reference, waveform, seed=seed)))[:n]


def plot(results: dict, path: Path) -> None:
    """Docs-ready figure: error and identity similarity against time, mouth r per model, a mouth trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (ax_err, ax_id), (ax_bar, ax_trace) = axes
    colours = {"student": "tab:blue", "teacher_4step": "tab:orange", CONTROL: "tab:green", "truth": "tab:gray"}
    labels = {k: v.split(" (")[0] if k == "student" else v.replace("audio ", "") for k, v in LABELS.items()}

    def mean_curve(clips, key):
        n = min(len(c[key]) for c in clips)  # clips of slightly different lengths: the common span
        return np.nanmean(np.array([c[key][:n] for c in clips]), axis=0)

    for name, summary in results["models"].items():
        err, ident = mean_curve(summary["clips"], "mse_per_second"), mean_curve(summary["clips"], "identity_per_second")
        ax_err.plot(np.arange(len(err)) + 0.5, err, label=f"{labels.get(name, name)}: {summary['mse']:.4f}",
                    color=colours.get(name))  # fmt: skip
        ax_id.plot(np.arange(len(ident)) + 0.5, ident, color=colours.get(name),
                   label=f"{labels.get(name, name)}: {summary['identity_slope_per_min']:+.3f}/min")  # fmt: skip
    truth_ident = mean_curve(results["truth"]["clips"], "identity_per_second")
    ax_id.plot(np.arange(len(truth_ident)) + 0.5, truth_ident, color="tab:gray", ls="--",
               label=f"ground truth: {results['truth']['identity_slope_per_min']:+.3f}/min")  # fmt: skip

    names = [*results["models"], "truth"]
    per_clip = [[c["mouth_corr"] for c in results["models"][n]["clips"]] for n in results["models"]]
    per_clip.append([c["mouth_corr"] for c in results["truth"]["clips"]])
    means = [float(np.nanmean(v)) for v in per_clip]
    x = np.arange(len(names))
    ax_bar.bar(x, means, color=[colours.get(n) for n in names], alpha=0.8)
    for i, v in enumerate(per_clip):
        ax_bar.scatter(np.full(len(v), x[i]), v, color="black", s=12, zorder=3)  # each clip
        ax_bar.text(x[i], means[i], f"{means[i]:.2f}", ha="center", va="bottom")
    ax_bar.set_xticks(x, [labels.get(n, "ground truth (ceiling)") for n in names], fontsize=8)

    clip0 = results["truth"]["clips"][0]
    fps = results["fps"]
    span = slice(0, min(len(clip0["mouth_open"]), 10 * fps))
    t = np.arange(span.stop) / fps

    def z(v):
        v = np.asarray(v, np.float64)[span]
        return (v - np.nanmean(v)) / (np.nanstd(v) + 1e-12)

    ax_trace.plot(t, z(clip0["mouth_open"]), color="black", label="truth (drawn opening)")
    for name, summary in results["models"].items():
        ax_trace.plot(t, z(summary["clips"][0]["mouth_signal"]), color=colours.get(name), label=labels.get(name),
                      alpha=0.8)  # fmt: skip
    ax_err.set(title="error to the ground truth (mean over clips)", xlabel="time (s)", ylabel="pixel MSE")
    ax_id.set(title="identity: similarity of each second to the reference", xlabel="time (s)", ylabel="cosine")
    ax_bar.set(title="mouth opening read from the pixels vs truth (Pearson r)", ylabel="r")
    ax_trace.set(title="mouth opening, first clip, first 10 s (z-scored)", xlabel="time (s)")
    for ax in (ax_err, ax_id, ax_trace):
        ax.legend(fontsize=8)
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
    fig.suptitle(results["title"], fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def markdown_table(results: dict) -> str:
    """The summary as a markdown table, ready for docs/distillation.md."""
    cfg = f" {results['teacher_guidance']}"
    rows = [(LABELS[n] + (cfg if n == "teacher_4step" else ""), m) for n, m in results["models"].items()]
    rows.append(("ground truth (the read-outs' ceiling)", results["truth"]))
    lines = [
        f"{len(results['truth']['clips'])} held-out clips x {results['seconds']:.0f} s, {results['size']} px, "
        f"device {results['device']}" + ("" if results.get("complete", True) else " (INCOMPLETE: cut short)"),
        "",
        "| model | pixel MSE to truth | mouth r | identity slope (/min) | identity, last 10 s | rollout FPS |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        mse = f"{m['mse']:.5f}" if "mse" in m else "0"
        r = m.get("mouth_corr", m.get("truth_mouth_corr"))
        last = np.mean([np.mean(c["identity_per_second"][-10:]) for c in m["clips"]])
        fps = m.get("fps")
        lines.append(f"| {name} | {mse} | {r:.3f} | {m['identity_slope_per_min']:+.4f} | {last:.3f} | "
                     f"{f'{fps:.0f}' if fps else '-'} |")  # fmt: skip
    v = results["verdict"]
    lines += ["", "verdict: " + ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in v.items())]
    return "\n".join(lines) + "\n"


def export_student_dit(student_dir: Path, out: Path) -> Path:
    """The student's DiT in float16, as the embedded model ships (its drop-in replacement candidate)."""
    from flashhead.models.dit import FlashHeadDiT

    dit = FlashHeadDiT.from_pretrained(student_dir / "dit", torch_dtype=torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    dit.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return out


def summarise(clips: list[dict]) -> dict:
    return {
        "mse": float(np.mean([c["mse"] for c in clips])),
        "fps": float(sum(c["frames"] for c in clips) / sum(c["seconds"] for c in clips)),
        "mouth_corr": float(np.nanmean([c["mouth_corr"] for c in clips])),
        "identity_slope_per_min": float(np.mean([c["identity_slope_per_min"] for c in clips])),
        "clips": clips,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="Stage-1 teacher pipeline folder")
    ap.add_argument("--data", required=True, help="training shard folder (flashhead data synth ...)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--config", default=str(REPO / "configs" / "stage2_tiny_cpu.yaml"), help="Stage-2 settings")
    ap.add_argument("--set", action="append", default=[], help="Stage-2 override, e.g. distill.total_steps=2000")
    ap.add_argument("--retrain", action="store_true", help="train again even if OUT/run/export exists")
    ap.add_argument("--seconds", type=float, default=60.0, help="rollout length (and eval clip length)")
    ap.add_argument("--eval-clips", type=int, default=2)
    ap.add_argument("--eval-data", default=None, help="shard folder of long clips instead of generating them")
    ap.add_argument("--eval-seed", type=int, default=777)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of both models")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--results", default=None, help="folder for results.json/.md/.png (default: --out)")
    ap.add_argument("--no-control", action="store_true",
                    help="skip the control: the teacher's weights with the student's sampler, untrained")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="precision of both models' DiT and VAE in the rollouts")  # fmt: skip
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("flashhead").setLevel(logging.INFO)

    from tqdm.auto import tqdm

    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline

    dtype = getattr(torch, args.dtype)
    teacher = FlashHeadPipeline.from_pretrained(args.teacher, device=args.device, torch_dtype=dtype)
    size = teacher.config.height
    student_dir = Path(train_student(args, size))
    student = FlashHeadPipeline.from_pretrained(student_dir, device=args.device, torch_dtype=dtype)
    guidance = teacher.config.guidance_scale if teacher.config.guidance_scale > 1 else 3.0
    teacher.config = teacher.config.replace(num_inference_steps=4, sampler="euler", guidance_scale=guidance)
    models = {"student": student, "teacher_4step": teacher}
    if not args.no_control:  # what the sampler change alone does, so the training's share can be read off
        models[CONTROL] = FlashHeadPipeline.from_pretrained(args.teacher, device=args.device, torch_dtype=dtype,
                                                            config=student.config)  # fmt: skip

    clips = eval_clips(args, size)
    fps = student.config.fps
    per_model: dict[str, list] = {name: [] for name in models}
    truth_clips = []
    from flashhead.train.data import resize_center_crop

    meta = {"teacher": str(args.teacher), "student": str(student_dir), "seconds": args.seconds, "fps": fps,
            "size": size, "device": _device_name(args.device), "dtype": args.dtype, "teacher_guidance": guidance}
    results_dir = Path(args.results or args.out)
    results: dict = {}
    for i, clip in enumerate(tqdm(clips, desc="eval clips")):
        n = min(len(clip.frames), int(round(args.seconds * fps)))
        truth = resize_center_crop(clip.frames[:n], size, size).numpy()
        scale = size / clip.frames.shape[1]
        boxes = np.asarray(clip.extras["mouth_box"], np.float64)[:n] * scale
        mouth_open = np.asarray(clip.meta["mouth_open"], np.float64)[:n]
        t = clip_metrics(truth, truth, mouth_open, boxes, fps)
        truth_clips.append(t | {"key": clip.key, "mouth_open": mouth_open.tolist()})
        for name, pipe in models.items():
            t0 = time.perf_counter()
            frames = rollout(pipe, clip, args.seconds, args.seed)
            m = clip_metrics(frames, truth, mouth_open, boxes, fps)
            per_model[name].append(m | {"key": clip.key, "seconds": time.perf_counter() - t0})
            log.info("%s %s: mse %.5f mouth r %.3f identity slope %+.4f/min", clip.key, name, m["mse"],
                     m["mouth_corr"], m["identity_slope_per_min"])  # fmt: skip
        # after every clip, so that a run cut short (a device call's time limit) still leaves its figures
        results = assemble_results(per_model, truth_clips, meta, complete=i + 1 == len(clips))
        write_results(results, results_dir)

    export_student_dit(student_dir, Path(args.out) / "student-dit-fp16")
    print(markdown_table(results))
    return results


def assemble_results(per_model: dict[str, list], truth_clips: list[dict], meta: dict, complete: bool) -> dict:
    s, t4 = summarise(per_model["student"]), summarise(per_model["teacher_4step"])
    verdict = {
        "student_error_lower": s["mse"] < t4["mse"],
        "student_mouth_corr_at_least_as_high": s["mouth_corr"] >= t4["mouth_corr"],
        "student_identity_flatter": abs(s["identity_slope_per_min"]) < abs(t4["identity_slope_per_min"]),
    }
    verdict["student_better_on_all"] = all(verdict.values())
    return meta | {
        "title": f"student ({meta['student']}) vs teacher with 4 Euler steps + CFG {meta['teacher_guidance']} "
        f"({meta['teacher']}); {len(truth_clips)} clips x {meta['seconds']:.0f} s"
        + ("" if complete else " (incomplete)"),
        "complete": complete,
        "verdict": verdict,
        "models": {"student": s, "teacher_4step": t4} | {n: summarise(c) for n, c in per_model.items()
                                                          if n == CONTROL},
        "truth": {"truth_mouth_corr": float(np.nanmean([c["mouth_corr"] for c in truth_clips])),
                  "identity_slope_per_min": float(np.mean([c["identity_slope_per_min"] for c in truth_clips])),
                  "clips": truth_clips},
    }  # fmt: skip


def write_results(results: dict, out: Path) -> None:
    """results.json, results.png and results.md in `out`, each through a temp file."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "results.json")
    plot(results, out / "results.png")
    (out / "results.md.tmp").write_text(markdown_table(results))
    (out / "results.md.tmp").replace(out / "results.md")


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return device


if __name__ == "__main__":
    main()
