"""Stage-1 training (Streaming-Aware Spatiotemporal Pre-training, SPEC 9.1): one loop from one CPU process
to `torchrun` on many GPUs.

    python -m flashhead.train stage1 configs/stage1_tiny_cpu.yaml                    # one process
    torchrun --nproc_per_node 8 -m flashhead.train stage1 configs/stage1_lite.yaml   # DDP (or parallel: fsdp)

Distributed mode is switched on by the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on
CUDA, gloo on CPU. Each optimizer step runs grad_accum_steps micro-steps of micro_batch_size samples per
process (global batch = micro batch x processes x accumulation); for every micro-step:

    raw samples (data workers)  -> frozen VAE + wav2vec on this device -> x0, y, audio context
    sigma, noise from each sample's seed -> x_sigma with clean motion frames -> DiT -> losses -> backward

then gradient clipping, AdamW, the LR schedule, and the EMA update. Rank 0 logs, validates with the EMA
weights through the real pipeline, and writes checkpoints (all ranks take part in the collectives).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from flashhead.atomic import atomic_path, make_folder
from flashhead.errors import CheckpointError, ConfigError
from flashhead.models.dit import FlashHeadDiT, official_config
from flashhead.models.loading import read_json
from flashhead.train.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from flashhead.train.config import Stage1Config
from flashhead.train.data import SampleSpec, Stage1Dataset, Stage1Inputs, encode_samples, index_clips
from flashhead.train.ema import EMA
from flashhead.train.losses import NoiseSampling, noisy_input, stage1_losses
from flashhead.train.throughput import (
    MFU_CONVENTION,
    SampleCost,
    ThroughputMeter,
    device_peak_flops,
    format_rates,
    log_rates,
    loss_trend,
    sample_cost,
    summarize,
    write_json,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Processes and devices


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this call created the process group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(cpu_threads: int | None = None) -> DistInfo:
    """One process, or one of torchrun's (RANK/WORLD_SIZE/LOCAL_RANK set): NCCL on CUDA, gloo on CPU."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        info = DistInfo(device=torch.device("cuda" if cuda else "cpu"))
    else:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        info = DistInfo(rank, local, world, device, owns_group)
    if info.device.type == "cpu":
        local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        threads = cpu_threads or (max(1, (os.cpu_count() or 1) // local_procs) if local_procs > 1 else None)
        if threads:
            torch.set_num_threads(threads)
    return info


def _all_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        values = values.clone()
        dist.all_reduce(values)
        values /= info.world_size
    return values


def budget_spent(t_start: float, max_minutes: float | None, info: DistInfo) -> bool:
    """Whether a wall-clock budget is spent. Every process must stop at the same step: rank 0's clock decides."""
    if max_minutes is None:
        return False
    spent = time.perf_counter() - t_start > max_minutes * 60
    if not info.distributed:
        return spent  # no device tensor: reading one back would make the host wait for the GPU every step
    flag = torch.tensor(float(spent), device=info.device)
    dist.broadcast(flag, 0)
    return bool(flag.item())


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------
# Networks


def resolve_dit_config(cfg: Stage1Config) -> dict[str, Any]:
    """The DiT architecture: the `init_from` checkpoint's, else `model.config`, else the official variant."""
    if cfg.model.init_from:
        folder = _dit_folder(cfg.model.init_from)
        return {k: v for k, v in read_json(folder / "config.json").items() if not k.startswith("_")}
    return dict(cfg.model.config) if cfg.model.config else official_config(cfg.model.variant)


def _dit_folder(path: str) -> Path:
    folder = Path(path)
    return folder / "dit" if (folder / "model_index.json").is_file() else folder


def build_dit(cfg: Stage1Config) -> FlashHeadDiT:
    """The trainable DiT in float32: from `init_from`, or fresh (seeded) and optionally from Wan2.1 weights."""
    m = cfg.model
    if m.init_from:
        dit = FlashHeadDiT.from_pretrained(_dit_folder(m.init_from)).float()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # every process builds the same initial weights
            dit = FlashHeadDiT.from_config(resolve_dit_config(cfg))
        if m.init_from_wan:
            from flashhead.train.wan_init import init_from_wan

            logger.info("init from Wan2.1: %s", init_from_wan(dit, m.init_from_wan).summary())
    dit.train().requires_grad_(True)
    # Vestigial official modules (never called in forward): frozen, so DDP sees no unused gradients.
    for name, p in dit.named_parameters():
        if name.startswith(FlashHeadDiT._unused_prefixes):
            p.requires_grad_(False)
    return dit


# Random-weight frozen networks (smoke runs) always come from these seeds, whatever the run's seed, so that
# rebuilding them (export) or precomputed latents (flashhead.train.data.precompute_extras) stay valid.
RANDOM_VAE_SEED, RANDOM_WAV2VEC_SEED = 1, 2


def build_frozen(cfg: Stage1Config, temporal_stride: int) -> tuple[Any, Any]:
    """(VAE, wav2vec encoder) on CPU in float32, frozen (random-config ones from fixed seeds)."""
    from flashhead.models.audio import Wav2VecEncoder
    from flashhead.models.vae import LTXVideoVAE, WanVideoVAE

    v, a = cfg.vae, cfg.audio
    kind = v.kind or ("ltx" if temporal_stride == 8 else "wan")
    if v.pipeline:
        folder = Path(v.pipeline)
        index = read_json(folder / "model_index.json")
        vae = _load_vae(index.get("vae", kind), folder / "vae", index.get("vae_sample_posterior", True))
        if a.config or a.kind == "mel":
            encoder = _audio_from_section(a)
        elif index.get("audio_encoder") == "mel":
            from flashhead.models.mel_encoder import MelAudioEncoder

            encoder = MelAudioEncoder.from_pretrained(folder / "audio_encoder")
        else:
            encoder = Wav2VecEncoder.from_pretrained(folder / "audio_encoder")
        return vae, encoder
    if v.path:
        vae = _load_vae(kind, v.path, v.sample_posterior)
    elif v.config:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_VAE_SEED)
            if kind == "ltx":
                from diffusers import AutoencoderKLLTXVideo

                from flashhead.models.vae.ltx import ltx_native_config_to_diffusers

                model = AutoencoderKLLTXVideo.from_config(ltx_native_config_to_diffusers(v.config))
                vae = LTXVideoVAE(model, sample_posterior=v.sample_posterior)
            else:
                from diffusers import AutoencoderKLWan

                from flashhead.models.vae.wan import wan_config_to_diffusers

                vae = WanVideoVAE(AutoencoderKLWan(**wan_config_to_diffusers(v.config)))
    else:
        raise ConfigError("vae: set one of pipeline, path or config")
    return vae, _audio_from_section(a)


def _audio_from_section(a: Any) -> Any:
    from flashhead.models.audio import Wav2VecEncoder

    if a.kind == "mel":
        from flashhead.models.mel_encoder import MelAudioEncoder, MelConfig

        try:
            return MelAudioEncoder(MelConfig(**(a.config or {})))
        except TypeError as e:
            raise ConfigError(f"audio.config: {e}") from None
    if a.config:
        return _random_wav2vec(a.config)
    if not a.path:
        raise ConfigError("audio: set path (a wav2vec2 folder or hub id) or config")
    return Wav2VecEncoder.from_pretrained(a.path)


def _load_vae(kind: str, path: str | Path, sample_posterior: bool = True) -> Any:
    from flashhead.models.vae import LTXVideoVAE, WanVideoVAE

    if kind == "ltx":
        return LTXVideoVAE.from_pretrained(path, strict_config=False, sample_posterior=sample_posterior)
    if kind == "wan":
        return WanVideoVAE.from_pretrained(path)
    raise ConfigError(f"vae.kind must be ltx or wan, got {kind!r}")


def _random_wav2vec(config: dict[str, Any]) -> Any:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from flashhead.models.audio import Wav2VecEncoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WAV2VEC_SEED)
        return Wav2VecEncoder(Wav2Vec2Model(Wav2Vec2Config(**config)))


