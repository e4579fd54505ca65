"""`flashhead data ...`: make synthetic training shards.

The lead mounts this with `app.add_typer(data_app, name="data")`. The library part is `plan_clips`
(which clip gets which seed, split, identity and sentences) and `synth_dataset` (render them in a
process pool and write shards in plan order, so the output does not depend on the worker count).

Held-out split: a clip is "val" with probability `val_fraction`; val clips draw their identity and
their sentences only from held-out pools (procedural identity numbers, sentence seeds and portrait
files are each assigned to val by a fixed hash), so no val face or sentence appears in train.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import typer
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from flashhead.data.shards import Clip, ShardWriter, VideoCodec, encode_clip, read_manifest
from flashhead.errors import ConfigError, FlashHeadError

log = logging.getLogger(__name__)

data_app = typer.Typer(help="Training data: synthetic talking-head clips in WebDataset shards.", no_args_is_help=True)


@data_app.callback()
def _data() -> None:
    """Training data: synthetic talking-head clips in WebDataset shards."""


Kind = Literal["procedural", "portrait", "mix"]
_IDENTITY_POOL = 1_000_000
_SENTENCES_PER_CLIP = 8  # more than an 8-s clip can use; unused seeds are simply not spoken
_SECONDS_PER_SENTENCE = 1.0  # longer clips get one more seed per second (a sentence + pause takes ~2-3 s)


def _unit(x: int, salt: int) -> float:
    """A fixed pseudo-random number in [0, 1) for (x, salt): splitmix64, so splits never depend on order."""
    z = (x * 0x9E3779B97F4A7C15 + salt * 0xBF58476D1CE4E5B9 + 0x632BE59BD9B4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((z ^ (z >> 31)) >> 11) / float(1 << 53)


def is_val_identity(identity: int, val_fraction: float) -> bool:
    """Whether procedural identity number `identity` is held out for validation."""
    return _unit(identity, 1) < val_fraction


def is_val_sentence(sentence_seed: int, val_fraction: float) -> bool:
    """Whether the sentence generated from `sentence_seed` is held out for validation."""
    return _unit(sentence_seed, 2) < val_fraction


def split_portraits(
    portraits: list[Path], val_fraction: float, hold_out: list[str] | None = None
) -> tuple[list[Path], list[Path]]:
    """(train, val) portraits: the val ones are a fixed-hash choice of round(val_fraction · n), at least one
    when there are two or more portraits and val_fraction > 0; or exactly the files named in `hold_out`."""
    if hold_out:
        unknown = sorted(set(hold_out) - {p.name for p in portraits})
        if unknown:
            raise ConfigError(f"--hold-out names no usable portrait: {unknown}")
        keep = sorted(p for p in portraits if p.name not in hold_out)
        return keep, sorted(p for p in portraits if p.name in hold_out)
    ranked = sorted(portraits, key=lambda p: _unit(int.from_bytes(p.name.encode()[:16].ljust(16, b"\0"), "little"), 3))
    k = 0 if val_fraction <= 0 or len(ranked) < 2 else max(1, round(val_fraction * len(ranked)))
    return sorted(ranked[k:]), sorted(ranked[:k])


@dataclass(frozen=True)
class ClipPlan:
    """Everything that determines one synthetic clip."""

    key: str
    kind: Literal["procedural", "portrait"]
    seed: int
    split: Literal["train", "val"]
    seconds: float
    sentence_seeds: tuple[int, ...]
    identity: int = -1  # procedural identity number
    portrait: str = ""  # portrait file


def plan_clips(
    n: int,
    *,
    seed: int = 0,
    kind: Kind = "procedural",
    seconds: tuple[float, float] = (4.0, 8.0),
    val_fraction: float = 0.1,
    portraits: list[Path] | None = None,
    hold_out: list[str] | None = None,
    fps: int = 25,
    held_out: bool = False,
) -> list[ClipPlan]:
    """Plans for `n` clips: the same arguments always give the same plans. `held_out` makes every clip a val
    clip (identity, sentences, portrait from the held-out pools of `val_fraction`): evaluation sets. `hold_out`:
    portrait file names that no train clip uses (the val pool; e.g. the portraits a real-photo evaluation keeps
    for itself)."""
    if n < 0 or not 0 <= val_fraction < 1 or not 0 < seconds[0] <= seconds[1]:
        raise ConfigError(f"bad plan: n={n}, val_fraction={val_fraction}, seconds={seconds}")
    if held_out and val_fraction <= 0:
        raise ConfigError("held-out clips need val_fraction > 0 (it sets the size of the held-out pools)")
    train_p, val_p = split_portraits(list(portraits or []), val_fraction, hold_out)
    if kind in ("portrait", "mix") and not train_p:
        raise ConfigError("portrait clips need at least one usable portrait (--portraits DIR)")
    plans = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 0x91A2])
        split = "val" if rng.random() < val_fraction or held_out else "train"
        want_val = split == "val"
        this_kind = kind if kind != "mix" else ("portrait" if rng.random() < 0.5 else "procedural")
        if this_kind == "portrait" and want_val and not val_p:
            split, want_val = "train", False  # one portrait only: nothing can be held out
        sentence_seeds = []
        while len(sentence_seeds) < _SENTENCES_PER_CLIP:
            s = int(rng.integers(2**31))
            if is_val_sentence(s, val_fraction) == want_val:
                sentence_seeds.append(s)
        secs = round(float(rng.uniform(*seconds)) * fps) / fps
        # Long clips need more sentences; a separate stream keeps the plans of short clips unchanged.
        extra = np.random.default_rng([seed, i, 0x5E47])
        while len(sentence_seeds) < max(_SENTENCES_PER_CLIP, int(np.ceil(secs / _SECONDS_PER_SENTENCE))):
            s = int(extra.integers(2**31))
            if is_val_sentence(s, val_fraction) == want_val:
                sentence_seeds.append(s)
        key = f"s{seed}-{this_kind[:4]}-{i:07d}"
        if this_kind == "procedural":
            identity = int(rng.integers(_IDENTITY_POOL))
            while is_val_identity(identity, val_fraction) != want_val:
                identity = int(rng.integers(_IDENTITY_POOL))
            plans.append(
                ClipPlan(key, "procedural", int(rng.integers(2**31)), split, secs, tuple(sentence_seeds), identity)
            )
        else:
            pool = val_p if want_val else train_p
            portrait = str(pool[int(rng.integers(len(pool)))])
            plans.append(
                ClipPlan(
                    key, "portrait", int(rng.integers(2**31)), split, secs, tuple(sentence_seeds), portrait=portrait
                )
            )
    return plans


def make_clip(plan: ClipPlan, size: int = 128) -> Clip:
    """Render one planned clip (frames still raw)."""
    common = dict(split=plan.split)
    if plan.kind == "procedural":
        from flashhead.data.synth_procedural import ProceduralConfig, generate_clip

        return generate_clip(
            plan.key, plan.seed, plan.identity, list(plan.sentence_seeds), plan.seconds,
            config=ProceduralConfig(size=size), **common,
        )  # fmt: skip
    from flashhead.data.synth_portrait import PortraitConfig, generate_clip

    return generate_clip(
        plan.key, plan.seed, plan.portrait, list(plan.sentence_seeds), plan.seconds,
        config=PortraitConfig(size=size), **common,
    )  # fmt: skip


def _render_and_encode(args: tuple[ClipPlan, int, VideoCodec]) -> Clip:
    # Workers encode too: H.264 is a good share of the cost, and the writer then only copies bytes.
    # One BLAS thread per worker: the portrait warp's many small scipy calls (Delaunay, griddata) ran ~25x
    # slower with OpenBLAS threads fighting over two cores (45 s instead of 1.8 s per 4-s clip).
    plan, size, codec = args
    with threadpool_limits(limits=1):
        return encode_clip(make_clip(plan, size), codec)


def usable_portraits(folder: str | os.PathLike, size: int = 128) -> list[Path]:
    """Portrait files in `folder` with one findable face big enough for `size`; the rest are logged and skipped."""
    from flashhead.data.synth_portrait import PortraitConfig, animator_for, list_portraits

    ok = []
    for path in list_portraits(folder):
        try:
            animator_for(path, PortraitConfig(size=size))
            ok.append(path)
        except FlashHeadError as e:
            log.warning("skipping portrait %s: %s", path.name, e)
    return ok


def synth_dataset(
    out: str | os.PathLike,
    plans: list[ClipPlan],
    *,
    size: int = 128,
    workers: int = 1,
    shard_max_clips: int = 256,
    overwrite: bool = False,
    progress: bool = True,
    codec: VideoCodec | None = None,
) -> float:
    """Render `plans` into shards under `out`; returns the wall time in seconds."""
    start = time.perf_counter()
    jobs = [(p, size, codec or VideoCodec()) for p in plans]
    with ShardWriter(out, shard_max_clips=shard_max_clips, overwrite=overwrite) as writer:
        bar = tqdm(total=len(jobs), unit="clip", disable=not progress, desc="synth")
        if workers <= 1:
            for job in jobs:
                writer.write(_render_and_encode(job))
                bar.update()
        else:
            # spawn: espeak-ng and OpenCV keep process-global state that should not be forked mid-use.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for clip in pool.imap(_render_and_encode, jobs, chunksize=1):
                    writer.write(clip)
                    bar.update()
        bar.close()
    return time.perf_counter() - start


MIN_SIZE, MAX_SIZE = 64, 2048  # synthetic frames: the renderer's smallest face; 4x the official 512


def _parse_seconds(text: str) -> tuple[float, float]:
    try:
        lo, _, hi = text.partition("-")
        out = (float(lo), float(hi or lo))
    except ValueError:
        raise ConfigError(f"--seconds must look like 4-8 or 6, got {text!r}") from None
    if not 0 < out[0] <= out[1]:
        raise ConfigError(f"--seconds range must be positive and ordered, got {text!r}")
    return out


@data_app.command()
def synth(
    n: Annotated[int, typer.Option("--n", help="Number of clips.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for shards and manifest.parquet.")],
    size: Annotated[int, typer.Option(help="Frame size in pixels (square).")] = 128,
    seconds: Annotated[str, typer.Option(help="Clip length range in seconds, e.g. 4-8.")] = "4-8",
    kind: Annotated[str, typer.Option(help="procedural, portrait or mix.")] = "procedural",
    portraits: Annotated[Path | None, typer.Option(help="Folder of portrait photos (portrait/mix).")] = None,
    seed: Annotated[int, typer.Option(help="Dataset seed.")] = 0,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = max(1, (os.cpu_count() or 1)),
    val_fraction: Annotated[
        float, typer.Option(help="Share of clips (and of identities and sentences) held out.")
    ] = 0.1,
    shard_max_clips: Annotated[int, typer.Option(help="Clips per shard.")] = 256,
    held_out: Annotated[
        bool, typer.Option("--held-out", help="Every clip from the held-out identities and sentences (eval sets).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace shards already in --out.")] = False,
    hold_out: Annotated[
        list[str] | None,
        typer.Option("--hold-out", help="Portrait file name no train clip may use (repeatable; the val pool)."),
    ] = None,
    crf: Annotated[int, typer.Option(help="H.264 CRF of the shards (12: visually lossless; higher: smaller).")] = 12,
) -> None:
    """Generate synthetic talking-head clips with known lip-sync truth into WebDataset shards."""
    try:
        if n < 1:
            raise ConfigError(f"--n must be at least 1, got {n}")
        if not (MIN_SIZE <= size <= MAX_SIZE and size % 2 == 0):
            raise ConfigError(f"--size must be an even number of pixels from {MIN_SIZE} to {MAX_SIZE}, got {size}")
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"--val-fraction must be at least 0 and below 1, got {val_fraction}")
        if shard_max_clips < 1:
            raise ConfigError(f"--shard-max-clips must be at least 1, got {shard_max_clips}")
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: a file, not a folder")
        if kind not in ("procedural", "portrait", "mix"):
            raise ConfigError(f"--kind must be procedural, portrait or mix, got {kind!r}")
        found = usable_portraits(portraits, size) if portraits is not None and kind != "procedural" else []
        plans = plan_clips(
            n, seed=seed, kind=kind, seconds=_parse_seconds(seconds), val_fraction=val_fraction, portraits=found,
            held_out=held_out, hold_out=hold_out,
        )  # fmt: skip
        if not 0 <= crf <= 51:
            raise ConfigError(f"--crf must be in [0, 51], got {crf}")
        wall = synth_dataset(
            out, plans, size=size, workers=workers, shard_max_clips=shard_max_clips, overwrite=overwrite,
            codec=VideoCodec(crf=crf),
        )  # fmt: skip
    except FlashHeadError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    df = read_manifest(out)
    typer.echo(
        f"{len(df)} clips ({(df['split'] == 'val').sum()} val), {df['duration'].sum():.0f} s of video "
        f"in {df['shard'].nunique()} shards at {out}; {wall:.1f} s ({len(df) / max(wall, 1e-9):.2f} clips/s)"
    )


@data_app.command()
def curate(
    inputs: Annotated[list[Path], typer.Argument(help="Video files or folders of videos (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: shards, manifest, report.json/html.")],
    config: Annotated[Path | None, typer.Option(help="Curation settings (YAML/JSON); defaults otherwise.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting, e.g. --set face.crop_size=256.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Worker processes (1: in this process).")] = max(
        1, (os.cpu_count() or 1)
    ),
    ray: Annotated[
        str | None, typer.Option("--ray", help="Run on a Ray cluster: its address, 'auto', or 'local' to start one.")
    ] = None,
    fresh: Annotated[bool, typer.Option(help="Discard the cached work in OUT/.work and start over.")] = False,
) -> None:
    """Curate raw talking-head videos into training shards (dedup, scenes, face crop, filters, features)."""
    from flashhead.data.curate import CurateConfig
    from flashhead.data.curate import curate as run_curation

    try:
        cfg = CurateConfig.from_file(config, set_ or [])
        report = run_curation(inputs, out, cfg, workers=workers, ray_address=ray, fresh=fresh)
    except FlashHeadError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    t = report["time"]
    skipped = ", ".join(s["stage"] for s in report["skipped_stages"]) or "none"
    typer.echo(
        f"{report['inputs']} inputs ({report['input_hours'] * 60:.1f} min) -> {report['kept_clips']} clips "
        f"({report['kept_hours'] * 60:.1f} min) in {out}; {len(report['rejected'])} rejections; skipped stages: "
        f"{skipped}; {t['clip_seconds_per_core_second']} clip-s per core-s; report: {out / 'report.html'}"
    )
