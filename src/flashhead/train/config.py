"""Training settings (Stage 1 and 2): one typed tree of dataclasses, read from YAML/JSON, overridable from the CLI.

    cfg = Stage1Config.from_file("configs/stage1_lite.yaml", overrides=["optim.lr=1e-4"])
    cfg.save(run_dir / "config.yaml")      # the resolved settings, next to the checkpoints

Every field has a default; a file only names what differs. Unknown keys are errors (with their dotted
path), so a typo never silently falls back to a default. Values marked [PAPER] come from the technical
report (SPEC section 9.1); everything else is our choice, explained in docs/training.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from flashhead.config_files import ConfigFile
from flashhead.errors import ConfigError


@dataclass
class ModelSection:
    """Which DiT to train and where its first weights come from."""

    variant: Literal["lite", "pro"] = "lite"  # official architecture (SPEC section 2)
    config: dict[str, Any] | None = None  # explicit FlashHeadDiT config (small models); overrides `variant`
    init_from: str | None = None  # FlashHead DiT folder, or pipeline folder (its dit/), to start from
    init_from_wan: str | None = None  # Wan2.1-T2V-1.3B weights (file or folder) for the backbone [PAPER]
    gradient_checkpointing: bool = False
    # torch.compile the DiT (forward and backward): fused elementwise kernels for a launch-bound small model.
    # Opt-in: close to, not bit-equal with, eager; tested on the CPU only (docs/training.md).
    compile: bool = False


@dataclass
class VAESection:
    """The frozen video VAE. Exactly one of `pipeline`, `path`, `config` is used, in that order."""

    kind: Literal["ltx", "wan"] | None = None  # None: LTX for temporal stride 8 (Lite), Wan for 4 (Pro)
    path: str | None = None  # release folder, VAE folder or file (see LTXVideoVAE / WanVideoVAE.from_pretrained)
    pipeline: str | None = None  # a pipeline folder: its vae/ AND its audio_encoder/ are used
    config: dict[str, Any] | None = None  # random weights of this official config: smoke runs and tests only
    sample_posterior: bool = True  # LTX (path or config): encode to a posterior sample (official) or its mean


@dataclass
class AudioSection:
    """The frozen audio encoder (ignored when `vae.pipeline` is set and neither path nor config is).

    kind "wav2vec2" (official): `path` is a wav2vec2 folder or hub id, or `config` a Wav2Vec2Config for random
    weights (smoke runs and tests). kind "mel": the parameter-free log-mel encoder of flashhead-tiny, with
    `config` holding MelConfig fields that differ from the defaults.
    """

    kind: Literal["wav2vec2", "mel"] = "wav2vec2"
    path: str | None = "facebook/wav2vec2-base-960h"
    config: dict[str, Any] | None = None


@dataclass
class DataSection:
    """Where clips come from and how one training sample is cut from a clip (flashhead.train.data)."""

    roots: list[str] = field(default_factory=list)  # shard folders (each with manifest.parquet)
    split: str = "train"
    val_split: str = "val"
    height: int = 512  # [PAPER] 512x512
    width: int = 512
    frame_num: int = 33  # [CODE-IMPLIED] the inference chunk
    fps: int = 25
    micro_batch_size: int = 1  # samples per process per micro-step ([PAPER] 1 per GPU)
    num_workers: int = 2  # DataLoader worker processes per training process
    windows_per_clip: int = 1  # samples drawn from each clip per epoch
    # Share of the samples per source (manifest `source` column, e.g. synth-portrait: 0.5); empty: every
    # clip equally often. Every source present needs a weight.
    source_weights: dict[str, float] = field(default_factory=dict)
    # A latent cache folder (flashhead.train.latent_cache) to train from instead of decoding and encoding
    # clips on the fly; it must match this run's geometry and frozen encoders.
    cache: str | None = None
    # Reference frame: "outside" = a random frame of the clip outside the window (the window's first frame
    # when there is none); "window_first" = always the window's first frame. Cold-start samples (one motion
    # latent frame) always use the window's first frame, as a stream's first chunk does (docs/training.md).
    reference: Literal["outside", "window_first"] = "outside"
    face_margin: float = 0.25  # the mouth box grows by this fraction of its size on each side
    default_face_box: list[float] = field(default_factory=lambda: [0.3, 0.55, 0.7, 0.85])  # x0 y0 x1 y1 fractions


@dataclass
class OptimSection:
    lr: float = 2e-4  # [PAPER]
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01  # on weight matrices only (no biases, norms, modulation)
    eps: float = 1e-8
    warmup_steps: int = 1000  # [PAPER] warm-up, length ours
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    total_steps: int = 100_000  # [PAPER] optimizer steps
    grad_accum_steps: int = 1  # micro-steps per optimizer step
    max_minutes: float | None = None  # wall-clock budget: stop early (checkpoint + export) once it is spent


@dataclass
class LossSection:
    """Loss weights and the random choices that shape a training sample (flashhead.train.losses)."""

    flow_weight: float = 1.0  # [PAPER] flow-matching MSE
    face_weight: float = 0.1  # face/mouth-region flow-matching MSE (our definition and weight, docs/training.md)
    temporal_weight: float = 0.3  # predicted-x0 frame-difference MSE (our definition and weight)
    audio_drop_prob: float = 0.1  # zeroed audio features, for the teacher's audio CFG [CODE-IMPLIED]
    motion_latent_frames: int = 2  # [CODE] motion context of a later chunk
    motion_probs: list[float] = field(default_factory=lambda: [0.9, 0.1])  # P(2 frames), P(1 frame) [PAPER]
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"  # u before the shift
    shift: float = 5.0  # [CODE] sample_shift of inference
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class ValSection:
    interval: int = 2000  # optimizer steps between validations; 0 disables
    num_clips: int = 2  # val clips rendered to MP4 with the EMA model
    seconds: float = 4.0  # audio rendered per clip
    num_inference_steps: int = 20  # teacher sampling (SPEC 5.1): Euler + audio CFG
    guidance_scale: float = 3.0
    loss_samples: int = 8  # fixed val samples whose flow-matching loss is logged


@dataclass
class LogSection:
    interval: int = 10  # optimizer steps between log lines / TensorBoard points
    tensorboard: bool = True
    checkpoint_interval: int = 1000  # 0: no checkpoints, not even at the end (benchmarks)
    keep_checkpoints: int = 3  # newest checkpoints kept (older ones deleted)


@dataclass
class Stage1Config(ConfigFile):
    """Everything a Stage-1 run needs. Global batch = micro_batch_size x processes x grad_accum_steps."""

    model: ModelSection = field(default_factory=ModelSection)
    vae: VAESection = field(default_factory=VAESection)
    audio: AudioSection = field(default_factory=AudioSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    val: ValSection = field(default_factory=ValSection)
    log: LogSection = field(default_factory=LogSection)
    ema_decay: float = 0.9999
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with several processes; FSDP2 = torch fully_shard
    seed: int = 0
    output_dir: str = "runs/stage1"
    export_at_end: bool = True  # write <output_dir>/export, a pipeline folder with the EMA weights
    cpu_threads: int | None = None  # torch threads per process on CPU (None: cores / local processes)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        d, o, lo = self.data, self.optim, self.loss
        if len(lo.motion_probs) != 2 or min(lo.motion_probs) < 0 or abs(sum(lo.motion_probs) - 1) > 1e-6:
            raise ConfigError(f"loss.motion_probs must be two probabilities summing to 1, got {lo.motion_probs}")
        if not 0 <= lo.audio_drop_prob < 1:
            raise ConfigError(f"loss.audio_drop_prob must be in [0, 1), got {lo.audio_drop_prob}")
        if lo.motion_latent_frames < 1:
            raise ConfigError("loss.motion_latent_frames must be >= 1")
        for name in ("micro_batch_size", "frame_num", "height", "width", "windows_per_clip"):
            if getattr(d, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(d, name)}")
        if d.num_workers < 0:
            raise ConfigError("data.num_workers must be >= 0")
        if len(d.default_face_box) != 4:
            raise ConfigError("data.default_face_box must be [x0, y0, x1, y1] fractions")
        if o.total_steps < 1 or o.grad_accum_steps < 1 or o.warmup_steps < 0:
            raise ConfigError("optim.total_steps and grad_accum_steps must be >= 1, warmup_steps >= 0")
        if o.lr <= 0 or len(o.betas) != 2:
            raise ConfigError("optim.lr must be positive and optim.betas two numbers")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


# ---------------------------------------------------------------------------------------------------
# Stage 2


@dataclass
class TeacherSection:
    """The frozen Stage-1 teacher (real score); the student and the fake score start from its weights."""

    path: str | None = None  # pipeline folder (its dit/, and its vae/ + audio_encoder/ by default) or DiT folder
    student_init: str | None = None  # start the student from other weights (e.g. an earlier student)
    gradient_checkpointing: bool = False  # for the student and the fake score


@dataclass
class Stage2OptimSection:
    """AdamW of one of the two trained networks; constant LR after a linear warm-up."""

    lr: float = 2e-6
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])  # Self-Forcing's (SPEC 9.2, inferred)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 10.0  # max global grad norm; 0 disables


@dataclass
class DistillSection:
    """The distillation recipe (flashhead.train.distill); [PAPER] marks the report's values (SPEC 9.2)."""

    total_steps: int = 3000  # iterations; every one updates the fake score, every `critic_ratio`-th the student
    max_minutes: float | None = None  # wall-clock budget: stop early (checkpoint + export) once it is spent
    num_chunks: int = 5  # [PAPER] K: the longest rollout, in chunks
    num_inference_steps: int = 4  # [CODE] the student's sampler (x0-predict + re-noise)
    shift: float = 5.0  # [CODE] the schedule's shift
    motion_latent_frames: int = 2  # [CODE]
    critic_ratio: int = 5  # [PAPER] 1:5, the student is updated once per 5 fake-score updates
    guidance_scale: float = 3.0  # the teacher's audio CFG in the real score [CODE]
    oracle: bool = True  # [PAPER] real score sees the ground-truth motion frames; False: the student's own
    dmd_weight: float = 1.0
    regression_weight: float = 0.25  # lambda of Eq. 5 ([PAPER] UNSPEC: ours)
    dmd_sigma_range: list[float] = field(default_factory=lambda: [0.02, 0.98])  # u range before the shift
    motion_roundtrip: Literal["pixel", "latent"] = "pixel"  # history through decode + colour + encode, or not
    color_correction: bool = True  # as inference, in the pixel round trip