def sample_spec(cfg: Stage1Config, dit_config: Any, vae: Any = None) -> SampleSpec:
    """The sample geometry of `cfg` for a DiT config (and `vae`, checked against it; None: the DiT's stride)."""
    c = dict(dit_config)
    audio_window = c.get("audio_window", 5)
    stride = tuple(c["vae_stride"]) if vae is None else tuple(vae.stride)
    if vae is not None and (stride != tuple(c["vae_stride"]) or c["out_dim"] != vae.latent_channels):
        raise ConfigError(
            f"DiT (vae_stride {tuple(c['vae_stride'])}, out_dim {c['out_dim']}) does not match the "
            f"VAE (stride {stride}, {vae.latent_channels} channels)"
        )
    d, lo = cfg.data, cfg.loss
    patch = c["patch_size"]
    if (d.height // stride[1]) % patch[1] or (d.width // stride[2]) % patch[2]:
        raise ConfigError(f"the latent grid of {d.height}x{d.width} is not divisible by the patch size {patch}")
    return SampleSpec(
        height=d.height, width=d.width, vae_stride=stride, frame_num=d.frame_num, fps=d.fps,
        audio_window=audio_window, motion_latent_frames=lo.motion_latent_frames,
        motion_probs=tuple(lo.motion_probs), audio_drop_prob=lo.audio_drop_prob, reference=d.reference,
        face_margin=d.face_margin, default_face_box=tuple(d.default_face_box),
    )  # fmt: skip


def wrap_model(dit: FlashHeadDiT, cfg: Stage1Config, info: DistInfo) -> torch.nn.Module:
    """Plain module, DDP, or FSDP2 (`fully_shard` per block, then the root; `dit` is sharded in place).

    Under FSDP2 with bf16 the all-gathered weights are bf16 (half the traffic and gather buffers of fp32;
    autocast would cast them per op anyway) and gradients are reduced in fp32 into the fp32 shards that
    AdamW and the EMA keep.
    """
    if not info.distributed:
        return dit
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        _, dtype = _autocast(cfg, info.device)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in dit.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(dit, mp_policy=policy)
        return dit
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(dit, device_ids=[info.local_rank] if info.device.type == "cuda" else None)


def set_grad_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)


