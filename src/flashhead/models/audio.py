"""The audio path: waveform -> 25 fps wav2vec2 features -> per-frame windows -> per-chunk DiT context.

Data flow for one streaming chunk (official values, both variants):

    new samples (Lite 15,360 / Pro 17,920)           pushed into an 8 s FIFO (128,000 samples)
    -> zero-mean / unit-variance normalisation       over the whole buffer
    -> wav2vec2 CNN feature encoder                  (1, 512, 399)   50 Hz
    -> linear interpolation (align_corners=True)     (1, 200, 512)   25 Hz, one row per video frame
    -> feature projection + 12 transformer layers    (200, 12, 768)  all layer outputs stacked
    -> frames [167, 200), 5-wide clamped windows     (1, 33, 5, 12, 768)

See docs/audio.md for the design notes and the official quirks reproduced here.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flashhead.errors import AudioError, CheckpointError, ConfigError

if TYPE_CHECKING:
    from transformers import Wav2Vec2Model

logger = logging.getLogger(__name__)

DEFAULT_WAV2VEC = "facebook/wav2vec2-base-960h"

# VAE temporal stride per released variant; it fixes how many pixel frames are motion context.
VARIANT_TEMPORAL_STRIDE = {"lite": 8, "pro": 4}

# Variance epsilon of transformers' Wav2Vec2FeatureExtractor zero-mean/unit-variance normalisation.
NORM_EPS = 1e-7

# A waveform goes in (1-D float32 samples at `AudioConfig.sample_rate`), per-frame features come out:
# (frames, layers, hidden) with frames = samples * fps // sample_rate.
AudioEncoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AudioConfig:
    """Timing of the audio path. Defaults are the official `infer_params.yaml` values."""

    sample_rate: int = 16000
    fps: int = 25
    frame_num: int = 33  # video frames per chunk (motion frames included)
    window: int = 5  # wav2vec frames per video frame, centred (offsets -2..+2)
    cache_seconds: int = 8  # length of the streaming FIFO

    def __post_init__(self) -> None:
        for name in ("sample_rate", "fps", "frame_num", "window", "cache_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"AudioConfig.{name} must be positive, got {getattr(self, name)}")
        if self.sample_rate % self.fps:
            raise ConfigError(f"sample_rate {self.sample_rate} is not a multiple of fps {self.fps}")
        if self.window % 2 == 0:
            raise ConfigError(f"AudioConfig.window must be odd, got {self.window}")
        if self.cache_frames < self.frame_num:
            raise ConfigError(
                f"a {self.cache_seconds} s audio cache holds {self.cache_frames} frames, "
                f"fewer than frame_num={self.frame_num}"
            )

    @property
    def samples_per_frame(self) -> int:
        """Audio samples per video frame (640)."""
        return self.sample_rate // self.fps

    @property
    def cache_samples(self) -> int:
        """Length of the streaming FIFO in samples (128,000)."""
        return self.cache_seconds * self.sample_rate

    @property
    def cache_frames(self) -> int:
        """Feature frames of one encoded FIFO (200)."""
        return self.cache_seconds * self.fps

    @property
    def chunk_samples(self) -> int:
        """Samples covered by one whole chunk of `frame_num` frames (21,120)."""
        return self.frame_num * self.samples_per_frame

    def frames_for(self, num_samples: int) -> int:
        """Feature frames the encoder produces for `num_samples` samples: int(n * fps / sr)."""
        return num_samples * self.fps // self.sample_rate

    def slice_samples(self, new_frames: int) -> int:
        """New samples consumed per chunk when a chunk adds `new_frames` video frames."""
        return new_frames * self.samples_per_frame


# ---------------------------------------------------------------------------------------------------
# Chunk geometry


def motion_frames(vae_temporal_stride: int, motion_latent_frames: int = 2) -> int:
    """Pixel frames re-encoded as motion context: (latents - 1) * stride + 1 (Lite 9, Pro 5)."""
    return (motion_latent_frames - 1) * vae_temporal_stride + 1


def new_frames_per_chunk(vae_temporal_stride: int, frame_num: int = 33, motion_latent_frames: int = 2) -> int:
    """Video frames a chunk adds after its motion frames (Lite 24, Pro 28)."""
    new = frame_num - motion_frames(vae_temporal_stride, motion_latent_frames)
    if new <= 0:
        raise ConfigError(f"frame_num={frame_num} leaves no new frames after the motion frames")
    return new


def variant_new_frames(variant: str, config: AudioConfig | None = None) -> int:
    """New video frames per chunk of a released variant ('lite' 24, 'pro' 28)."""
    config = config or AudioConfig()
    try:
        stride = VARIANT_TEMPORAL_STRIDE[variant.lower()]
    except KeyError:
        raise ConfigError(f"unknown variant {variant!r}; expected one of {sorted(VARIANT_TEMPORAL_STRIDE)}") from None
    return new_frames_per_chunk(stride, config.frame_num)


def variant_slice_samples(variant: str, config: AudioConfig | None = None) -> int:
    """New audio samples per chunk of a released variant ('lite' 15,360, 'pro' 17,920)."""
    config = config or AudioConfig()
    return config.slice_samples(variant_new_frames(variant, config))


def num_stream_chunks(num_samples: int, new_frames: int, config: AudioConfig | None = None) -> int:
    """Chunks streaming mode renders for `num_samples` samples (the tail is zero-padded to a whole slice)."""
    config = config or AudioConfig()
    return math.ceil(num_samples / config.slice_samples(new_frames))


def offline_padded_length(num_samples: int, new_frames: int, config: AudioConfig | None = None) -> int:
    """Length once mode zero-pads to: the shortest `chunk_samples + k * slice_samples` (k >= 0) that
    holds `num_samples`. For audio shorter than one chunk the official rule can pad to less than a
    chunk (and then renders nothing); here such audio always fills one whole chunk.
    """
    config = config or AudioConfig()
    step = config.slice_samples(new_frames)
    k = math.ceil(max(num_samples - config.chunk_samples, 0) / step)
    return config.chunk_samples + k * step


def num_offline_chunks(
    num_samples: int, new_frames: int, config: AudioConfig | None = None, *, official_quirks: bool = False
) -> int:
    """Chunks once mode renders; `official_quirks=True` drops the final one, as the official script does."""
    config = config or AudioConfig()
    frames = config.frames_for(offline_padded_length(num_samples, new_frames, config))
    kept = (frames - config.frame_num) // new_frames
    return kept if official_quirks else kept + 1


def pad_to_multiple(waveform: torch.Tensor, multiple: int) -> torch.Tensor:
    """Right-pad a 1-D waveform with zeros to a multiple of `multiple` samples."""
    remainder = waveform.shape[-1] % multiple
    return F.pad(waveform, (0, multiple - remainder)) if remainder else waveform


# ---------------------------------------------------------------------------------------------------
# Waveform hygiene: validation, mono mixdown, resampling


def _as_float_tensor(audio: torch.Tensor | np.ndarray | list[float]) -> torch.Tensor:
    if isinstance(audio, torch.Tensor):
        tensor = audio.detach()
    else:
        array = np.asarray(audio)
        if array.dtype.kind not in "biuf":
            raise AudioError(f"audio must hold numbers, got dtype {array.dtype}")
        if not array.flags.writeable:  # e.g. np.frombuffer over raw PCM bytes
            array = array.copy()
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise AudioError(f"audio must hold real numbers, got dtype {tensor.dtype}")
    if not tensor.is_floating_point():
        # Integer PCM: scale to [-1, 1) the way soundfile/librosa decode it.
        if tensor.dtype == torch.uint8:
            return (tensor.float() - 128.0) / 128.0
        return tensor.double().div(float(2 ** (8 * tensor.element_size() - 1))).float()
    return tensor.float()


def check_waveform(audio: torch.Tensor | np.ndarray | list[float]) -> torch.Tensor:
    """A non-empty, finite, 1-D float32 tensor of samples, or `AudioError`."""
    waveform = _as_float_tensor(audio)
    if waveform.ndim != 1:
        raise AudioError(f"audio must be 1-D (samples) here, got shape {tuple(waveform.shape)}; mix down first")
    if waveform.numel() == 0:
        raise AudioError("audio is empty (0 samples)")
    if not torch.isfinite(waveform).all():
        raise AudioError("audio contains NaN or infinite samples")
    return waveform


def to_mono(audio: torch.Tensor | np.ndarray, channel_axis: int | None = None) -> torch.Tensor:
    """Mix multi-channel audio down to one channel by averaging the channels (as librosa does).

    Args:
        audio: (samples,) or 2-D (channels, samples) / (samples, channels).
        channel_axis: which axis holds channels; by default the shorter one.

    Returns:
        (samples,) float32.
    """
    waveform = _as_float_tensor(audio)
    if waveform.ndim == 1:
        return check_waveform(waveform)
    if waveform.ndim != 2:
        raise AudioError(f"audio must be 1-D or 2-D (channels x samples), got shape {tuple(waveform.shape)}")
    if channel_axis is None:
        channel_axis = 0 if waveform.shape[0] <= waveform.shape[1] else 1
    return check_waveform(waveform.mean(dim=channel_axis))


def resample(audio: torch.Tensor | np.ndarray, orig_sr: int | float, target_sr: int = 16000) -> torch.Tensor:
    """Resample a 1-D waveform with soxr (high quality), matching `librosa.load(sr=target_sr)`.

    The output has exactly ceil(n * target_sr / orig_sr) samples, librosa's length rule.
    """
    waveform = check_waveform(audio)
    if not (orig_sr > 0 and target_sr > 0) or orig_sr != int(orig_sr):
        raise AudioError(f"sample rates must be positive integers, got {orig_sr} -> {target_sr}")
    orig_sr, target_sr = int(orig_sr), int(target_sr)
    if orig_sr == target_sr:
        return waveform.clone()
    import soxr

    out = soxr.resample(waveform.cpu().numpy(), orig_sr, target_sr, quality="HQ")
    length = math.ceil(waveform.numel() * target_sr / orig_sr)
    out = out[:length] if out.shape[0] >= length else np.pad(out, (0, length - out.shape[0]))
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def prepare_waveform(
    audio: torch.Tensor | np.ndarray, sample_rate: int, target_sr: int = 16000, channel_axis: int | None = None
) -> torch.Tensor:
    """Decoded audio -> validated mono float32 at `target_sr` (mixdown first, then resampling)."""
    return resample(to_mono(audio, channel_axis), sample_rate, target_sr)


# ---------------------------------------------------------------------------------------------------
# Per-frame windows


def window_indices(
    start: int, end: int, window: int = 5, clamp_end: int | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Feature-frame indices of the windows of frames [start, end): (end - start, window), int64.

    Frame i gets i + (-w//2 .. +w//2), clamped to [0, clamp_end - 1]. `clamp_end` defaults to `end`:
    the official code clamps to the requested range, not to the sequence, so the last frames of a
    streaming chunk repeat frame end - 1 instead of looking ahead.
    """
    half = window // 2
    offsets = torch.arange(window, device=device) - half
    indices = torch.arange(start, end, device=device).unsqueeze(1) + offsets
    return indices.clamp_(0, (end if clamp_end is None else clamp_end) - 1)


