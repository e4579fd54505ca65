"""Curation settings: one typed tree of dataclasses, read from YAML/JSON like the training config.

    cfg = CurateConfig.from_file("configs/curate.yaml", overrides=["face.crop_size=256"])

Values marked [PAPER] are the technical report's (SPEC section 10.2); the report publishes no other
threshold, so the rest are our defaults, measured on the shared media as docs/curation.md describes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flashhead.config_files import apply_override, build_dataclass, read_mapping
from flashhead.errors import ConfigError


@dataclass
class DedupSection:
    """Duplicates: same source id, same bytes (MD5), or the same pictures (perceptual hashes)."""

    hash_every: float = 1.0  # seconds between hashed frames (taken at fixed times, so re-encodes line up)
    max_hamming: int = 10  # of 64 pHash bits: two frames "look the same"
    match_fraction: float = 0.8  # share of hashed frames that must look the same
    duration_tolerance: float = 0.5  # seconds; copies with different lengths are not compared


@dataclass
class ScenesSection:
    """PySceneDetect's adaptive detector, then segments of min..max seconds."""

    adaptive_threshold: float = 3.0  # PySceneDetect's default
    min_seconds: float = 5.0  # [PAPER] 5-50 s
    max_seconds: float = 50.0  # [PAPER]; longer scenes are split into equal parts


@dataclass
class NormalizeSection:
    fps: int = 25  # [PAPER]
    sample_rate: int = 16000  # the wav2vec rate
    max_av_gap: float = 0.5  # seconds the audio may be shorter than the video before the clip is dropped


@dataclass
class FaceSection:
    """Face detection on the first frame [PAPER], tracked at `detect_fps`, and the square crop."""

    detect_fps: float = 5.0  # tracking rate; 25 / detect_fps must be a whole number
    min_face: int = 64  # px in the source; a smaller face would be upscaled more than 4x into a 512 crop
    face_ratio: float = 2.0  # crop side / face width: the official inference crop (SPEC 6.1)
    crop_size: int = 512  # [PAPER] 512x512
    max_drift: float = 0.2  # the face box may leave the fixed crop by this fraction of the crop side
    second_face: float = 0.5  # another face at least this wide (relative) means more than one speaker


@dataclass
class MotionSection:
    """Jump cuts and abnormal motion from Farneback optical flow on the crop."""

    flow_size: int = 128  # flow runs on the crop resized to this side
    max_residual: float = 0.1  # mean |frame - warped previous frame| (0..1) above which a pair is a jump
    max_flow: float = 0.05  # mean flow per frame (fraction of the crop side), averaged over 1 s windows


@dataclass
class FacelessSection:
    sample_fps: float = 1.0  # [PAPER] one frame per second
    max_fraction: float = 0.2  # share of sampled frames without a face


@dataclass
class OcclusionSection:
    """Hands (MediaPipe hands, and pose wrists/fingers) over the lower face."""

    sample_fps: float = 1.0  # as the faceless filter: hands that stay over the mouth are what matter
    min_overlap: float = 0.15  # share of the lower-face box a hand must cover
    min_visibility: float = 0.5  # pose landmarks less visible than this are ignored
    max_fraction: float = 0.2  # share of sampled frames with a hand over the lower face


@dataclass
class SyncSection:
    """SyncNet LSE-C / LSE-D (`flashhead.eval.syncnet`). Without weights the stage is skipped and reported."""

    weights: str | None = None  # syncnet_v2.model; else $FLASHHEAD_SYNCNET, then the eval cache
    min_confidence: float = 3.0
    max_distance: float = 9.0
    max_offset: int = 3  # frames between audio and lips


@dataclass
class FeaturesSection:
    """wav2vec2 features (and VAE latents) stored as the clip extras the Stage-1 trainer reads."""

    # folder or hub id, read from the local hub cache only; when it does not load, the stage is skipped and reported
    wav2vec: str | None = "facebook/wav2vec2-base-960h"
    vae: str | None = None  # VAE folder or file for latents; None: no latents
    vae_kind: str = "ltx"  # ltx (Lite) or wan (Pro)
    window_stride: int = 33  # frames between precomputed windows
    frame_num: int = 33  # frames per window (the inference chunk)


@dataclass
class OutputSection:
    shard_max_clips: int = 256
    crf: int = 12  # the shard format's visually lossless default
    preset: str = "medium"  # x264 speed/size trade-off; at 512x512 encoding is most of the time (docs/curation.md)
    val_fraction: float = 0.0  # share of sources (by a fixed hash of the source id) held out as "val"


@dataclass
class CurateConfig:
    dedup: DedupSection = field(default_factory=DedupSection)
    scenes: ScenesSection = field(default_factory=ScenesSection)
    normalize: NormalizeSection = field(default_factory=NormalizeSection)
    face: FaceSection = field(default_factory=FaceSection)
    motion: MotionSection = field(default_factory=MotionSection)
    faceless: FacelessSection = field(default_factory=FacelessSection)
    occlusion: OcclusionSection = field(default_factory=OcclusionSection)
    sync: SyncSection = field(default_factory=SyncSection)
    features: FeaturesSection = field(default_factory=FeaturesSection)
    output: OutputSection = field(default_factory=OutputSection)

    def __post_init__(self) -> None:
        s, f = self.scenes, self.face
        if not 0 < s.min_seconds <= s.max_seconds:
            raise ConfigError(f"scenes: need 0 < min_seconds <= max_seconds, got {s.min_seconds}, {s.max_seconds}")
        if s.max_seconds < 2 * s.min_seconds:
            raise ConfigError("scenes.max_seconds must be at least twice min_seconds (long scenes are split)")
        if f.detect_fps <= 0 or (self.normalize.fps / f.detect_fps) % 1:
            raise ConfigError(f"face.detect_fps must divide normalize.fps ({self.normalize.fps}), got {f.detect_fps}")
        if f.crop_size < 32 or f.crop_size % 2:
            raise ConfigError(f"face.crop_size must be even and >= 32, got {f.crop_size}")
        if self.features.vae_kind not in ("ltx", "wan"):
            raise ConfigError(f"features.vae_kind must be ltx or wan, got {self.features.vae_kind!r}")
        if not 0 <= self.output.val_fraction < 1:
            raise ConfigError(f"output.val_fraction must be in [0, 1), got {self.output.val_fraction}")
        for name in ("faceless", "occlusion"):
            section = getattr(self, name)
            if not 0 <= section.max_fraction <= 1 or section.sample_fps <= 0:
                raise ConfigError(f"{name}: max_fraction must be in [0, 1] and sample_fps positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """A short hash of every setting: work cached under another fingerprint is not reused."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CurateConfig:
        return build_dataclass(cls, data)

    @classmethod
    def from_file(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> CurateConfig:
        """Defaults, or a YAML/JSON file, then `section.key=value` overrides (values parsed as YAML)."""
        data = read_mapping(path) if path is not None else {}
        for item in overrides or []:
            apply_override(data, item)
        return cls.from_dict(data)
