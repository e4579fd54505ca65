"""`flashhead train ...`: Stage-1 training and export of a run as a pipeline folder.

The lead mounts this with `app.add_typer(train_app, name="train")`; `python -m flashhead.train ...` runs the
same commands (that is the form `torchrun -m` needs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from flashhead.errors import friendly_errors

train_app = typer.Typer(
    help="Training: Stage-1 pre-training and Stage-2 distillation of the FlashHead DiT.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@train_app.callback()
def _train() -> None:
    """Training: Stage-1 pre-training and Stage-2 distillation of the FlashHead DiT."""


def _logging() -> None:
    # Our own progress lines at INFO; the main CLI's callback may already have configured the root logger.
    logging.getLogger("flashhead").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@train_app.command()
@friendly_errors
def stage1(
    config: Annotated[Path, typer.Argument(help="YAML or JSON settings (see configs/stage1_*.yaml).")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the output folder's latest checkpoint.")
    ] = False,
    resume_from: Annotated[
        Path | None, typer.Option("--resume-from", help="Continue from this checkpoint file.")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a setting, e.g. --set optim.lr=1e-4 (repeatable; YAML values)."),
    ] = None,
) -> None:
    """Train the DiT (Stage 1): one process, or every process of `torchrun`."""
    from flashhead.train.config import Stage1Config
    from flashhead.train.trainer import train

    _logging()
    result = train(Stage1Config.from_file(config, overrides), resume=resume_from or resume)
    if result.export_dir is not None:
        typer.echo(f"trained {result.step} steps; pipeline with the EMA weights: {result.export_dir}")


@train_app.command()
@friendly_errors
def stage2(
    config: Annotated[Path, typer.Argument(help="YAML or JSON settings (see configs/stage2_*.yaml).")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the output folder's latest checkpoint.")
    ] = False,
    resume_from: Annotated[
        Path | None, typer.Option("--resume-from", help="Continue from this checkpoint file.")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a setting, e.g. --set distill.total_steps=100 (repeatable)."),
    ] = None,
) -> None:
    """Distil the Stage-1 teacher into a 4-step streaming student (Stage 2): one process, or torchrun's."""
    from flashhead.train.config import Stage2Config
    from flashhead.train.stage2 import train_stage2

    _logging()
    result = train_stage2(Stage2Config.from_file(config, overrides), resume=resume_from or resume)
    if result.export_dir is not None:
        typer.echo(f"trained {result.step} iterations; pipeline with the EMA student: {result.export_dir}")


@train_app.command()
@friendly_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A training output folder (with checkpoints/).")],
    out: Annotated[Path, typer.Argument(help="Where to write the pipeline folder.")],
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="A checkpoint file instead of the latest one.")
    ] = None,
) -> None:
    """Write a run's EMA weights (Stage 1, or Stage 2's student) as a pipeline folder for `flashhead generate`."""
    from flashhead.errors import CheckpointError
    from flashhead.train.checkpoint import latest_checkpoint, load_checkpoint
    from flashhead.train.stage2 import export_stage2_run
    from flashhead.train.trainer import export_run

    _logging()
    found = checkpoint or latest_checkpoint(run_dir)
    if found is None:
        raise CheckpointError(f"{run_dir}: no checkpoint to export (checkpoints/latest is missing)")
    stage2 = "student" in load_checkpoint(found)  # memory-mapped: cheap to peek at
    path = (export_stage2_run if stage2 else export_run)(run_dir, out, found)
    typer.echo(f"wrote {path}")


@train_app.command()
@friendly_errors
def vae(
    config: Annotated[Path, typer.Argument(help="YAML or JSON VAETrainConfig settings.")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the output folder's checkpoint.")] = False,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting, e.g. --set total_steps=100 (repeatable).")
    ] = None,
) -> None:
    """Train a small LTX-style video VAE on clip shards (flashhead-tiny's VAE)."""
    from flashhead.train.vae import VAETrainConfig, train_vae

    _logging()
    folder = train_vae(VAETrainConfig.from_file(config, overrides), resume=resume)
    typer.echo(f"wrote {folder}")


@train_app.command()
@friendly_errors
def tiny(
    data: Annotated[list[Path], typer.Option("--data", help="A folder of clip shards (repeatable).")],
    out: Annotated[Path, typer.Option("--out", help="Run folder; the model lands in OUT/flashhead-tiny.")],
    recipe: Annotated[
        Path | None, typer.Option("--recipe", help="Recipe YAML (default: the packaged flashhead_tiny.yaml).")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe setting, e.g. --set stage1.optim.max_minutes=5 (repeatable)."),
    ] = None,
    eval_clips: Annotated[int, typer.Option("--eval-clips", help="Held-out clips per synthetic source.")] = 8,
    until: Annotated[
        str,
        typer.Option("--until", help="Stop after this phase: vae, cache, stage1, stage2 or eval (one per call)."),
    ] = "eval",
) -> None:
    """Train flashhead-tiny end to end: VAE, latent cache, Stage 1, Stage-2 distillation, float16 export, checks."""
    from flashhead.train.tiny import load_recipe, run_recipe

    _logging()
    summary = run_recipe(
        [str(d) for d in data], out, load_recipe(recipe, overrides), until=until, eval_clips=eval_clips
    )
    if not summary:
        typer.echo(f"flashhead-tiny: phases up to {until} done in {out}")
        return
    m = summary["mean"]
    line = (
        f"flashhead-tiny: {out / 'flashhead-tiny'} ({summary['size_mb']:.1f} MB); held-out lip sync r = "
        f"{m['r_generated']:.2f} (real frames {m['r_real_frames']:.2f}), face SSIM {m['face_ssim']:.3f}, "
        f"PSNR {m['face_psnr']:.1f} dB"
    )
    if "teacher" in summary:
        line += f" (Stage-1 teacher: r = {summary['teacher']['r_generated']:.2f})"
    if "real_portraits" in summary:
        r = summary["real_portraits"]["mean"]["r_mouth_change_vs_energy"]
        line += f"; held-back photos: mouth-region change vs speech energy r = {r:.3f}"
    typer.echo(line)