def audio_windows(
    features: torch.Tensor,
    start: int = 0,
    end: int | None = None,
    window: int = 5,
    *,
    clamp_end: int | None = None,
) -> torch.Tensor:
    """Per-frame windows of per-frame features.

    Args:
        features: (S, ...) e.g. (S, layers, hidden) wav2vec features.
        start, end: frame range; `end` defaults to S.
        window: odd window width (5).
        clamp_end: exclusive upper bound for window indices; defaults to `end` (official behaviour).

    Returns:
        (end - start, window, ...).
    """
    num_frames = features.shape[0]
    end = num_frames if end is None else end
    limit = end if clamp_end is None else clamp_end
    if not 0 <= start < end <= limit <= num_frames:
        raise ValueError(f"bad frame range [{start}, {end}) clamped below {limit} for {num_frames} feature frames")
    # Built where the features are: a host-made index tensor would need a blocking copy, which on a side
    # CUDA stream stalls the host until all the stream's queued work (the whole audio encoder) has run.
    return features[window_indices(start, end, window, limit, device=features.device)]


# ---------------------------------------------------------------------------------------------------
# wav2vec2 encoder


def normalize_waveform(waveform: torch.Tensor) -> torch.Tensor:
    """Zero-mean / unit-variance over the last axis (population variance, eps 1e-7), in float32."""
    mean = waveform.mean(dim=-1, keepdim=True)
    var = waveform.var(dim=-1, unbiased=False, keepdim=True)
    return (waveform - mean) / torch.sqrt(var + NORM_EPS)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else the user typed is a folder.
    return not re.fullmatch(r"[\w\-]+(/[\w\-.]+)?", name) or name.startswith((".", "~"))


