"""A parameter-free audio encoder: log-mel spectrogram frames at the video rate.

flashhead-tiny cannot carry wav2vec2-base (95 M parameters, 360 MB) inside a 20 MB package, and a lip
needs little more than the spectral envelope of the last few tens of milliseconds. This encoder has the
same contract as `Wav2VecEncoder`: waveform (n,) or (B, n) at 16 kHz -> (S, layers, hidden) per video
frame, S = n * fps // sample_rate. Each video frame (40 ms) gets the two 20 ms mel frames centred in its
first and second half, stacked as two "layers", so the DiT's audio projection reads them like wav2vec's
layer stack.

Loudness: speech is scaled to a fixed active level first (RMS over the 20 ms frames that are not
silent), so a quiet microphone and a loud TTS give the same features, silence stays silence (it is never
amplified), and leading silence in the streaming cache does not change the level of what follows.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flashhead.errors import AudioError, CheckpointError

CONFIG_NAME = "config.json"
CLASS_NAME = "MelAudioEncoder"


@dataclass(frozen=True)
class MelConfig:
    sample_rate: int = 16000
    fps: int = 25
    n_mels: int = 64
    n_fft: int = 512
    win_length: int = 400  # 25 ms
    frames_per_video_frame: int = 2  # hop = sample_rate / fps / 2 = 320 samples (20 ms)
    f_min: float = 50.0
    f_max: float = 7600.0
    target_rms: float = 0.1  # active speech level after gain (-20 dBFS)
    silence_rms: float = 0.003  # 20 ms frames below this (-50 dBFS) are silence
    max_gain: float = 30.0
    log_floor: float = 1e-6
    log_offset: float = 5.0  # (log(power) + offset) / scale puts speech roughly in [-2, 2]
    log_scale: float = 4.0

    @property
    def hop_length(self) -> int:
        return self.sample_rate // self.fps // self.frames_per_video_frame


class MelAudioEncoder(nn.Module):
    """Log-mel features per video frame: (S, frames_per_video_frame, n_mels)."""

    def __init__(self, config: MelConfig | None = None) -> None:
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        self.mel_config = c = config or MelConfig()
        if (c.sample_rate // c.fps) % c.frames_per_video_frame:
            raise AudioError("samples per video frame must split evenly into mel frames")
        bank = mel_filter_bank(
            num_frequency_bins=c.n_fft // 2 + 1,
            num_mel_filters=c.n_mels,
            min_frequency=c.f_min,
            max_frequency=c.f_max,
            sampling_rate=c.sample_rate,
            norm="slaney",
            mel_scale="slaney",
        )
        self.register_buffer("mel_bank", torch.as_tensor(bank, dtype=torch.float32), persistent=False)
        self.register_buffer("window", torch.hann_window(c.win_length), persistent=False)

    # The Wav2VecEncoder-like surface the pipeline and the trainer use.
    @property
    def num_layers(self) -> int:
        return self.mel_config.frames_per_video_frame

    @property
    def hidden_size(self) -> int:
        return self.mel_config.n_mels

    @property
    def device(self) -> torch.device:
        return self.mel_bank.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def train(self, mode: bool = True) -> MelAudioEncoder:
        return super().train(False)

    def _gain(self, samples: torch.Tensor) -> torch.Tensor:
        """(B, n) -> (B, 1): the gain that brings each row's active (non-silent) level to target_rms."""
        c = self.mel_config
        hop = c.hop_length
        n = samples.shape[-1] // hop * hop
        frame_rms = samples[:, :n].unflatten(1, (-1, hop)).pow(2).mean(-1).sqrt()  # (B, frames)
        active = frame_rms > c.silence_rms
        power = (frame_rms.pow(2) * active).sum(1) / active.sum(1).clamp(min=1)
        gain = c.target_rms / power.sqrt().clamp(min=1e-8)
        gain = torch.where(active.any(1), gain.clamp(max=c.max_gain), torch.ones_like(gain))
        return gain[:, None]

    @torch.no_grad()
    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """Raw samples -> (S, layers, n_mels) or (B, S, layers, n_mels) float32, S = n * fps // sample_rate."""
        c = self.mel_config
        waveform = torch.as_tensor(waveform)
        batched = waveform.ndim == 2
        # Async from pinned memory (the engine's side-stream audio): a blocking copy would hold the host.
        samples = (waveform if batched else waveform.unsqueeze(0)).to(self.device, torch.float32, non_blocking=True)
        num_frames = samples.shape[-1] * c.fps // c.sample_rate
        if num_frames < 1:
            raise AudioError(f"audio too short: {samples.shape[-1]} samples, need {c.sample_rate // c.fps}")
        samples = samples * self._gain(samples)
        hop = c.hop_length
        # Mel frame k is centred on sample k * hop + hop / 2: video frame s owns frames 2s and 2s + 1.
        padded = F.pad(samples, (c.n_fft // 2 - hop // 2, c.n_fft // 2))
        spec = torch.stft(
            padded, c.n_fft, hop_length=hop, win_length=c.win_length, window=self.window, center=False,
            return_complex=True,
        )  # fmt: skip
        power = spec[..., : num_frames * c.frames_per_video_frame].abs().pow(2)  # (B, freq, frames)
        mel = torch.einsum("bft,fm->btm", power, self.mel_bank)
        features = (mel.clamp(min=c.log_floor).log() + c.log_offset) / c.log_scale
        out = features.unflatten(1, (num_frames, c.frames_per_video_frame))  # (B, S, layers, n_mels)
        return out if batched else out[0]

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps({"_class_name": CLASS_NAME, **asdict(self.mel_config)}, indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str]) -> MelAudioEncoder:
        path = Path(folder) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read the mel encoder config ({e})") from e
        if data.pop("_class_name", None) != CLASS_NAME:
            raise CheckpointError(f"{path}: not a {CLASS_NAME} config")
        known = {f.name for f in fields(MelConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"{path}: unknown mel encoder settings {unknown}")
        return cls(MelConfig(**data))
