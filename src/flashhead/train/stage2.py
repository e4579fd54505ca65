"""Stage-2 training (Oracle-Guided Bidirectional Distillation, SPEC 9.2): the Stage-1 teacher distilled into a
4-step streaming student, with the same engineering as Stage 1 (flashhead.train.trainer).

    python -m flashhead.train stage2 configs/stage2_tiny_cpu.yaml                     # one process
    torchrun --nproc_per_node 8 -m flashhead.train stage2 configs/stage2_lite.yaml    # FSDP2 (or parallel: ddp)

Three copies of the teacher's DiT: the frozen teacher (real score, bf16 on CUDA), the student (generator)
and the fake score (critic), both trained in float32 under bf16 autocast, each with its own AdamW. One
iteration = one micro-batch of K-chunk windows per process: the student rolls out on its own history
(flashhead.train.distill), the fake score takes a step every iteration and the student every
`critic_ratio`-th one [PAPER 1:5]. Rank 0 logs, renders validation rollouts with the EMA student through
the real pipeline (4 distilled steps), and writes resumable checkpoints; the end exports a pipeline folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from flashhead.atomic import atomic_path, make_folder
from flashhead.errors import CheckpointError, ConfigError
from flashhead.models.dit import FlashHeadDiT
from flashhead.models.loading import read_json
from flashhead.train.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from flashhead.train.config import Stage2Config
from flashhead.train.data import SampleSpec, index_clips
from flashhead.train.distill import Distiller, rollout_choice, sample_generators
from flashhead.train.ema import EMA
from flashhead.train.rollout_data import RolloutDataset, RolloutSpec, encode_rollouts
from flashhead.train.throughput import ThroughputMeter, format_rates, log_rates, loss_trend, sample_cost, write_json
from flashhead.train.trainer import (
    DistInfo,
    TrainResult,
    _all_mean,
    _autocast,
    _barrier,
    _dit_folder,
    _tensorboard,
    _val_videos,
    budget_spent,
    build_frozen,
    eval_dit,
    init_distributed,
    make_optimizer,
    run_summary,
    wrap_model,
)

logger = logging.getLogger(__name__)

LOGGED = ("critic", "dmd", "regression", "generator", "dmd_grad", "critic_grad_norm", "generator_grad_norm")


# ---------------------------------------------------------------------------------------------------
# Networks


def _is_pipeline(path: str | None) -> bool:
    return bool(path) and (Path(path) / "model_index.json").is_file()


def load_teacher_dit(cfg: Stage2Config) -> FlashHeadDiT:
    if not cfg.teacher.path:
        raise ConfigError("teacher.path: set the Stage-1 teacher (a pipeline folder or a DiT folder)")
    return FlashHeadDiT.from_pretrained(_dit_folder(cfg.teacher.path)).float()


def trainable_copy(dit: FlashHeadDiT, init_from: str | None = None) -> FlashHeadDiT:
    """A float32 trainable DiT with `dit`'s architecture and weights (or those of `init_from`)."""
    model = FlashHeadDiT.from_pretrained(_dit_folder(init_from)).float() if init_from else None
    if model is None:
        model = FlashHeadDiT.from_config(dict(dit.config))
        model.load_state_dict(dit.state_dict())
    model.train().requires_grad_(True)
    for name, p in model.named_parameters():  # never used in forward: frozen, so DDP sees no unused grads
        if name.startswith(FlashHeadDiT._unused_prefixes):
            p.requires_grad_(False)
    return model


def build_frozen_stage2(cfg: Stage2Config, temporal_stride: int) -> tuple[Any, Any]:
    """(VAE, audio encoder) on CPU in float32: the teacher pipeline folder's own unless `vae` names others."""
    v = cfg.vae
    folder = v.pipeline or (cfg.teacher.path if not (v.path or v.config) and _is_pipeline(cfg.teacher.path) else None)
    if folder and not cfg.audio.config:
        from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline

        pipe = FlashHeadPipeline.from_pretrained(folder, device="cpu", torch_dtype=torch.float32)
        return pipe.vae, pipe.audio_encoder
    if folder:  # the folder's VAE with a random (configured) audio encoder: smoke runs
        cfg = dataclasses.replace(cfg, vae=dataclasses.replace(v, pipeline=folder))
    return build_frozen(cfg, temporal_stride)  # type: ignore[arg-type]  (reads cfg.vae / cfg.audio only)


