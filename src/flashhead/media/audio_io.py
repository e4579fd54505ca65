"""Decoding speech from any audio or video file into the mono waveform the models take.

`load_audio` is the one door audio files come through: WAV, MP3, M4A/AAC, FLAC, Ogg/Opus and the audio
track of MP4/MOV/MKV/WebM videos, at any sample rate and channel count. It decodes with PyAV, downmixes to
mono by averaging the channels, resamples with soxr and turns every failure into an `AudioError` with a
one-line message naming the file.

Silence is checked separately (`check_not_silent`): a file of silence is valid input for streaming, but a
video generated from it would show a closed mouth for its whole length, so the offline pipeline refuses it.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import av
import numpy as np
import soxr

from flashhead.errors import AudioError, FlashHeadError

logger = logging.getLogger(__name__)

MIN_DURATION = 0.1  # seconds; less than this is under three video frames at 25 fps
SILENCE_DBFS = -60.0  # speech recorded at any sane gain is 30 dB or more above this
TRUNCATION_TOLERANCE = 0.1  # seconds a header may promise beyond what decodes before we call the file truncated

# Demuxers whose header states the real length. Others (MP3, raw AAC) estimate it from the bit rate and can be
# off by seconds in either direction, so a shortfall there says nothing about truncation.
_EXACT_LENGTH_FORMATS = ("flac", "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")
_IMAGE_FORMATS = ("image2",)  # plus every "*_pipe" demuxer (png_pipe, jpeg_pipe, ...)


def load_audio(
    path: str | os.PathLike,
    target_sr: int = 16000,
    *,
    min_duration: float = MIN_DURATION,
    allow_partial: bool = False,
) -> tuple[np.ndarray, float]:
    """Decode an audio file, or the first audio track of a video, to a mono waveform.

    Args:
        path: any file FFmpeg reads: wav, mp3, m4a, aac, flac, ogg, opus, or a video (mp4, mov, mkv, webm).
        target_sr: sample rate of the result; the audio is resampled with soxr (high quality) if it differs.
        min_duration: refuse audio shorter than this many seconds.
        allow_partial: for a truncated or damaged file (its header promises more audio than decodes, or decoding
            fails part-way), return the audio that decodes and log a warning instead of raising.

    Returns:
        (waveform, duration): float32 array of shape (n,) at `target_sr`, the channels averaged, values as
        decoded (nominally in [-1, 1]); and its duration n / target_sr in seconds.

    Raises:
        AudioError: the file is missing, empty, not audio or video, has no audio track, is truncated or corrupt
            (unless `allow_partial`), or holds less than `min_duration` seconds of audio.
    """
    name = str(path)
    with open_media(path, AudioError, "audio") as container:
        if not container.streams.audio:
            if is_still_image(container) or not container.streams.video:
                raise AudioError(f"{name}: not an audio or video file")
            raise AudioError(f"{name}: has no audio track")
        stream = container.streams.audio[0]
        waveform, sample_rate, damage = decode_audio(container, stream)
        declared = _declared_seconds(path, container, stream)

    decoded = len(waveform) / sample_rate
    if damage is None and declared is not None and declared - decoded > TRUNCATION_TOLERANCE:
        damage = f"file is truncated (the header says {declared:.2f} s of audio, only {decoded:.2f} s is present)"
    if damage is not None:
        if not allow_partial or len(waveform) == 0:
            raise AudioError(f"{name}: {damage}")
        logger.warning("%s: %s; using the %.2f s that decoded", name, damage, decoded)
    if len(waveform) == 0:
        raise AudioError(f"{name}: the audio track holds no samples")
    if decoded < min_duration:
        raise AudioError(f"{name}: audio too short ({decoded:.3f} s); need at least {min_duration:g} s")
    bad = np.count_nonzero(~np.isfinite(waveform))
    if bad:  # only float formats can hold these; resampling would smear them over their neighbours
        raise AudioError(f"{name}: {bad} of its {len(waveform)} samples are NaN or infinite (a damaged float file)")

    if sample_rate != target_sr:
        waveform = soxr.resample(waveform, sample_rate, target_sr, quality="HQ")
    waveform = np.ascontiguousarray(waveform, dtype=np.float32)
    return waveform, len(waveform) / target_sr


def check_not_silent(
    waveform: np.ndarray,
    sample_rate: int = 16000,
    *,
    source: str | os.PathLike | None = None,
    threshold_dbfs: float = SILENCE_DBFS,
) -> float:
    """Raise `AudioError` if the audio is silent; return its level in dBFS otherwise.

    The level is the RMS of the loudest tenth of the audio, measured in 50 ms windows, so long pauses or silent
    lead-in and tail do not make speech count as silence.

    Args:
        waveform: mono audio, shape (n,), full scale 1.0.
        sample_rate: its sample rate (sets the window length).
        source: the file it came from, for the message.
        threshold_dbfs: audio whose level is below this is silent.
    """
    level = active_level_dbfs(waveform, sample_rate)
    name = f"{source}: audio" if source is not None else "audio"
    if level == -math.inf:
        raise AudioError(f"{name} is silent (every sample is zero)")
    if level < threshold_dbfs:
        raise AudioError(f"{name} is silent (level {level:.0f} dBFS, below {threshold_dbfs:.0f} dBFS)")
    return level


def active_level_dbfs(waveform: np.ndarray, sample_rate: int = 16000) -> float:
    """RMS level in dBFS of the loudest 10 % of 50 ms windows (-inf for digital silence)."""
    x = np.asarray(waveform, dtype=np.float64).reshape(-1)
    window = max(1, round(0.05 * sample_rate))
    n = len(x) // window
    if n == 0:
        power = np.array([np.mean(x**2)]) if len(x) else np.zeros(1)
    else:
        power = np.mean(x[: n * window].reshape(n, window) ** 2, axis=1)
    loudest = np.sort(power)[-max(1, len(power) // 10) :]
    rms = math.sqrt(float(np.mean(loudest)))
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def open_media(path: str | os.PathLike, error: type[FlashHeadError], what: str) -> av.container.InputContainer:
    """Open a media file for reading with PyAV, turning every failure into `error` with a one-line message.

    `what` names the expected content in messages ("audio", "video").
    """
    path = Path(path)
    if not path.exists():
        raise error(f"{path}: {what} file not found")
    if not path.is_file():
        raise error(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise error(f"{path}: {what} file is empty")
    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        if _looks_like_mp4(path):
            raise error(
                f"{path}: incomplete or damaged MP4/MOV file "
                "(its index is missing; was it cut off while being written?)"
            ) from None
        reason = getattr(e, "strerror", None) or str(e)
        raise error(f"{path}: not a readable audio or video file ({reason})") from None


def decode_audio(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream
) -> tuple[np.ndarray, int, str | None]:
    """Decode one audio stream to float32 mono at its own rate.

    Returns (waveform, sample_rate, damage): `damage` describes a decoding failure part-way through, in which case
    the waveform holds what decoded before it (possibly nothing); None when the whole stream decoded.
    """
    sample_rate = None  # from the decoded frames: headers can be wrong (HE-AAC reports half the rate)
    setup = None
    chunks: list[np.ndarray] = []
    damage = None
    try:
        for packet in container.demux(stream):
            for frame in packet.decode():
                if (frame.layout.name, frame.sample_rate) != setup:  # some broadcasts switch layout mid-stream
                    setup = (frame.layout.name, frame.sample_rate)
                    to_float = av.AudioResampler(format="fltp")  # keeps layout and rate, makes samples float
                sample_rate = sample_rate or frame.sample_rate
                for converted in to_float.resample(frame):
                    chunk = converted.to_ndarray().mean(axis=0)  # (channels, n) -> (n,)
                    if frame.sample_rate != sample_rate:
                        chunk = soxr.resample(chunk, frame.sample_rate, sample_rate)
                    chunks.append(chunk)
    except av.FFmpegError as e:
        damage = f"corrupt audio data ({getattr(e, 'strerror', None) or e})"
    sample_rate = sample_rate or stream.rate
    if not sample_rate:
        raise AudioError(f"{container.name}: the audio track has no sample rate")
    waveform = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return waveform, int(sample_rate), damage


def _declared_seconds(path: str | os.PathLike, container, stream) -> float | None:
    """How long the file's header says the audio is, where the header is trustworthy; None if unknown."""
    if container.format.name == "wav":
        return _wav_declared_seconds(Path(path))
    if container.format.name not in _EXACT_LENGTH_FORMATS:
        return None
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _wav_declared_seconds(path: Path) -> float | None:
    """Length promised by a RIFF/WAVE header's data chunk. FFmpeg clamps it to the file size, so we read it."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    byte_rate = None
    pos = 12
    while pos + 8 <= len(head):
        chunk, size = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if chunk == b"fmt " and pos + 20 <= len(head):
            byte_rate = int.from_bytes(head[pos + 16 : pos + 20], "little")
        elif chunk == b"data":
            # 0 and 0xFFFFFFFF are what streaming writers put there before they know the length.
            if not byte_rate or size in (0, 0xFFFFFFFF):
                return None
            return size / byte_rate
        pos += 8 + size + (size & 1)
    return None


def _looks_like_mp4(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(12)
    return head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide")


def is_still_image(container: av.container.InputContainer) -> bool:
    """Whether FFmpeg opened the file with one of its still-image demuxers (image2, png_pipe, ...)."""
    name = container.format.name
    return name in _IMAGE_FORMATS or name.endswith("_pipe")