class Wav2VecEncoder(nn.Module):
    """wav2vec2 features at the video frame rate, the way SoulX-FlashHead computes them.

    The CNN feature encoder runs at its native 50 Hz; its output is linearly interpolated
    (align_corners=True) to `frames_for(n_samples)` frames, one per video frame, *before* the feature
    projection and the transformer, so the transformer itself runs at 25 Hz. The outputs of all
    transformer layers (hidden_states[1:], the pre-transformer embedding dropped) are returned stacked.

    The encoder is frozen: it stays in eval mode (no dropout, LayerDrop or SpecAugment) and should stay
    in float32 like the official one. It runs transformers' own submodules (`feature_extractor`,
    `feature_projection`, `encoder`) and records each layer's output with forward hooks, which works
    the same on transformers 4.x and 5.x.
    """

    def __init__(self, model: Wav2Vec2Model, *, normalize: bool = True, config: AudioConfig | None = None):
        """
        Args:
            model: a transformers `Wav2Vec2Model` (weights already loaded).
            normalize: apply the feature extractor's zero-mean/unit-variance normalisation
                (`do_normalize`, true for wav2vec2-base-960h).
            config: audio timing (sample rate and fps set the output frame count).
        """
        super().__init__()
        self.model = model.float().eval().requires_grad_(False)
        self.normalize = normalize
        self.config = config or AudioConfig()
        # The `audio_tf32` speed switch: GEMMs on TF32 tensor cores instead of float32 FMA (see `forward`).
        self.tf32_matmuls = False

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str] = DEFAULT_WAV2VEC,
        *,
        local_files_only: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        device: torch.device | str | None = None,
        config: AudioConfig | None = None,
    ) -> Wav2VecEncoder:
        """Load from a local folder (config.json, weights, preprocessor_config.json) or a hub id.

        A local folder is always read with `local_files_only`. For a hub id, pass
        `local_files_only=True` (or set HF_HUB_OFFLINE=1) to use only the local cache. Any failure
        is a one-line `CheckpointError` naming the folder or id.
        """
        from transformers import Wav2Vec2FeatureExtractor
        from transformers import Wav2Vec2Model as HFWav2Vec2Model

        source = os.fspath(name_or_path)
        path = Path(source).expanduser()
        is_folder = path.exists()
        if is_folder:
            if not path.is_dir():
                raise CheckpointError(f"wav2vec2 checkpoint must be a folder, got the file {path}")
            source, local_files_only = str(path), True
        elif _looks_like_path(source):
            raise CheckpointError(f"wav2vec2 folder not found: {path}")

        where = {"local_files_only": local_files_only, "cache_dir": cache_dir}
        try:
            model, info = HFWav2Vec2Model.from_pretrained(source, output_loading_info=True, **where)
        except Exception as error:  # transformers/hub raise many types; the user needs one line
            hint = " (offline and not in the local cache?)" if local_files_only and not is_folder else ""
            raise CheckpointError(f"cannot load wav2vec2 from {source!r}{hint}: {_first_line(error)}") from error
        # SpecAugment's mask embedding is only used in training; every other weight must be present.
        missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("masked_spec_embed"))
        if missing:
            raise CheckpointError(f"wav2vec2 checkpoint {source!r} lacks {len(missing)} weights, e.g. {missing[0]!r}")

        try:
            extractor = Wav2Vec2FeatureExtractor.from_pretrained(source, **where)
            normalize = bool(extractor.do_normalize)
        except Exception:
            logger.warning("no preprocessor_config.json for %s; assuming do_normalize=True", source)
            normalize = True
        encoder = cls(model, normalize=normalize, config=config)
        return encoder.to(device) if device is not None else encoder

    def train(self, mode: bool = True) -> Wav2VecEncoder:
        # Frozen feature extractor: dropout, LayerDrop and SpecAugment must never switch on.
        return super().train(False)

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def cnn_features(self, input_values: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B, n_samples) normalised samples -> (B, num_frames, conv_dim) CNN features at the video rate."""
        features = self.model.feature_extractor(input_values)  # (B, C, T50)  50 Hz
        features = F.interpolate(features, size=num_frames, mode="linear", align_corners=True)
        return features.transpose(1, 2)  # (B, S, C)

    def encode_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, S, conv_dim) CNN features -> (B, S, layers, hidden): every transformer layer's output."""
        hidden, _ = self.model.feature_projection(features)  # (B, S, hidden)
        layer_outputs: list[torch.Tensor] = []

        def record(_module: nn.Module, _args: object, output: torch.Tensor | tuple) -> None:
            # transformers 4.x layers return a tuple, 5.x a tensor.
            layer_outputs.append(output[0] if isinstance(output, tuple) else output)

        hooks = [layer.register_forward_hook(record) for layer in self.model.encoder.layers]
        try:
            last = self.model.encoder(hidden)[0]
        finally:
            for hook in hooks:
                hook.remove()
        if self.model.config.do_stable_layer_norm:
            # Pre-LN variants (e.g. wav2vec2-large-lv60) report the final LayerNorm's output as the
            # last hidden state; base-960h is post-LN and needs no fix-up.
            layer_outputs[-1] = last
        return torch.stack(layer_outputs, dim=2)

    @torch.no_grad()
    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """Raw samples at `config.sample_rate` -> per-video-frame features.

        Args:
            waveform: (n,) or (B, n) samples; each row is normalised over its whole length.

        Returns:
            (S, layers, hidden) or (B, S, layers, hidden) float32, S = int(n * fps / sample_rate).
        """
        waveform = torch.as_tensor(waveform)
        batched = waveform.ndim == 2
        samples = waveform if batched else waveform.unsqueeze(0)
        samples = samples.to(device=self.device, dtype=torch.float32, non_blocking=True)  # async from pinned memory
        num_frames = self.config.frames_for(samples.shape[-1])
        if num_frames < 1:
            raise AudioError(
                f"audio too short: {samples.shape[-1]} samples, need at least {self.config.samples_per_frame}"
            )
        if self.normalize:
            samples = normalize_waveform(samples)
        with tf32_matmuls(self.tf32_matmuls):
            features = self.cnn_features(samples.to(self.dtype), num_frames)
            out = self.encode_features(features).float()
        return out if batched else out[0]


