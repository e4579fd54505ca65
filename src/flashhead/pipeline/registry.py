"""Which weights a model name means, and how a pipeline is read from and written to a folder.

Three kinds of model exist:
- the released SoulX-FlashHead checkpoints ("lite", "pro"): a folder or hub repo laid out as
  `SoulX-FlashHead-1_3B/{Model_Lite, Model_Pro, VAE_LTX, VAE_Wan}` plus wav2vec2-base-960h;
- our own pipelines, written by `FlashHeadPipeline.save_pretrained` (self-contained folder);
- "tiny": our small model, shipped inside the package (one of our own folders).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flashhead import __version__
from flashhead.errors import CheckpointError, ConfigError
from flashhead.models.loading import read_json, resolve_model_dir
from flashhead.pipeline.config import GenerationConfig

if TYPE_CHECKING:
    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline

logger = logging.getLogger(__name__)

OFFICIAL_REPO = "Soul-AILab/SoulX-FlashHead-1_3B"
WAV2VEC_REPO = "facebook/wav2vec2-base-960h"
OFFICIAL_VARIANTS = {"lite": ("Model_Lite", "VAE_LTX"), "pro": ("Model_Pro", "VAE_Wan")}
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "assets" / "flashhead-tiny"
INDEX_NAME = "model_index.json"


def default_device_and_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = check_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a ConfigError saying why this machine cannot run on it (rather than torch's
    AssertionError once the weights are loaded)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device such as cpu, cuda or cuda:1") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise ConfigError(f"device {device}: this torch ({torch.__version__}) is a CPU build; use --device cpu")
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(f"device {device}: no CUDA GPU is visible here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return device


def official_weights_available(weights: str | Path | None) -> bool:
    """Whether official Lite can be loaded without the network: under `weights`, or in the HF cache."""
    try:
        root = resolve_model_dir(weights or OFFICIAL_REPO, "Model_Lite", local_files_only=True)
        return (root / "config.json").is_file()
    except CheckpointError:
        return False


def embedded_model_available() -> bool:
    return (EMBEDDED_DIR / INDEX_NAME).is_file()


def resolve_model_name(model: str | Path, weights: str | Path | None) -> str | Path:
    """Turn "auto" into a concrete choice and say which one (the CLI prints it)."""
    if str(model) != "auto":
        return model
    if official_weights_available(weights):
        logger.info("auto: using the official Lite checkpoint")
        return "lite"
    if embedded_model_available():
        logger.info("auto: no official weights found locally; using the embedded flashhead-tiny model")
        return "tiny"
    raise CheckpointError(
        "no model available: the official weights are not in the local Hugging Face cache (pass --weights DIR "
        "or download Soul-AILab/SoulX-FlashHead-1_3B) and this build has no embedded flashhead-tiny model yet"
    )


def load_pipeline(
    cls: type[FlashHeadPipeline],
    model: str | Path,
    *,
    weights: str | Path | None,
    wav2vec: str | Path | None,
    device: str | torch.device | None,
    torch_dtype: torch.dtype | None,
    config: GenerationConfig | None,
    local_files_only: bool | None,
) -> FlashHeadPipeline:
    device, dtype = default_device_and_dtype(device, torch_dtype)
    model = resolve_model_name(model, weights)
    if str(model) in OFFICIAL_VARIANTS:
        pipe = _load_official(cls, str(model), weights, wav2vec, config, local_files_only)
    elif str(model) == "tiny":
        if not embedded_model_available():
            raise CheckpointError("the embedded flashhead-tiny model is not part of this build yet")
        pipe = _load_own(cls, EMBEDDED_DIR, config)
    else:
        path = Path(model)
        if not (path / INDEX_NAME).is_file():
            raise CheckpointError(f"{model}: not 'lite', 'pro', 'tiny', 'auto' or a pipeline folder with {INDEX_NAME}")
        pipe = _load_own(cls, path, config)
    return pipe.to(device=device, dtype=dtype)


def _load_official(cls, variant, weights, wav2vec, config, local_files_only) -> FlashHeadPipeline:
    from flashhead.models.audio import Wav2VecEncoder
    from flashhead.models.dit import FlashHeadDiT
    from flashhead.models.vae import LTXVideoVAE, WanVideoVAE

    dit_folder, vae_folder = OFFICIAL_VARIANTS[variant]
    root = weights or OFFICIAL_REPO
    dit = FlashHeadDiT.from_pretrained(root, dit_folder, local_files_only=local_files_only)
    vae_cls = LTXVideoVAE if variant == "lite" else WanVideoVAE
    vae = vae_cls.from_pretrained(root, subfolder=vae_folder, local_files_only=bool(local_files_only))
    encoder = Wav2VecEncoder.from_pretrained(_wav2vec_source(weights, wav2vec), local_files_only=bool(local_files_only))
    pipe = cls(dit, vae, encoder, config=config)
    pipe.name = f"SoulX-FlashHead {variant.capitalize()}"
    return pipe


def _wav2vec_source(weights: str | Path | None, wav2vec: str | Path | None) -> str | Path:
    if wav2vec is not None:
        return wav2vec
    if weights is not None and Path(weights).is_dir():
        for candidate in (Path(weights) / "wav2vec2-base-960h", Path(weights).parent / "wav2vec2-base-960h"):
            if candidate.is_dir():
                return candidate
    return WAV2VEC_REPO


def _load_own(cls, folder: Path, config: GenerationConfig | None) -> FlashHeadPipeline:
    from flashhead.models.audio import Wav2VecEncoder
    from flashhead.models.dit import FlashHeadDiT
    from flashhead.models.mel_encoder import MelAudioEncoder
    from flashhead.models.vae import LTXVideoVAE, WanVideoVAE

    index = read_json(folder / INDEX_NAME)
    vae_kind = index.get("vae")
    if vae_kind not in ("ltx", "wan"):
        raise CheckpointError(f"{folder / INDEX_NAME}: unknown vae {vae_kind!r} (expected 'ltx' or 'wan')")
    audio_kind = index.get("audio_encoder", "wav2vec2")
    if audio_kind not in ("wav2vec2", "mel"):
        raise CheckpointError(f"{folder / INDEX_NAME}: unknown audio_encoder {audio_kind!r} (expected wav2vec2 or mel)")
    dit = FlashHeadDiT.from_pretrained(folder / "dit")
    if vae_kind == "ltx":
        # Our own LTX-style VAEs encode to the posterior mean; the released one samples (official).
        sample = bool(index.get("vae_sample_posterior", True))
        vae = LTXVideoVAE.from_pretrained(folder / "vae", strict_config=False, sample_posterior=sample)
    else:
        vae = WanVideoVAE.from_pretrained(folder / "vae")
    if audio_kind == "mel":
        encoder = MelAudioEncoder.from_pretrained(folder / "audio_encoder")
    else:
        encoder = Wav2VecEncoder.from_pretrained(folder / "audio_encoder")
    if config is None and (folder / "generation_config.json").is_file():
        try:
            config = GenerationConfig.from_dict(read_json(folder / "generation_config.json"))
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{folder / 'generation_config.json'}: {e}") from e
    pipe = cls(dit, vae, encoder, config=config)
    pipe.name = index.get("name", folder.name)
    return pipe


def save_pipeline(pipe: FlashHeadPipeline, folder: Path, *, weights_dtype: torch.dtype | None = None) -> Path:
    """Write `pipe` as a self-contained folder; `weights_dtype` (e.g. float16) shrinks the stored weights."""
    from flashhead.models.mel_encoder import MelAudioEncoder
    from flashhead.models.vae import LTXVideoVAE

    encoder = pipe.audio_encoder
    is_mel = isinstance(encoder, MelAudioEncoder)
    if not is_mel and not (hasattr(encoder, "model") and hasattr(encoder.model, "save_pretrained")):
        raise ConfigError("save_pretrained needs a Wav2VecEncoder or MelAudioEncoder audio encoder")
    folder.mkdir(parents=True, exist_ok=True)
    _save_module(pipe.dit, folder / "dit", weights_dtype)
    _save_module(pipe.vae.model, folder / "vae", weights_dtype)
    if is_mel:
        encoder.save_pretrained(folder / "audio_encoder")
    else:
        encoder.model.save_pretrained(folder / "audio_encoder")
        from transformers import Wav2Vec2FeatureExtractor

        Wav2Vec2FeatureExtractor(do_normalize=encoder.normalize, return_attention_mask=False).save_pretrained(
            folder / "audio_encoder"
        )
    (folder / "generation_config.json").write_text(json.dumps(pipe.config.to_dict(), indent=2))
    index = {
        "_class_name": "FlashHeadPipeline",
        "_flashhead_version": __version__,
        "name": pipe.name,
        "vae": "ltx" if isinstance(pipe.vae, LTXVideoVAE) else "wan",
        "audio_encoder": "mel" if is_mel else "wav2vec2",
    }
    if isinstance(pipe.vae, LTXVideoVAE):
        index["vae_sample_posterior"] = pipe.vae.sample_posterior
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return folder


def _save_module(module: torch.nn.Module, folder: Path, dtype: torch.dtype | None) -> None:
    """diffusers-style save_pretrained, optionally with floating weights cast (the module is untouched)."""
    if dtype is None:
        module.save_pretrained(folder)
        return
    import copy

    clone = copy.deepcopy(module)
    torch.nn.Module.to(clone, dtype=dtype)  # not ModelMixin.to, which warns about fp32 modules
    clone.save_pretrained(folder)