def make_optimizer(dit: FlashHeadDiT, o: Any) -> torch.optim.AdamW:
    """AdamW with the settings of an optim section (lr, betas, eps, weight_decay); weight decay on weight
    matrices only (not on biases, norm weights or adaLN modulation)."""
    params = [(n, p) for n, p in dit.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "modulation" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "modulation" not in n)]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def lr_factor(step: int, cfg: Stage1Config) -> float:
    """Linear warm-up from lr / warmup_steps to lr, then constant or cosine down to min_lr_ratio x lr."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, o.total_steps - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _phase(name: str) -> torch.profiler.record_function:
    return torch.profiler.record_function(f"stage1.{name}")  # a no-op unless a profiler is running


def diffusion_noise(inputs: Stage1Inputs, cfg: Stage1Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma (B,), noise like x0), each sample's from its own seed: independent of batch layout and device.
    Drawn ahead by the data workers (a latent cache's batches), else here."""
    if inputs.noise is not None:
        return inputs.sigma, inputs.noise
    sigma, noise = NoiseSampling.of(cfg.loss).draw(inputs.seeds, inputs.x0.shape[1:])
    return sigma.to(inputs.x0.device), noise.to(inputs.x0.device)


def compute_losses(model: torch.nn.Module, inputs: Stage1Inputs, cfg: Stage1Config, autocast: Any):
    """Forward one micro-batch and return its per-sample LossTerms."""
    with _phase("noise"):
        sigma, noise = diffusion_noise(inputs, cfg)
        x_t = noisy_input(inputs.x0, noise, sigma, inputs.n_motion)
    with autocast:
        v_pred = model(x_t, sigma * 1000, inputs.context, inputs.y)
    lo = cfg.loss
    return stage1_losses(
        v_pred.float(), x_t, inputs.x0, noise, sigma, inputs.n_motion, inputs.face_mask,
        flow_weight=lo.flow_weight, face_weight=lo.face_weight, temporal_weight=lo.temporal_weight,
    )  # fmt: skip


