"""The flashhead-tiny recipe: VAE, latent cache, Stage 1, Stage-2 distillation and export in one command, then
the checks its issue asks for.

    flashhead train tiny --data DIR [--data DIR ...] --out runs/tiny [--until vae|cache|stage1|stage2|eval]

runs the phases of `recipes/flashhead_tiny.yaml` in order (each resumable: a phase whose output exists is
skipped, an interrupted one continues from its checkpoint; `--until` stops after a phase, so each call of
a time-limited machine can run one), writes `OUT/flashhead-tiny` (the pipeline folder that ships in
`flashhead/assets/`), `OUT/eval.json` and `OUT/curves.png`.

    vae     the small LTX-style VAE (flashhead.train.vae)
    cache   every training window and reference encoded once by that VAE (flashhead.train.latent_cache)
    stage1  the DiT, trained from the cache (flashhead.train.trainer), exported as OUT/teacher with the
            recipe's `export` sampling (Euler steps + audio CFG)
    stage2  the teacher distilled into a 4-step student without CFG (flashhead.train.stage2); a recipe
            whose `stage2` section is null ships the teacher instead
    eval    float16 export of the final model; lip sync and identity on held-out synthetic clips (and the
            teacher's figures beside the student's); on held-back real portraits, the correlation of
            mouth-region change with speech energy
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashhead.atomic import atomic_path, make_folder
from flashhead.config_files import apply_override, read_mapping
from flashhead.errors import ConfigError

logger = logging.getLogger(__name__)

RECIPE = "flashhead_tiny.yaml"
FACE_REGION = (0.25, 0.2, 0.75, 0.85)  # x0, y0, x1, y1 fractions of a face-centred crop
MOUTH_REGION = (0.3, 0.55, 0.7, 0.85)  # the mouth of a face-centred crop (tests/pipeline/test_embedded_model.py)
PHASES = ("vae", "cache", "stage1", "stage2", "eval")
SECTIONS = {"vae", "cache", "stage1", "export", "stage2", "eval"}


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    if path is None:
        with resources.as_file(resources.files("flashhead.train.recipes") / RECIPE) as packaged:
            data = read_mapping(packaged)
    else:
        data = read_mapping(path)
    for item in overrides or []:
        apply_override(data, item)
    unknown = sorted(set(data) - SECTIONS)
    if unknown:
        raise ConfigError(f"recipe: unknown section(s) {unknown} (expected {', '.join(sorted(SECTIONS))})")
    return data


def run_recipe(
    data_roots: list[str],
    out: str | Path,
    recipe: dict[str, Any] | None = None,
    *,
    until: str = "eval",
    eval_clips: int = 8,
    eval_seconds: float = 4.0,
) -> dict[str, Any]:
    """Train (or finish training) flashhead-tiny into `out`, up to phase `until`; returns the evaluation
    summary (empty when `until` stops before the evaluation)."""
    from flashhead.train.stage2 import train_stage2
    from flashhead.train.trainer import train
    from flashhead.train.vae import VAETrainConfig, train_vae

    if until not in PHASES:
        raise ConfigError(f"--until must be one of {', '.join(PHASES)}, got {until!r}")
    last = PHASES.index(until)
    recipe = recipe or load_recipe()
    roots = [str(Path(r)) for r in data_roots]
    if not roots:
        raise ConfigError("give at least one --data folder of clip shards")
    out = make_folder(out, "--out")

    vae_folder = out / "vae" / "vae"
    if not (vae_folder / "config.json").is_file():
        vae_cfg = VAETrainConfig.from_dict({**recipe.get("vae", {}), "roots": roots, "output_dir": str(out / "vae")})
        train_vae(vae_cfg, resume=True)
        if not (vae_folder / "config.json").is_file():
            raise ConfigError(f"{out / 'vae'}: the VAE did not finish")

    cfg = stage1_config(recipe, roots, out)
    cache_folder = out / "cache"
    if last < PHASES.index("cache"):
        return {}

    stage1_finished = done_marker(out / "stage1").is_file()  # then a fresh machine need not rebuild the cache
    if cfg.data.cache and not stage1_finished and not (cache_folder / "cache.json").is_file():
        build_cache(cfg, cache_folder, **(recipe.get("cache") or {}))
    if last < PHASES.index("stage1"):
        return {}

    export_dir = out / "stage1" / "export"
    stage1_done = resume_until_done(out / "stage1", lambda: train(cfg, resume=True), cfg.optim.total_steps)
    if last < PHASES.index("stage2"):
        return {}
    require_done(stage1_done, "Stage 1", cfg.optim.total_steps)
    teacher = out / "teacher"
    if not (teacher / "model_index.json").is_file():
        export_pipeline(export_dir, teacher, recipe.get("export", {}), name="flashhead-tiny-teacher")

    final_source = teacher
    if recipe.get("stage2") is not None:
        cfg2 = stage2_config(recipe["stage2"], teacher, roots, out / "stage2")
        stage2_done = resume_until_done(
            out / "stage2", lambda: train_stage2(cfg2, resume=True), cfg2.distill.total_steps
        )
        if last >= PHASES.index("eval"):
            require_done(stage2_done, "Stage 2", cfg2.distill.total_steps)
        final_source = out / "stage2" / "export"  # the EMA student with the distilled sampler, no CFG
    if last < PHASES.index("eval"):
        return {}

    final = export_pipeline(final_source, out / "flashhead-tiny", {})
    summary = evaluate_tiny(final, roots, clips=eval_clips, seconds=eval_seconds)
    if final_source != teacher:  # what distillation changed, on the same clips
        summary["teacher"] = evaluate_tiny(teacher, roots, clips=eval_clips, seconds=eval_seconds)["mean"]
    summary["size_mb"] = folder_megabytes(final)
    portraits = recipe.get("eval", {})
    if portraits.get("portraits"):
        summary["real_portraits"] = evaluate_portraits(final, **portraits)
    (out / "eval.json").write_text(json.dumps(summary, indent=2))
    plot_curves(out, out / "curves.png")
    return summary


def done_marker(run_dir: Path) -> Path:
    """The file that says a training phase reached its steps (holds the step count)."""
    return run_dir / "DONE"


def resume_until_done(run_dir: Path, train_call: Any, total_steps: int) -> Path:
    """Run (or resume) a training phase unless `run_dir/DONE` exists; write DONE once it reaches `total_steps`
    (a spent time budget or a crash leaves it unwritten: the next call resumes from the checkpoint)."""
    done = done_marker(run_dir)
    if not done.is_file():
        result = train_call()
        if result.step >= total_steps:
            done.write_text(f"{result.step}\n")
    return done


def require_done(done: Path, phase: str, total_steps: int) -> None:
    if not done.is_file():
        raise ConfigError(f"{done.parent}: {phase} has not reached its {total_steps} steps yet")


def stage1_config(recipe: dict[str, Any], roots: list[str], out: Path) -> Any:
    """The recipe's `stage1` section completed with this run's data, VAE (OUT/vae), cache (OUT/cache, when the
    recipe has a `cache` section) and output folder (OUT/stage1)."""
    from flashhead.train.config import Stage1Config

    s1 = json.loads(json.dumps(recipe.get("stage1", {})))  # a deep copy
    s1.setdefault("data", {})["roots"] = roots
    s1.setdefault("vae", {})["path"] = str(out / "vae" / "vae")
    s1["output_dir"] = str(out / "stage1")
    if recipe.get("cache") is not None:
        s1["data"]["cache"] = str(out / "cache")
    return Stage1Config.from_dict(s1)


def stage2_config(section: dict[str, Any], teacher: Path, roots: list[str], output_dir: Path) -> Any:
    """The recipe's `stage2` section completed with this run's teacher folder, data and output folder."""
    from flashhead.train.config import Stage2Config

    s2 = json.loads(json.dumps(section))  # a deep copy
    s2.setdefault("teacher", {})["path"] = str(teacher)
    s2.setdefault("data", {})["roots"] = roots
    s2["output_dir"] = str(output_dir)
    return Stage2Config.from_dict(s2)


def build_cache(cfg: Any, folder: Path, *, stride: int | None = None, batch_size: int = 32) -> Path:
    """The recipe's cache phase: Stage 1's frozen VAE and audio encoder (float32, on the GPU when there is
    one) over every training window of `cfg.data`."""
    from flashhead.train.latent_cache import build_latent_cache
    from flashhead.train.trainer import build_frozen, resolve_dit_config, sample_spec

    dit_config = resolve_dit_config(cfg)
    vae, audio_encoder = build_frozen(cfg, dit_config["vae_stride"][0])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":  # the same float32 math Stage 1 would run (TF32 convolutions)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    vae.to(device, torch.float32)
    audio_encoder.to(device)
    spec = sample_spec(cfg, dit_config, vae)
    return build_latent_cache(
        cfg.data.roots, folder, vae, audio_encoder, spec, split=cfg.data.split, stride=stride, batch_size=batch_size
    )


def export_pipeline(source: Path, folder: Path, sampling: dict[str, Any], name: str = "flashhead-tiny") -> Path:
    """A trained pipeline folder re-saved with `sampling` (GenerationConfig fields) applied, float16 weights."""
    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline

    pipe = FlashHeadPipeline.from_pretrained(source, device="cpu", torch_dtype=torch.float32)
    pipe.config = pipe.config.replace(**sampling)
    pipe.name = name
    with atomic_path(folder) as tmp:
        pipe.save_pretrained(tmp, weights_dtype=torch.float16)
    return folder


def folder_megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6


# ---------------------------------------------------------------------------------------------------
# Evaluation: lip sync on held-out synthetic clips, identity on their first frames


SYNTHETIC = ("synth-procedural", "synth-portrait")


def _box(fractions: tuple[float, float, float, float], h: int, w: int) -> np.ndarray:
    x0, y0, x1, y1 = fractions
    return np.array([x0 * w, y0 * h, x1 * w, y1 * h])


def grow_box(box: np.ndarray, margin: float) -> np.ndarray:
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    return np.array([x0 - dx, y0 - dy, x1 + dx, y1 + dy])


@torch.no_grad()
def evaluate_tiny(pipeline: Any, roots: list[str], *, clips: int = 8, seconds: float = 4.0, seed: int = 0):
    """Held-out ("val") synthetic clips: the clip's first frame is the reference, its audio drives the model.

    Up to `clips` clips of each synthetic source (procedural faces; animated portraits, whose val clips use
    only held-back photos). Reports, per clip, on average and per source: Pearson r between the mouth
    opening measured on the generated frames (`dark_gap` in the clip's mouth box) and the ground truth; the
    same measure on the real frames (the ceiling of what the measure can show); PSNR / SSIM of the face
    region against the ground truth.
    """
    from flashhead.data.shards import read_clip_at, read_manifest
    from flashhead.eval.mouth import dark_gap, pearson, psnr, ssim_gray
    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline, reference_generator
    from flashhead.train.data import decode_frames, resize_center_crop

    pipe = pipeline if isinstance(pipeline, FlashHeadPipeline) else FlashHeadPipeline.from_pretrained(pipeline)
    h, w = pipe.config.height, pipe.config.width
    rows = []
    for root in roots:
        manifest = read_manifest(root)
        for r in manifest[manifest.split == "val"].itertuples():
            rows.append((Path(root), r))
    per_source = {src: [(root, r) for root, r in rows if r.source == src][:clips] for src in SYNTHETIC}
    rows = [row for chosen in per_source.values() for row in chosen]
    face = _box(FACE_REGION, h, w).astype(int)

    def crop(f: np.ndarray) -> np.ndarray:
        return f[face[1] : face[3], face[0] : face[2]]

    results = []
    for root, r in rows:
        clip = read_clip_at(root / r.shard, int(r.offset))
        n = min(int(seconds * 25), int(r.num_frames))
        real = resize_center_crop(decode_frames(clip, range(n)), h, w).numpy()
        scale = np.array([w / clip.meta["width"], h / clip.meta["height"]] * 2)
        boxes = clip.extras["mouth_box"][:n] * scale
        audio = torch.from_numpy(np.ascontiguousarray(clip.audio[: n * 640]))
        reference = pipe.encode_reference(real[0], generator=reference_generator(seed))
        frames = np.concatenate(list(pipe.iter_frames(reference, audio, seed=seed)))[:n]
        truth = np.asarray(clip.meta["mouth_open"][:n])
        box = grow_box(boxes[0], 0.3)
        results.append({
            "key": r.key,
            "source": r.source,
            "r_generated": pearson(dark_gap(frames, box), truth),
            "r_real_frames": pearson(dark_gap(real, box), truth),
            "face_psnr": float(np.mean([psnr(crop(a), crop(b)) for a, b in zip(frames, real, strict=True)])),
            "face_ssim": float(np.mean([ssim_gray(crop(a), crop(b)) for a, b in zip(frames, real, strict=True)])),
            "first_frame_face_ssim": ssim_gray(crop(frames[0]), crop(real[0])),
        })  # fmt: skip
    if not results:
        raise ConfigError(f"no held-out synthetic clips under {roots} to evaluate on")
    def average(items: list[dict]) -> dict[str, float]:
        return {k: float(np.mean([x[k] for x in items])) for k in items[0] if k not in ("key", "source")}

    by_source = {src: average([x for x in results if x["source"] == src]) for src in per_source if per_source[src]}
    return {"clips": results, "mean": average(results), "mean_by_source": by_source, "resolution": [h, w],
            "seconds": seconds}  # fmt: skip


@torch.no_grad()
def evaluate_portraits(
    pipeline: Any,
    portraits: list[str],
    audio: str,
    seconds: float = 8.0,
    portrait_dir: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Does the mouth follow the speech on real photos the model never saw?

    Each portrait (an image file, face-cropped as inference does unless it already has the model's size)
    speaks the first `seconds` of `audio`; reported per portrait and on average: Pearson r between the
    mean absolute frame-to-frame change of the mouth region (`MOUTH_REGION` of the crop) and the RMS
    energy of the audio under each frame (flashhead.eval.mouth), and the first frame's face SSIM.
    """
    from flashhead.eval.mouth import frame_energy, pearson, region_motion, ssim_gray
    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline, reference_generator

    pipe = pipeline if isinstance(pipeline, FlashHeadPipeline) else FlashHeadPipeline.from_pretrained(pipeline)
    h, w = pipe.config.height, pipe.config.width
    waveform = _speech(Path(audio), pipe.config.sample_rate)[: int(seconds * pipe.config.sample_rate)]
    n = int(seconds * pipe.config.fps)
    energy = frame_energy(waveform, n, pipe.config.sample_rate, pipe.config.fps)
    mouth, face = _box(MOUTH_REGION, h, w), _box(FACE_REGION, h, w).astype(int)
    results = {}
    for name in portraits:
        path = Path(portrait_dir or ".") / name
        if not path.is_file():
            raise ConfigError(f"evaluation portrait {path} not found")
        image = np.asarray(_open_rgb(path))
        if image.shape[:2] != (h, w):
            image = pipe.prepare_image(path, crop=True)
        reference = pipe.encode_reference(image, generator=reference_generator(seed))
        audio_t = torch.from_numpy(np.ascontiguousarray(waveform, np.float32))
        frames = np.concatenate(list(pipe.iter_frames(reference, audio_t, seed=seed)))[:n]
        crop = (slice(face[1], face[3]), slice(face[0], face[2]))
        results[name] = {
            "r_mouth_change_vs_energy": pearson(region_motion(frames, mouth)[1:], energy[1:]),
            "first_frame_face_ssim": ssim_gray(frames[0][crop], image[crop]),
        }
    mean = {k: float(np.mean([v[k] for v in results.values()])) for k in next(iter(results.values()))}
    return {"portraits": results, "mean": mean, "audio": Path(audio).name, "seconds": seconds}


def _speech(path: Path, rate: int) -> np.ndarray:
    """Mono float32 at `rate`: PyAV decodes any format; WAV also reads without it (training machines may
    lack PyAV)."""
    try:
        from flashhead.media.audio_io import load_audio
    except ImportError:
        from scipy.io import wavfile
        from scipy.signal import resample_poly

        file_rate, pcm = wavfile.read(path)
        pcm = pcm.astype(np.float32) / (32768.0 if pcm.dtype == np.int16 else 1.0)
        pcm = pcm.mean(axis=1) if pcm.ndim == 2 else pcm
        return pcm if file_rate == rate else resample_poly(pcm, rate, file_rate).astype(np.float32)
    return load_audio(path, target_sr=rate)[0]


def _open_rgb(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def plot_curves(run: Path, png: Path) -> Path | None:
    """Loss curves of the VAE, Stage 1 and Stage 2 runs (metrics.jsonl of each) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def read(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    panels = [  # (title, points, the keys to draw: label -> function of a point)
        ("VAE reconstruction", read(run / "vae" / "metrics.jsonl"),
         {"L1": lambda p: p["l1"], "1 - SSIM": lambda p: 1 - p["ssim"]}),
        ("Stage 1 (DiT) training loss", read(run / "stage1" / "metrics.jsonl"),
         {k: (lambda p, k=k: p[k]) for k in ("loss", "flow", "face", "temporal")}),
        ("Stage 2 (distillation) losses", read(run / "stage2" / "metrics.jsonl"),
         {k: (lambda p, k=k: p.get(k)) for k in ("critic", "dmd", "regression")}),
    ]  # fmt: skip
    panels = [panel for panel in panels if panel[1]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (title, points, keys) in zip(axes[0], panels, strict=True):
        for label, value in keys.items():
            xy = [(p["step"], value(p)) for p in points if value(p) is not None]
            if xy:
                ax.plot(*zip(*xy, strict=True), label=label)
        ax.set_yscale("log")
        ax.set(title=title, xlabel="step")
        ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
