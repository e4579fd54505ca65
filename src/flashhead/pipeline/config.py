"""Generation settings: one typed place for every number the pipeline uses, loadable from YAML or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from flashhead.config_files import build_dataclass, read_mapping, unknown_keys_message
from flashhead.errors import ConfigError


@dataclass
class GenerationConfig:
    """How a chunked generation runs. Defaults are the official inference settings (infer_params.yaml).

    Chunk geometry: each chunk has `frame_num` frames; its first `motion_latent_frames` latent frames are
    clean "motion" latents re-encoded from the previous chunk's last frames, so a chunk adds
    `frame_num - motion_frames` new frames (Lite 24, Pro 28), where
    motion_frames = (motion_latent_frames - 1) * vae_temporal_stride + 1.
    """

    height: int = 512
    width: int = 512
    fps: int = 25
    sample_rate: int = 16000
    frame_num: int = 33
    motion_latent_frames: int = 2
    num_inference_steps: int = 4
    shift: float = 5.0
    guidance_scale: float = 1.0
    guidance_steps: int | None = None  # audio guidance on the first N steps only (None: every step)
    # "distilled": x0-predict + re-noise (released 4-step models); "euler": the Stage-1 teacher's ODE
    # steps; "auto": euler when guidance_scale > 1, else distilled.
    sampler: Literal["auto", "distilled", "euler"] = "auto"
    color_correction_strength: float = 1.0
    audio_cache_seconds: float = 8.0
    # "stream": Temporal Audio Context Cache (official default, what a live stream sees);
    # "once": the whole utterance encoded at once (the report's non-streaming rows).
    audio_mode: Literal["stream", "once"] = "stream"

    def __post_init__(self) -> None:
        if self.sampler not in ("auto", "distilled", "euler"):
            raise ConfigError(f"sampler must be auto, distilled or euler, got {self.sampler!r}")
        if self.audio_mode not in ("stream", "once"):
            raise ConfigError(f"audio_mode must be stream or once, got {self.audio_mode!r}")
        if self.num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if not 0.0 <= self.color_correction_strength <= 1.0:
            raise ConfigError("color_correction_strength must be in [0, 1]")
        if self.fps <= 0 or self.sample_rate % self.fps:
            raise ConfigError(f"sample_rate {self.sample_rate} must be a multiple of fps {self.fps}")

    @property
    def use_euler(self) -> bool:
        return self.sampler == "euler" or (self.sampler == "auto" and self.guidance_scale > 1.0)

    def motion_frames(self, vae_temporal_stride: int) -> int:
        return (self.motion_latent_frames - 1) * vae_temporal_stride + 1

    def new_frames(self, vae_temporal_stride: int) -> int:
        return self.frame_num - self.motion_frames(vae_temporal_stride)

    def replace(self, **changes: object) -> GenerationConfig:
        """A copy with some fields changed (None values are ignored)."""
        return GenerationConfig(**{**asdict(self), **{k: v for k, v in changes.items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GenerationConfig:
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(unknown_keys_message("generation setting(s):", unknown, known))
        return build_dataclass(cls, data)  # each value checked against its field's type

    @classmethod
    def from_file(cls, path: str | Path) -> GenerationConfig:
        """Read a YAML (.yaml/.yml) or JSON file of settings."""
        return cls.from_dict(read_mapping(path))