_tf32_lock = threading.Lock()
_tf32_users = 0  # passes inside `tf32_matmuls` now, over all threads
_tf32_before = False  # the flag as it was when the first of them entered


@contextmanager
def tf32_matmuls(enabled: bool = True) -> Iterator[None]:
    """cuBLAS float32 GEMMs launched inside run on TF32 tensor cores (10-bit mantissa products, float32 sums).

    torch's flag is process-wide and read when each GEMM is launched, so setting it around eager code scopes it to
    the GEMMs launched meanwhile (another thread's float32 GEMMs in that time too). Overlapping uses, in several
    threads, leave the flag as the first one found it once the last one is done.
    cuDNN's convolutions are not touched: torch lets them use TF32 by default, in the plain path too.
    """
    global _tf32_users, _tf32_before
    if not enabled:
        yield
        return
    # `allow_tf32`, the flag the training loops set too: torch raises where it is mixed with `fp32_precision`.
    matmul = torch.backends.cuda.matmul
    with _tf32_lock:
        if _tf32_users == 0:
            _tf32_before = matmul.allow_tf32
            matmul.allow_tf32 = True
        _tf32_users += 1
    try:
        yield
    finally:
        with _tf32_lock:
            _tf32_users -= 1
            if _tf32_users == 0:
                matmul.allow_tf32 = _tf32_before


