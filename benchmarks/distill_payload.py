"""Pack issue 7's distillation experiment for a GPU machine that cannot make synthetic data (no espeak-ng).

    python benchmarks/distill_payload.py --train /tmp/tinydata/procedural --out /work/main/.device/distill

Writes OUT/data.tar.xz (train/ and eval/ shard folders) and OUT/run.sh (a copy of benchmarks/distill_device.sh):
- train/: --train-clips train-split clips of the training shards long enough for one Stage-2 rollout window
  (configs/stage2_tiny_distill.yaml: 33 + (K - 1) x 28 frames), a seeded choice, copied without re-encoding.
  The student needs the teacher's motion and audio statistics, not every clip, and the payload must stay small.
- teacher/: the Stage-1 flashhead-tiny pipeline (the teacher). The package ships the distilled student since
  2026-11-26, so the teacher's DiT and sampling settings are taken from git history (--teacher-commit, the last
  commit that shipped it) or from a pipeline folder (--teacher, e.g. `flashhead train tiny`'s export).
- eval/: --eval-clips procedural clips of --seconds each whose identities and sentences come from the held-out
  pools (`flashhead data synth --held-out`), so neither the teacher nor the student ever trained on them.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from flashhead.data.cli import plan_clips, synth_dataset  # noqa: E402
from flashhead.data.shards import ShardWriter, iter_clips, read_manifest  # noqa: E402

log = logging.getLogger("distill_payload")
SHIPPED = "src/flashhead/assets/flashhead-tiny"
TEACHER_COMMIT = "57c1a7b"  # the last commit whose packaged flashhead-tiny was the Stage-1 model


def write_teacher(dst: Path, folder: Path | None, commit: str) -> Path:
    """The teacher pipeline folder: `folder` as is, else the shipped folder with the DiT and sampling settings of
    `commit` (its VAE and mel encoder are the ones shipped now: distillation did not change them)."""
    if folder is not None:
        shutil.copytree(folder, dst)
        return dst
    shutil.copytree(REPO / SHIPPED, dst)
    for rel in ("dit/diffusion_pytorch_model.safetensors", "dit/config.json", "generation_config.json"):
        try:
            blob = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{SHIPPED}/{rel}"],
                                  capture_output=True, check=True).stdout  # fmt: skip
        except (OSError, subprocess.CalledProcessError) as e:
            msg = f"error: cannot read {rel} of commit {commit} from git ({e}); pass --teacher FOLDER"
            raise SystemExit(msg) from e
        (dst / rel).write_bytes(blob)
    return dst


def window_frames(config: Path, teacher: Path) -> int:
    """Frames of one rollout window of the Stage-2 config, with its teacher's chunk geometry."""
    from flashhead.models.loading import read_json
    from flashhead.train.config import Stage2Config
    from flashhead.train.data import SampleSpec
    from flashhead.train.rollout_data import RolloutSpec

    cfg = Stage2Config.from_file(config)
    dit = read_json(teacher / "dit" / "config.json")
    chunk = SampleSpec(cfg.data.height, cfg.data.width, tuple(dit["vae_stride"]), frame_num=cfg.data.frame_num,
                       motion_latent_frames=cfg.distill.motion_latent_frames)  # fmt: skip
    return RolloutSpec(chunk, cfg.distill.num_chunks).frames


def copy_subset(src: Path, dst: Path, n: int, min_frames: int, seed: int) -> list[str]:
    """A seeded choice of n train clips with >= min_frames frames, copied (encoded bytes) into new shards."""
    df = read_manifest(src)
    eligible = sorted(df[(df["split"] == "train") & (df["num_frames"] >= min_frames)]["key"])
    if len(eligible) < n:
        raise SystemExit(f"error: {src} has {len(eligible)} train clips of >= {min_frames} frames, {n} wanted")
    keep = set(np.random.default_rng(seed).choice(eligible, n, replace=False).tolist())
    with ShardWriter(dst, overwrite=True) as writer:
        for clip in iter_clips(src, split="train", decode=False):
            if clip.key in keep:
                writer.write(clip)
    return sorted(keep)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", required=True, type=Path, help="training shard folder (flashhead-tiny's procedural/)")
    ap.add_argument("--out", required=True, type=Path, help="folder for data.tar.xz and run.sh")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "stage2_tiny_distill.yaml")
    ap.add_argument("--teacher", type=Path, default=None, help="teacher pipeline folder (default: from git)")
    ap.add_argument("--teacher-commit", default=TEACHER_COMMIT, help="commit that shipped the teacher")
    ap.add_argument("--train-clips", type=int, default=32)
    ap.add_argument("--eval-clips", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of each evaluation clip")
    ap.add_argument("--eval-seed", type=int, default=777, help="dataset seed of the evaluation clips")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="choice of the training clips")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        teacher = write_teacher(data / "teacher", args.teacher, args.teacher_commit)
        frames = window_frames(args.config, teacher)
        keys = copy_subset(args.train, data / "train", args.train_clips, frames, args.seed)
        log.info("train: %d clips of >= %d frames from %s", len(keys), frames, args.train)
        plans = plan_clips(args.eval_clips, seed=args.eval_seed, kind="procedural",
                           seconds=(args.seconds, args.seconds), held_out=True)  # fmt: skip
        synth_dataset(data / "eval", plans, size=args.size, workers=args.workers)
        log.info("eval: %d held-out clips of %.0f s", len(plans), args.seconds)
        args.out.mkdir(parents=True, exist_ok=True)
        part = args.out / "data.tar.xz.tmp"
        with tarfile.open(part, "w:xz", preset=9) as tar:
            tar.add(data / "train", "train")
            tar.add(data / "eval", "eval")
            tar.add(teacher, "teacher")
        part.replace(args.out / "data.tar.xz")
    script = args.out / "run.sh"
    shutil.copyfile(REPO / "benchmarks" / "distill_device.sh", script.with_suffix(".tmp"))
    script.with_suffix(".tmp").replace(script)
    script.chmod(0o755)
    mb = (args.out / "data.tar.xz").stat().st_size / 1e6
    carried = sum(p.stat().st_size for p in args.out.parent.rglob("*") if p.is_file()) / 1e6
    print(f"{args.out / 'data.tar.xz'}: {mb:.1f} MB; {args.out.parent} holds {carried:.1f} MB in all")
    return args.out / "data.tar.xz"


if __name__ == "__main__":
    main()