def _autocast(cfg: Stage1Config, device: torch.device) -> tuple[Any, torch.dtype]:
    """(autocast context, dtype of the frozen networks and of evaluation)."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16), torch.bfloat16
    if device.type == "cuda":  # float32 on a GPU: TF32 tensor cores (10-bit mantissa products, fp32 sums)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed sample shapes: let cuDNN pick the fastest 3-D convolutions
    return contextlib.nullcontext(), torch.float32


# ---------------------------------------------------------------------------------------------------
# Checkpoint contents


def training_state(step, dit, ema, optimizer, scheduler, info: DistInfo) -> dict[str, Any]:
    """Everything needed to continue bit-exactly (full tensors on CPU; on rank 0 only under FSDP). Every
    process must call it: gathering sharded weights and the per-process RNG states are collectives."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(dit, optimizer, options=options)
    rngs: list[Any] = [rng_state()]
    if info.distributed:
        rngs = [None] * info.world_size
        dist.all_gather_object(rngs, rng_state())
    return {
        "step": step, "model": model_state, "ema": ema.full_state_dict(), "optimizer": optim_state,
        "scheduler": scheduler.state_dict(), "rng": rngs, "world_size": info.world_size,
    }  # fmt: skip


def restore_training_state(ckpt: dict[str, Any], dit, ema, optimizer, scheduler, info: DistInfo) -> tuple[int, int]:
    """Load a checkpoint into the (already wrapped) model and friends; returns (step, sample position)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        dit, optimizer, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
        options=StateDictOptions(full_state_dict=True),
    )  # fmt: skip
    ema.load_full_state_dict(ckpt["ema"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if len(ckpt["rng"]) == info.world_size:
        set_rng_state(ckpt["rng"][info.rank])
    else:
        logger.warning("checkpoint of %d processes, now %d: RNG states not restored", len(ckpt["rng"]), info.world_size)
    return ckpt["step"], ckpt["data"]["position"]


# ---------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    history: list[dict[str, Any]]  # the logged points (rank 0; empty elsewhere)
    export_dir: Path | None = None


def train(
    cfg: Stage1Config,
    resume: bool | str | Path = False,
    inputs: Iterator[Stage1Inputs] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainResult:
    """Run (or continue) Stage-1 training as configured; `resume` = True (the run's latest checkpoint) or a path.

    `inputs`: this process's micro-batches, ready for the DiT (e.g. flashhead.train.synthetic), instead of
    the clips of `cfg.data`. No VAE or audio encoder is built then, so validation and export must be off.
    `on_step(step)` is called after every optimizer step (a profiler's `step`, a benchmark's clock). The
    phases of a step are marked as `stage1.*` profiler ranges (benchmarks/stage1_step_profile.py).
    """
    if inputs is not None and (cfg.val.interval or cfg.export_at_end):
        raise ConfigError("training on given inputs has no VAE: set val.interval=0 and export_at_end=false")
    info = init_distributed(cfg.cpu_threads)
    run_dir = make_folder(cfg.output_dir, "output_dir") if info.is_main else Path(cfg.output_dir)
    autocast, frozen_dtype = _autocast(cfg, info.device)

    # -- networks, optimizer, schedule
    dit = build_dit(cfg)
    vae = audio_encoder = None
    if inputs is None:
        vae, audio_encoder = build_frozen(cfg, dit.config.vae_stride[0])
        vae.to(info.device, frozen_dtype)
        audio_encoder.to(info.device)  # wav2vec stays float32, as at inference
    spec = sample_spec(cfg, dit.config, vae)
    if cfg.model.gradient_checkpointing:
        dit.enable_gradient_checkpointing()
    dit.to(info.device)
    if cfg.model.compile:
        dit.compile()  # in place: parameter names, checkpoints and the EMA stay those of the eager model
    model = wrap_model(dit, cfg, info)
    ema = EMA(dit, cfg.ema_decay)
    optimizer = make_optimizer(dit, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    accum = cfg.optim.grad_accum_steps
    samples_per_micro = cfg.data.micro_batch_size * info.world_size

    # -- resume
    step, position = 0, 0
    path = (latest_checkpoint(run_dir) if resume is True else Path(resume)) if resume else None
    if not resume and latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run: pass --resume to continue it, or another output_dir")
    if resume is True and path is None:
        logger.info("no checkpoint in %s yet; starting from scratch", run_dir)
    if path is not None:
        step, position = restore_training_state(load_checkpoint(path), dit, ema, optimizer, scheduler, info)
        logger.info("resumed from %s at step %d (sample %d)", path, step, position)

    # -- data
    if inputs is None:
        stream = dict(
            seed=cfg.seed, micro_batch_size=cfg.data.micro_batch_size, rank=info.rank, world_size=info.world_size,
            start_position=position, windows_per_clip=cfg.data.windows_per_clip,
            source_weights=cfg.data.source_weights or None,
        )  # fmt: skip
        if cfg.data.cache:  # precomputed latents, references, audio features and masks: no decoding or encoding
            from flashhead.train.latent_cache import CachedStage1Dataset, LatentCache

            cache = LatentCache(cfg.data.cache)
            cache.check(spec, vae, audio_encoder)
            # the workers hand over model inputs with their noise drawn, in pinned memory on CUDA
            dataset = CachedStage1Dataset(cache, spec, NoiseSampling.of(cfg.loss), **stream)
            train_clips = dataset.clips
        else:
            train_clips = index_clips(cfg.data.roots, cfg.data.split, spec)
            dataset = Stage1Dataset(train_clips, spec, **stream)
        workers, pin = cfg.data.num_workers, bool(cfg.data.cache) and info.device.type == "cuda"
        loader = DataLoader(
            dataset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None, pin_memory=pin
        )
        batches = iter(loader)
        source = f"{len(train_clips)} train clips"

        def next_inputs() -> Stage1Inputs:
            batch = next(batches)
            if isinstance(batch, Stage1Inputs):
                return batch.to(info.device)
            return encode_samples(batch, vae, audio_encoder, spec)

        def stream_position(p: int) -> tuple[int | None, int | None]:
            return dataset.position(p)
    else:
        source = "given inputs"

        def next_inputs() -> Stage1Inputs:
            return next(inputs)

        def stream_position(p: int) -> tuple[int | None, int | None]:
            return None, None

    writer = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
        if cfg.log.tensorboard:
            writer = _tensorboard(run_dir / "tb")
        logger.info(
            "stage 1: %s, global batch %d (%d x %d processes x %d accumulation), %d steps, %s, device %s",
            source, samples_per_micro * accum, cfg.data.micro_batch_size, info.world_size, accum,
            cfg.optim.total_steps, cfg.parallel if info.distributed else "one process", info.device,
        )  # fmt: skip
    history: list[dict[str, Any]] = []
    metrics_file = run_dir / "metrics.jsonl"
    meter = ThroughputMeter.for_device(info.device, info.world_size)
    cost: SampleCost | None = None  # of one sample, from the first micro-batch's latent shape
    recompute = 1.0 if cfg.model.gradient_checkpointing else 0.0

    # -- train
    t_start, out_of_time = time.perf_counter(), False
    while step < cfg.optim.total_steps and not out_of_time:
        step_position = position
        sums = torch.zeros(4, device=info.device)  # total, flow, face, temporal (mean over micro-steps)
        for micro in range(accum):
            with _phase("data"):
                batch = next_inputs()
            cost = cost or sample_cost(dit.config, batch.x0.shape[2:])
            set_grad_sync(model, micro == accum - 1)
            with _phase("forward"):
                terms = compute_losses(model, batch, cfg, autocast)
            with _phase("backward"):
                (terms.total.mean() / accum).backward()
            sums += torch.stack([t.detach().mean() for t in (terms.total, terms.flow, terms.face, terms.temporal)])
            position += samples_per_micro
        with _phase("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(dit.parameters(), cfg.optim.grad_clip or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
                grad_norm = grad_norm.full_tensor()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        with _phase("ema"):
            ema.update(step)
        step += 1
        samples = cfg.data.micro_batch_size * accum  # this process's, per optimizer step
        meter.add(cost, forwards=samples, backwards=samples, recomputed=recompute * samples)

        losses = _all_mean(sums / accum, info)
        if step % cfg.log.interval == 0 or step == cfg.optim.total_steps:
            rates = meter.report()  # collective (memory of every GPU)
            point = {
                "step": step, "loss": losses[0].item(), "flow": losses[1].item(), "face": losses[2].item(),
                "temporal": losses[3].item(), "lr": lr, "grad_norm": float(grad_norm),
                "steps_per_s": 1 / rates["step_time_s"],
                "samples_per_s": samples_per_micro * accum / rates["step_time_s"],
                "epoch": stream_position(step_position)[0], "index": stream_position(step_position)[1],
                "position": step_position, **rates,
            }  # fmt: skip
            if info.is_main:
                history.append(point)
                _log_point(point, writer, metrics_file)
                write_json(run_dir / "summary.json", run_summary(history, cfg, info, dit, cost))

        if cfg.val.interval and step % cfg.val.interval == 0:
            validate(ema.full_state_dict(), dit.config, vae, audio_encoder, spec, cfg, step, info, writer, run_dir)

        out_of_time = budget_spent(t_start, cfg.optim.max_minutes, info)
        if out_of_time and info.is_main:
            logger.info("step %d: the %.1f-minute budget is spent; stopping", step, cfg.optim.max_minutes)

        every = cfg.log.checkpoint_interval
        if every and (step % every == 0 or step == cfg.optim.total_steps or out_of_time):
            state = training_state(step, dit, ema, optimizer, scheduler, info)  # collective
            if info.is_main:
                epoch, index = stream_position(position)
                state["data"] = {"position": position, "epoch": epoch, "index": index}
                state |= {"dit_config": dict(dit.config), "config": cfg.to_dict()}
                saved = save_checkpoint(run_dir, step, state, cfg.log.keep_checkpoints)
                logger.info("step %d: checkpoint %s", step, saved)
            _barrier(info)
        if on_step is not None:
            on_step(step)

    if inputs is None:
        del batches  # stops the data workers

    export_dir = None
    if cfg.export_at_end:
        ema_state = ema.full_state_dict()
        if info.is_main:
            export_dir = write_export(ema_state, dit.config, cfg, run_dir / "export")
        _barrier(info)
    if writer is not None:
        writer.close()
    if info.owns_group:
        dist.destroy_process_group()
    return TrainResult(run_dir, step, history, export_dir)


def run_summary(
    history: list[dict[str, Any]], cfg: Any, info: DistInfo, dit: FlashHeadDiT, cost: SampleCost | None
) -> dict[str, Any]:
    """summary.json of a run: setup, steady-state throughput, MFU, peak memory per GPU, loss trend."""
    micro, accum = cfg.data.micro_batch_size, getattr(getattr(cfg, "optim", None), "grad_accum_steps", 1)
    return {
        "steps": history[-1]["step"] if history else 0,
        "world_size": info.world_size, "parallel": cfg.parallel if info.distributed else "none",
        "device": torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
        "peak_tflops_per_gpu": (device_peak_flops(info.device) or 0) / 1e12 or None,
        "precision": str(_autocast(cfg, info.device)[1]).removeprefix("torch."),
        "gradient_checkpointing": bool(dit.gradient_checkpointing),
        "parameters": sum(p.numel() for p in dit.parameters()),
        "micro_batch_size": micro, "grad_accum_steps": accum, "global_batch": micro * accum * info.world_size,
        "tokens_per_sample": cost.tokens if cost else None,
        "forward_tflop_per_sample": cost.forward_flops / 1e12 if cost else None,
        "mfu_convention": MFU_CONVENTION,
        **summarize(history),
        "loss": loss_trend([h["loss"] for h in history if "loss" in h]),
    }  # fmt: skip


def _tensorboard(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("tensorboard is not installed (pip install 'flashhead[train]'): logging to metrics.jsonl only")
        return None
    return SummaryWriter(str(folder))


def _log_point(point: dict[str, Any], writer: Any, metrics_file: Path) -> None:
    step = point["step"]
    logger.info(
        "step %d  loss %.4f (flow %.4f face %.4f temporal %.4f)  lr %.2e  grad %.3f  %s",
        step, point["loss"], point["flow"], point["face"], point["temporal"], point["lr"], point["grad_norm"],
        format_rates(point),
    )  # fmt: skip
    with open(metrics_file, "a") as f:
        f.write(json.dumps(point) + "\n")
    if writer is not None:
        for key in ("loss", "flow", "face", "temporal"):
            writer.add_scalar(f"train/{key}", point[key], step)
        for key in ("lr", "grad_norm", "steps_per_s", "samples_per_s"):
            writer.add_scalar(f"train/{key}", point[key], step)
        log_rates(writer, point, step)


# ---------------------------------------------------------------------------------------------------
# Validation and export


def eval_dit(ema_state: dict[str, torch.Tensor], dit_config: Any, device: torch.device, dtype: torch.dtype):
    """A plain FlashHeadDiT holding the EMA weights, in eval mode."""
    dit = FlashHeadDiT.from_config(dict(dit_config))
    dit.load_state_dict(ema_state, strict=True)
    torch.nn.Module.to(dit, device=device, dtype=dtype)  # not ModelMixin.to, which warns about fp32 modules
    return dit.eval().requires_grad_(False)


def generation_config(cfg: Stage1Config) -> Any:
    """How the Stage-1 teacher samples (SPEC 5.1): Euler steps with audio CFG, the training geometry."""
    from flashhead.pipeline.config import GenerationConfig

    d = cfg.data
    return GenerationConfig(
        height=d.height, width=d.width, fps=d.fps, frame_num=d.frame_num,
        motion_latent_frames=cfg.loss.motion_latent_frames, shift=cfg.loss.shift,
        num_inference_steps=cfg.val.num_inference_steps, guidance_scale=cfg.val.guidance_scale, sampler="euler",
    )  # fmt: skip


@torch.no_grad()
def validate(
    ema_state: dict[str, torch.Tensor],
    dit_config: Any,
    vae: Any,
    audio_encoder: Any,
    spec: SampleSpec,
    cfg: Stage1Config,
    step: int,
    info: DistInfo,
    writer: Any,
    run_dir: Path,
) -> dict[str, float]:
    """Rank 0: the EMA model's losses on fixed val samples, and MP4s of a few val clips rendered by the real
    pipeline (teacher sampling), with a generated-vs-real frame grid in TensorBoard."""
    out: dict[str, float] = {}
    if info.is_main:
        autocast, dtype = _autocast(cfg, info.device)
        dit = eval_dit(ema_state, dit_config, info.device, dtype)
        val_clips = index_clips(cfg.data.roots, cfg.data.val_split, spec)
        if not val_clips:
            logger.warning("no %r clips: validation skipped", cfg.data.val_split)
        else:
            out = _val_losses(dit, val_clips, vae, audio_encoder, spec, cfg)
            _val_videos(dit, val_clips[: cfg.val.num_clips], vae, audio_encoder, cfg, step, writer, run_dir)
            logger.info("step %d: val %s", step, "  ".join(f"{k} {v:.4f}" for k, v in out.items()))
            if writer is not None:
                for key, value in out.items():
                    writer.add_scalar(f"val/{key}", value, step)
    _barrier(info)
    return out


def _val_losses(dit, clips, vae, audio_encoder, spec, cfg) -> dict[str, float]:
    dataset = Stage1Dataset(clips, spec, seed=cfg.seed)
    autocast, _ = _autocast(cfg, vae.device)  # bf16 weights on CUDA: autocast casts the float32 inputs
    terms = []
    for p in range(cfg.val.loss_samples):
        inputs = encode_samples([dataset.sample_at(p)], vae, audio_encoder, spec)
        t = compute_losses(dit, inputs, cfg, autocast)
        terms.append([t.flow.item(), t.face.item(), t.temporal.item()])
    flow, face, temporal = np.mean(terms, axis=0) if terms else (0.0, 0.0, 0.0)
    return {"flow": float(flow), "face": float(face), "temporal": float(temporal)}


def _val_videos(dit, clips, vae, audio_encoder, cfg, step, writer, run_dir, gen_config=None, label="stage1-ema"):
    """Render val clips with `dit` through the real pipeline (`gen_config`: default the teacher's sampling)."""
    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline, reference_generator
    from flashhead.train.data import decode_frames, read_clip, resize_center_crop

    pipe = FlashHeadPipeline(dit, vae, audio_encoder, config=gen_config or generation_config(cfg))
    folder = run_dir / "val" / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    for ref in clips:
        clip = read_clip(ref)
        seconds = min(cfg.val.seconds, ref.num_frames / cfg.data.fps)
        waveform = torch.from_numpy(clip.audio[: int(seconds * clip.sample_rate)].copy())
        n = int(round(seconds * cfg.data.fps))
        real = resize_center_crop(decode_frames(clip, range(n)), cfg.data.height, cfg.data.width).numpy()
        reference = pipe.encode_reference(real[0], generator=reference_generator(cfg.seed))
        frames = np.concatenate(list(pipe.iter_frames(reference, waveform, seed=cfg.seed)))[:n]
        _write_mp4(
            folder / f"{ref.key}.mp4", frames, clip.audio[: len(waveform)], clip.sample_rate, cfg.data.fps, label
        )
        if writer is not None:
            picks = np.linspace(0, len(frames) - 1, 4).round().astype(int)
            grid = np.concatenate([np.concatenate(list(frames[picks]), 1), np.concatenate(list(real[picks]), 1)], 0)
            writer.add_image(f"val/{ref.key}", grid, step, dataformats="HWC")


def _write_mp4(path: Path, frames: np.ndarray, audio: np.ndarray, sample_rate: int, fps: int, label: str) -> None:
    try:
        from flashhead.media.video_io import VideoWriter
    except ImportError:  # pragma: no cover - media is part of the package
        logger.warning("no VideoWriter: %s not written", path)
        return
    with VideoWriter(path, fps=fps, metadata={"model": label}) as writer:
        writer.set_audio(np.ascontiguousarray(audio, np.float32), sample_rate)
        writer.write_frames(frames)


def write_export(ema_state: dict[str, torch.Tensor], dit_config: Any, cfg: Stage1Config, out: str | Path) -> Path:
    """A pipeline folder (FlashHeadPipeline.save_pretrained layout) with the EMA DiT, the run's VAE and audio
    encoder (fresh float32 CPU copies) and the teacher's sampling settings as its generation_config."""
    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline

    dit = eval_dit(ema_state, dit_config, torch.device("cpu"), torch.float32)
    vae, audio_encoder = build_frozen(cfg, dit.config.vae_stride[0])
    pipe = FlashHeadPipeline(dit, vae, audio_encoder, config=generation_config(cfg))
    pipe.name = f"flashhead-stage1 ({Path(cfg.output_dir).name})"
    out = Path(out)
    with atomic_path(out) as tmp:
        pipe.save_pretrained(tmp)
    logger.info("exported the EMA pipeline to %s", out)
    return out


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """`flashhead train export`: the EMA weights of a run's latest (or the given) checkpoint as a pipeline folder."""
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"{run_dir}: no checkpoint to export (checkpoints/latest is missing)")
    ckpt = load_checkpoint(path)
    cfg = Stage1Config.from_dict(ckpt["config"])
    return write_export(ckpt["ema"], ckpt["dit_config"], cfg, out)