# ---------------------------------------------------------------------------------------------------
# Streaming: the Temporal Audio Context Cache


class AudioContextCache:
    """Temporal Audio Context Cache: the DiT audio context of each streaming chunk.

    An 8 s FIFO of samples starts as silence. Each `push` appends exactly one chunk's new samples
    (oldest fall out), encodes the whole buffer (200 frames) and returns the windows of its last
    `frame_num` frames, clamped at the buffer end. The first `frame_num - new_frames` frames of the
    context line up with the previous chunk's tail (the motion frames), the rest with the new samples.
    The per-chunk cost is one encoder pass over 8 s of audio, independent of how long the stream runs.
    """

    def __init__(self, encoder: AudioEncoder, new_frames: int, config: AudioConfig | None = None):
        """
        Args:
            encoder: waveform (n,) -> (frames, layers, hidden), e.g. a `Wav2VecEncoder`.
            new_frames: video frames each chunk adds (Lite 24, Pro 28; see `variant_new_frames`).
            config: audio timing.
        """
        self.config = config or AudioConfig()
        if not 0 < new_frames <= self.config.frame_num:
            raise ConfigError(f"new_frames must be in [1, {self.config.frame_num}], got {new_frames}")
        self.encoder = encoder
        self.new_frames = new_frames
        self.slice_samples = self.config.slice_samples(new_frames)
        self.reset()

    def reset(self) -> None:
        """Forget all audio: the buffer is silence again."""
        self._buffer = torch.zeros(self.config.cache_samples)
        self.chunks_pushed = 0

    @property
    def buffer(self) -> torch.Tensor:
        """A copy of the current FIFO contents, (cache_samples,) float32."""
        return self._buffer.clone()

    def push(self, samples: torch.Tensor | np.ndarray, *, pad: bool = False) -> torch.Tensor:
        """Append one chunk's new samples and return that chunk's audio context.

        Args:
            samples: (slice_samples,) new 16 kHz samples. With `pad=True` a shorter final slice is
                right-padded with silence, as the official script pads the end of the input.

        Returns:
            (1, frame_num, window, layers, hidden) float32.
        """
        self.append(samples, pad=pad)
        return self.context(self.encoder(self._buffer))

    def append(self, samples: torch.Tensor | np.ndarray, *, pad: bool = False) -> None:
        """The FIFO half of `push`: append one slice (the streaming engine then encodes many caches at once)."""
        new = check_waveform(samples)
        if new.numel() != self.slice_samples:
            if not (pad and new.numel() < self.slice_samples):
                raise AudioError(f"a chunk needs exactly {self.slice_samples} new samples, got {new.numel()}")
            new = F.pad(new, (0, self.slice_samples - new.numel()))
        self._buffer = torch.cat([self._buffer[self.slice_samples :], new.to(self._buffer.device)])
        self.chunks_pushed += 1

    def context(self, features: torch.Tensor) -> torch.Tensor:
        """The encoding half of `push`: windows of the last `frame_num` frames of the encoded buffer."""
        end = features.shape[0]
        if end < self.config.frame_num:
            raise ConfigError(f"encoder returned {end} frames for the cache, fewer than {self.config.frame_num}")
        return audio_windows(features, end - self.config.frame_num, end, self.config.window)[None]

    def iter_chunks(self, waveform: torch.Tensor | np.ndarray) -> Iterator[torch.Tensor]:
        """Stream a whole waveform: zero-pad its end to whole slices and yield each chunk's context."""
        padded = pad_to_multiple(check_waveform(waveform), self.slice_samples)
        for piece in padded.split(self.slice_samples):
            yield self.push(piece)