def chunk_spec(cfg: Stage2Config, dit: FlashHeadDiT, vae: Any) -> SampleSpec:
    if tuple(dit.config.vae_stride) != tuple(vae.stride) or dit.config.out_dim != vae.latent_channels:
        raise ConfigError(
            f"teacher DiT (vae_stride {tuple(dit.config.vae_stride)}) does not match the VAE {vae.stride}"
        )
    d = cfg.data
    return SampleSpec(
        height=d.height, width=d.width, vae_stride=tuple(vae.stride), frame_num=d.frame_num, fps=d.fps,
        audio_window=dit.config.audio_window, motion_latent_frames=cfg.distill.motion_latent_frames,
        motion_probs=(1.0, 0.0), audio_drop_prob=0.0,
    )  # fmt: skip


def student_generation_config(cfg: Stage2Config) -> Any:
    """How the student samples: the teacher folder's settings with the distilled 4-step sampler, no CFG."""
    from flashhead.pipeline.config import GenerationConfig

    base = GenerationConfig()
    if _is_pipeline(cfg.teacher.path) and (Path(cfg.teacher.path) / "generation_config.json").is_file():
        base = GenerationConfig.from_dict(read_json(Path(cfg.teacher.path) / "generation_config.json"))
    d, ds = cfg.data, cfg.distill
    return base.replace(
        height=d.height, width=d.width, fps=d.fps, frame_num=d.frame_num, motion_latent_frames=ds.motion_latent_frames,
        shift=ds.shift, num_inference_steps=ds.num_inference_steps, guidance_scale=1.0, sampler="distilled",
        color_correction_strength=1.0 if ds.color_correction else 0.0,
    )  # fmt: skip


def _shard_frozen(dit: FlashHeadDiT) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in dit.blocks:
        fully_shard(block)
    fully_shard(dit)


@dataclass
class Stage2Parts:
    """Everything one iteration touches."""

    distiller: Distiller
    student: FlashHeadDiT  # the (possibly FSDP-sharded) module whose parameters the optimizer holds
    critic: FlashHeadDiT
    g_optim: torch.optim.AdamW
    c_optim: torch.optim.AdamW
    g_sched: Any
    c_sched: Any
    ema: EMA


def assemble(cfg: Stage2Config, info: DistInfo, teacher: FlashHeadDiT, student: FlashHeadDiT,
             critic: FlashHeadDiT, vae: Any, spec: RolloutSpec) -> Stage2Parts:  # fmt: skip
    """Move, wrap (DDP / FSDP2) and give optimizers to the three networks."""
    autocast, frozen_dtype = _autocast(cfg, info.device)  # type: ignore[arg-type]
    teacher.eval().requires_grad_(False)
    torch.nn.Module.to(teacher, device=info.device, dtype=frozen_dtype)
    if cfg.teacher.gradient_checkpointing:
        student.enable_gradient_checkpointing()
        critic.enable_gradient_checkpointing()
    student.to(info.device)
    critic.to(info.device)
    g_model = wrap_model(student, cfg, info)  # type: ignore[arg-type]  (reads cfg.parallel only)
    c_model = wrap_model(critic, cfg, info)  # type: ignore[arg-type]
    if info.distributed and cfg.parallel == "fsdp":
        _shard_frozen(teacher)
    ema = EMA(student, cfg.ema_decay)
    g_optim, c_optim = make_optimizer(student, cfg.generator_optim), make_optimizer(critic, cfg.critic_optim)

    def warmup(n: int):
        return lambda s: min(1.0, (s + 1) / n) if n else 1.0

    g_sched = torch.optim.lr_scheduler.LambdaLR(g_optim, warmup(cfg.generator_optim.warmup_steps))
    c_sched = torch.optim.lr_scheduler.LambdaLR(c_optim, warmup(cfg.critic_optim.warmup_steps))
    distiller = Distiller(g_model, student, c_model, critic, teacher, vae, spec, cfg.distill, autocast)
    return Stage2Parts(distiller, student, critic, g_optim, c_optim, g_sched, c_sched, ema)


# ---------------------------------------------------------------------------------------------------
# One iteration


