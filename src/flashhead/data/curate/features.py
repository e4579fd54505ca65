"""Annotation: streaming wav2vec2 features [PAPER] and optional VAE latents, as Stage-1 clip extras.

The arrays are those `flashhead.train.data.precompute_extras` makes (one entry per window of
`frame_num` frames every `window_stride` frames), so the trainer uses them instead of running the
frozen encoders. Without a loadable wav2vec2 the stage is skipped and the report says why.
"""

from __future__ import annotations

import numpy as np

from flashhead.data.curate.config import FeaturesSection

_models: dict[tuple, tuple[object, object | None]] = {}


def encoders(cfg: FeaturesSection) -> tuple[object, object | None]:
    """(wav2vec encoder, VAE or None) of this process, loaded once per setting."""
    key = (cfg.wav2vec, cfg.vae, cfg.vae_kind)
    if key not in _models:
        from flashhead.models.audio import Wav2VecEncoder

        audio = Wav2VecEncoder.from_pretrained(cfg.wav2vec, local_files_only=True)
        vae = None
        if cfg.vae:
            from flashhead.train.trainer import _load_vae

            vae = _load_vae(cfg.vae_kind, cfg.vae)
        _models[key] = (audio, vae)
    return _models[key]


def features_unavailable(cfg: FeaturesSection) -> str | None:
    """Why features cannot be computed here, or None."""
    from flashhead.errors import FlashHeadError

    if not cfg.wav2vec:
        return "no wav2vec2 model configured (features.wav2vec)"
    try:
        encoders(cfg)
    except FlashHeadError as e:
        return str(e)
    return None


def clip_extras(clip, cfg: FeaturesSection) -> dict[str, np.ndarray]:
    """window_starts, audio_features (and latents) of one clip (a `Clip` with frames)."""
    from flashhead.train.data import SampleSpec, precompute_extras

    audio, vae = encoders(cfg)
    size = clip.frames.shape[1]
    stride = tuple(vae.stride) if vae is not None else (1, 1, 1)
    spec = SampleSpec(height=size, width=size, vae_stride=stride, frame_num=cfg.frame_num)
    starts = list(range(0, len(clip.frames) - cfg.frame_num + 1, cfg.window_stride))
    if not starts:
        return {}
    return precompute_extras(clip, vae, audio, spec, starts)