# ---------------------------------------------------------------------------------------------------
# Offline ("once") mode


@dataclass
class OfflineAudioContext:
    """Whole-file features of once mode, windowed per chunk on demand.

    Chunk i covers frames [i * new_frames, i * new_frames + frame_num); unlike streaming, its windows
    are clamped to the whole sequence, so frames near a chunk's end see the following audio.
    """

    features: torch.Tensor  # (S, layers, hidden)
    new_frames: int
    num_chunks: int
    config: AudioConfig

    def __len__(self) -> int:
        return self.num_chunks

    def __getitem__(self, index: int) -> torch.Tensor:
        """(1, frame_num, window, layers, hidden) context of chunk `index`."""
        if not -self.num_chunks <= index < self.num_chunks:
            raise IndexError(f"chunk {index} out of range for {self.num_chunks} chunks")
        start = (index % self.num_chunks) * self.new_frames
        end = start + self.config.frame_num
        windows = audio_windows(self.features, start, end, self.config.window, clamp_end=self.features.shape[0])
        return windows[None]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for index in range(self.num_chunks):
            yield self[index]


def encode_offline(
    encoder: AudioEncoder,
    waveform: torch.Tensor | np.ndarray,
    new_frames: int,
    config: AudioConfig | None = None,
    *,
    official_quirks: bool = False,
) -> OfflineAudioContext:
    """Once mode: encode the whole (padded) waveform in one pass and split it into chunks.

    The waveform is zero-padded so that its frame count is frame_num + k * new_frames. The official
    script then renders only k chunks, so the last new_frames frames of audio are never rendered
    (and are cut at muxing). By default all k + 1 chunks are returned; `official_quirks=True`
    reproduces the official k.

    The whole file goes through the encoder in one pass: memory grows with its length (about 1.5 GiB
    for 60 s and 6 GiB for 300 s in float32 on an H100, mostly the CNN) and attention work with its square.
    """
    config = config or AudioConfig()
    samples = check_waveform(waveform)
    padded_length = offline_padded_length(samples.numel(), new_frames, config)
    samples = F.pad(samples, (0, padded_length - samples.numel()))
    features = encoder(samples)  # (S, layers, hidden)
    num_chunks = (features.shape[0] - config.frame_num) // new_frames + (0 if official_quirks else 1)
    return OfflineAudioContext(features, new_frames, max(num_chunks, 0), config)