@dataclass
class Stage2ValSection:
    interval: int = 500  # iterations between validations; 0 disables
    num_clips: int = 2  # val clips rendered by the EMA student (4 steps) to MP4
    seconds: float = 8.0


@dataclass
class Stage2Config(ConfigFile):
    """Everything a Stage-2 run needs. Batch = data.micro_batch_size x processes (no accumulation)."""

    teacher: TeacherSection = field(default_factory=TeacherSection)
    vae: VAESection = field(default_factory=VAESection)
    audio: AudioSection = field(default_factory=lambda: AudioSection(path=None))
    data: DataSection = field(default_factory=DataSection)
    distill: DistillSection = field(default_factory=DistillSection)
    generator_optim: Stage2OptimSection = field(default_factory=Stage2OptimSection)  # [PAPER] lr 2e-6
    critic_optim: Stage2OptimSection = field(default_factory=lambda: Stage2OptimSection(lr=4e-7))  # [PAPER]
    val: Stage2ValSection = field(default_factory=Stage2ValSection)
    log: LogSection = field(default_factory=lambda: LogSection(checkpoint_interval=500))
    ema_decay: float = 0.99  # Self-Forcing's generator EMA (SPEC 9.2, inferred)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    parallel: Literal["ddp", "fsdp"] = "fsdp"
    seed: int = 0
    output_dir: str = "runs/stage2"
    export_at_end: bool = True
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        d, ds = self.data, self.distill
        if ds.num_chunks < 1 or ds.num_inference_steps < 1 or ds.critic_ratio < 1 or ds.total_steps < 1:
            raise ConfigError("distill.num_chunks, num_inference_steps, critic_ratio and total_steps must be >= 1")
        lo, hi = ds.dmd_sigma_range if len(ds.dmd_sigma_range) == 2 else (1, 0)
        if not 0 < lo < hi <= 1:
            raise ConfigError(
                f"distill.dmd_sigma_range must be [lo, hi] with 0 < lo < hi <= 1, got {ds.dmd_sigma_range}"
            )
        if ds.motion_latent_frames < 1:
            raise ConfigError("distill.motion_latent_frames must be >= 1")
        if ds.max_minutes is not None and ds.max_minutes <= 0:
            raise ConfigError(f"distill.max_minutes must be positive (or null), got {ds.max_minutes}")
        for name in ("micro_batch_size", "frame_num", "height", "width", "windows_per_clip"):
            if getattr(d, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(d, name)}")
        for name in ("generator_optim", "critic_optim"):
            o = getattr(self, name)
            if o.lr <= 0 or len(o.betas) != 2 or o.warmup_steps < 0:
                raise ConfigError(f"{name}: lr must be positive, betas two numbers, warmup_steps >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