def _clip(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def iteration(parts: Stage2Parts, inputs: Any, step: int, cfg: Stage2Config) -> dict[str, Any]:
    """One Stage-2 iteration (see flashhead.train.distill): the fake score's update, and the student's
    when step % critic_ratio == 0. Returns the batch means of the terms computed."""
    d, ds = parts.distiller, cfg.distill
    k, exit_step = rollout_choice(cfg.seed, step, ds.num_chunks, ds.num_inference_steps)
    generator_step = step % ds.critic_ratio == 0
    gens = sample_generators(inputs.seeds, step)
    chunk = d.rollout(inputs, k, exit_step, gens, grad=generator_step)
    out: dict[str, Any] = {"k": k, "exit_step": exit_step}
    if generator_step:
        terms = d.generator_losses(inputs, chunk, d.truth(inputs, k - 1), k - 1, gens)
        loss = ds.dmd_weight * terms["dmd"].mean() + ds.regression_weight * terms["regression"].mean()
        loss.backward()
        out["generator_grad_norm"] = float(_clip(parts.student, cfg.generator_optim.grad_clip))
        parts.g_optim.step()
        parts.g_sched.step()
        parts.g_optim.zero_grad(set_to_none=True)
        parts.ema.update(step // ds.critic_ratio)
        out |= {"dmd": terms["dmd"].mean().detach(), "regression": terms["regression"].mean().detach(),
                "dmd_grad": terms["dmd_grad"].mean(), "generator": loss.detach()}  # fmt: skip
    critic = d.critic_loss(inputs, chunk, k - 1, gens).mean()
    critic.backward()
    out["critic_grad_norm"] = float(_clip(parts.critic, cfg.critic_optim.grad_clip))
    parts.c_optim.step()
    parts.c_sched.step()
    parts.c_optim.zero_grad(set_to_none=True)
    out["critic"] = critic.detach()
    return out


def iteration_passes(k: int, exit_step: int, generator_step: bool, ds: Any) -> tuple[int, int]:
    """DiT (forward, backward) passes per sample of one `iteration` (for tokens/s and MFU): the rollout's
    4-step chunks and exit step, then on a generator step its backward, the fake score on the DMD input and
    the teacher (twice with audio CFG), and always the fake score's forward and backward."""
    forwards = (k - 1) * ds.num_inference_steps + exit_step + 1 + 1
    backwards = 1
    if generator_step:
        forwards += 1 + (1 if ds.guidance_scale == 1.0 else 2)
        backwards += 1
    return forwards, backwards


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def training_state(step: int, parts: Stage2Parts, info: DistInfo) -> dict[str, Any]:
    """Full tensors on CPU (gathered under FSDP2: every process must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    g_model, g_optim = get_state_dict(parts.student, parts.g_optim, options=options)
    c_model, c_optim = get_state_dict(parts.critic, parts.c_optim, options=options)
    rngs: list[Any] = [rng_state()]
    if info.distributed:
        import torch.distributed as dist

        rngs = [None] * info.world_size
        dist.all_gather_object(rngs, rng_state())
    return {
        "step": step, "student": g_model, "critic": c_model, "ema": parts.ema.full_state_dict(),
        "g_optim": g_optim, "c_optim": c_optim, "g_sched": parts.g_sched.state_dict(),
        "c_sched": parts.c_sched.state_dict(), "rng": rngs, "world_size": info.world_size,
    }  # fmt: skip


def restore_training_state(ckpt: dict[str, Any], parts: Stage2Parts, info: DistInfo) -> tuple[int, int]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_state_dict(parts.student, parts.g_optim, model_state_dict=ckpt["student"],
                   optim_state_dict=ckpt["g_optim"], options=options)  # fmt: skip
    set_state_dict(parts.critic, parts.c_optim, model_state_dict=ckpt["critic"],
                   optim_state_dict=ckpt["c_optim"], options=options)  # fmt: skip
    parts.ema.load_full_state_dict(ckpt["ema"])
    parts.g_sched.load_state_dict(ckpt["g_sched"])
    parts.c_sched.load_state_dict(ckpt["c_sched"])
    if len(ckpt["rng"]) == info.world_size:
        set_rng_state(ckpt["rng"][info.rank])
    return ckpt["step"], ckpt["data"]["position"]


# ---------------------------------------------------------------------------------------------------
# The loop


def train_stage2(cfg: Stage2Config, resume: bool | str | Path = False) -> TrainResult:
    """Run (or continue) Stage-2 distillation; `resume` = True (the run's latest checkpoint) or a path."""
    info = init_distributed(cfg.cpu_threads)
    run_dir = make_folder(cfg.output_dir, "output_dir") if info.is_main else Path(cfg.output_dir)
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run: pass --resume to continue it, or another output_dir")

    teacher = load_teacher_dit(cfg)
    student = trainable_copy(teacher, cfg.teacher.student_init)
    critic = trainable_copy(teacher)
    vae, audio_encoder = build_frozen_stage2(cfg, teacher.config.vae_stride[0])
    _, frozen_dtype = _autocast(cfg, info.device)  # type: ignore[arg-type]
    vae.to(info.device, frozen_dtype)
    audio_encoder.to(info.device)
    spec = RolloutSpec(chunk_spec(cfg, teacher, vae), cfg.distill.num_chunks)
    dit_config = dict(teacher.config)
    parts = assemble(cfg, info, teacher, student, critic, vae, spec)

    step, position = 0, 0
    path = (latest_checkpoint(run_dir) if resume is True else Path(resume)) if resume else None
    if path is not None:
        step, position = restore_training_state(load_checkpoint(path), parts, info)
        logger.info("resumed from %s at step %d (sample %d)", path, step, position)

    clips = index_clips(cfg.data.roots, cfg.data.split, spec.chunk)
    dataset = RolloutDataset(
        clips, spec, seed=cfg.seed, micro_batch_size=cfg.data.micro_batch_size, rank=info.rank,
        world_size=info.world_size, start_position=position, windows_per_clip=cfg.data.windows_per_clip,
    )  # fmt: skip
    workers = cfg.data.num_workers
    batches = iter(DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None))
    samples_per_step = cfg.data.micro_batch_size * info.world_size

    writer = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
        writer = _tensorboard(run_dir / "tb") if cfg.log.tensorboard else None
        logger.info(
            "stage 2: %d clips of >= %d frames, K=%d, batch %d (%d x %d processes), %d iterations, device %s",
            len(dataset.clips), spec.frames, spec.num_chunks, samples_per_step, cfg.data.micro_batch_size,
            info.world_size, cfg.distill.total_steps, info.device,
        )  # fmt: skip
    history: list[dict[str, Any]] = []
    meter = ThroughputMeter.for_device(info.device, info.world_size)
    cost = None
    recompute = cfg.teacher.gradient_checkpointing
    total = cfg.distill.total_steps
    t_start, out_of_time = time.perf_counter(), False
    while step < total and not out_of_time:
        step_position = position
        inputs = encode_rollouts(next(batches), vae, audio_encoder, spec)
        cost = cost or sample_cost(dit_config, inputs.y.shape[2:])
        out = iteration(parts, inputs, step, cfg)
        forwards, backwards = iteration_passes(out["k"], out["exit_step"], "dmd" in out, cfg.distill)
        batch = len(inputs.seeds)
        meter.add(cost, batch * forwards, batch * backwards, batch * backwards * recompute)
        step += 1
        position += samples_per_step
        keys = [key for key in LOGGED if key in out]
        means = _all_mean(torch.stack([torch.as_tensor(out[key], dtype=torch.float32, device=info.device)
                                       for key in keys]), info)  # fmt: skip
        out_of_time = budget_spent(t_start, cfg.distill.max_minutes, info)
        if out_of_time and info.is_main:
            logger.info("step %d: the %.1f-minute budget is spent; stopping", step, cfg.distill.max_minutes)
        last = step == total or out_of_time
        if step % cfg.log.interval == 0 or last:
            rates = meter.report()  # collective (memory of every GPU)
            point = {"step": step, **{key: float(v) for key, v in zip(keys, means, strict=True)},
                     "k": out["k"], "exit_step": out["exit_step"], "lr": parts.g_sched.get_last_lr()[0],
                     "steps_per_s": 1 / rates["step_time_s"], "position": step_position, **rates}  # fmt: skip
            if info.is_main:
                history.append(point)
                _log_point(point, writer, run_dir / "metrics.jsonl")
                summary = {**run_summary(history, cfg, info, parts.student, cost),
                           "loss": loss_trend([h["critic"] for h in history])}  # fmt: skip
                write_json(run_dir / "summary.json", summary)
        if cfg.val.interval and step % cfg.val.interval == 0:
            validate(
                parts.ema.full_state_dict(), dit_config, vae, audio_encoder, spec, cfg, step, info, writer, run_dir
            )
        if cfg.log.checkpoint_interval and (step % cfg.log.checkpoint_interval == 0 or last):
            state = training_state(step, parts, info)
            if info.is_main:
                epoch, index = dataset.position(position)
                state["data"] = {"position": position, "epoch": epoch, "index": index}
                state |= {"dit_config": dit_config, "config": cfg.to_dict()}
                logger.info(
                    "step %d: checkpoint %s", step, save_checkpoint(run_dir, step, state, cfg.log.keep_checkpoints)
                )
            _barrier(info)
    del batches

    export_dir = None
    if cfg.export_at_end:
        ema_state = parts.ema.full_state_dict()
        if info.is_main:
            export_dir = write_stage2_export(ema_state, dit_config, cfg, run_dir / "export")
        _barrier(info)
    if writer is not None:
        writer.close()
    if info.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()
    return TrainResult(run_dir, step, history, export_dir)


def _log_point(point: dict[str, Any], writer: Any, metrics_file: Path) -> None:
    terms = "  ".join(f"{k} {point[k]:.4f}" for k in LOGGED if k in point)
    logger.info("step %d  %s  (k=%d exit=%d)  %s", point["step"], terms, point["k"], point["exit_step"],
                format_rates(point))  # fmt: skip
    with open(metrics_file, "a") as f:
        f.write(json.dumps(point) + "\n")
    if writer is not None:
        for key in (*LOGGED, "lr", "steps_per_s", "k"):
            if key in point:
                writer.add_scalar(f"train/{key}", point[key], point["step"])
        log_rates(writer, point, point["step"])


@torch.no_grad()
def validate(ema_state, dit_config, vae, audio_encoder, spec: RolloutSpec, cfg: Stage2Config, step: int,
             info: DistInfo, writer: Any, run_dir: Path) -> None:  # fmt: skip
    """Rank 0: val clips rendered by the EMA student through the real pipeline (4 distilled steps) to MP4."""
    if info.is_main:
        _, dtype = _autocast(cfg, info.device)  # type: ignore[arg-type]
        clips = index_clips(cfg.data.roots, cfg.data.val_split, spec.chunk)[: cfg.val.num_clips]
        if clips:
            dit = eval_dit(ema_state, dit_config, info.device, dtype)
            _val_videos(dit, clips, vae, audio_encoder, cfg, step, writer, run_dir,
                        gen_config=student_generation_config(cfg), label="stage2-ema")  # fmt: skip
        else:
            logger.warning("no %r clips: validation skipped", cfg.data.val_split)
    _barrier(info)


# ---------------------------------------------------------------------------------------------------
# Export


def write_stage2_export(
    ema_state: dict[str, torch.Tensor], dit_config: Any, cfg: Stage2Config, out: str | Path
) -> Path:
    """A pipeline folder with the EMA student and the distilled sampling settings. A teacher pipeline folder
    is copied (its VAE and audio encoder, whatever kind) with dit/ and generation_config.json replaced."""
    out = Path(out)
    dit = eval_dit(ema_state, dit_config, torch.device("cpu"), torch.float32)
    gen = student_generation_config(cfg)
    name = f"flashhead-stage2 ({Path(cfg.output_dir).name})"
    with atomic_path(out) as tmp:
        _write_student_folder(tmp, dit, gen, name, cfg)
    logger.info("exported the EMA student to %s", out)
    return out


def _write_student_folder(tmp: Path, dit: Any, gen: Any, name: str, cfg: Stage2Config) -> None:
    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline

    if _is_pipeline(cfg.teacher.path) and not (cfg.vae.path or cfg.vae.config or cfg.audio.config):
        shutil.copytree(cfg.teacher.path, tmp, ignore=shutil.ignore_patterns("dit"))
        dit.save_pretrained(tmp / "dit")
        (tmp / "generation_config.json").write_text(json.dumps(gen.to_dict(), indent=2))
        index = read_json(tmp / "model_index.json") | {"name": name}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    else:
        vae, audio_encoder = build_frozen_stage2(cfg, dit.config.vae_stride[0])
        pipe = FlashHeadPipeline(dit, vae, audio_encoder, config=gen)
        pipe.name = name
        pipe.save_pretrained(tmp)


def export_stage2_run(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> Path:
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"{run_dir}: no checkpoint to export (checkpoints/latest is missing)")
    ckpt = load_checkpoint(path)
    return write_stage2_export(ckpt["ema"], ckpt["dit_config"], Stage2Config.from_dict(ckpt["config"]), out)
