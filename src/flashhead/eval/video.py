"""Reading the videos under evaluation: RGB frames, frame rate and the audio track.

Uses `flashhead.media.video_io.read_video` when that module is present (audio resampled with soxr);
otherwise PyAV directly. Either way the result is a `Clip` of uint8 frames (T, H, W, 3) and, when the file has one,
mono float32 audio at `audio_rate` Hz (16 kHz by default, what SyncNet expects).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flashhead.errors import MediaError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")


@dataclass
class Clip:
    """A decoded video: frames (T, H, W, 3) uint8 RGB at `fps`, and mono audio (S,) float32 in [-1, 1]."""

    frames: np.ndarray
    fps: float
    audio: np.ndarray | None = None
    audio_rate: int = 16000
    name: str = ""

    @property
    def duration(self) -> float:
        return len(self.frames) / self.fps


def _open(path: Path):
    import av

    if not path.is_file():
        raise MediaError(f"{path}: no such video file")
    try:
        return av.open(str(path))
    except Exception as e:  # PyAV raises a zoo of FFmpeg error types
        raise MediaError(f"{path}: cannot open as a video ({e.__class__.__name__}: {e})") from None


def iter_frames(path: str | Path, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Decode RGB frames one at a time (for videos too long to hold in memory)."""
    path = Path(path)
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError(f"{path}: has no video stream")
        try:
            for i, frame in enumerate(container.decode(video=0)):
                if max_frames is not None and i >= max_frames:
                    return
                yield frame.to_ndarray(format="rgb24")
        except Exception as e:
            if isinstance(e, MediaError):
                raise
            raise MediaError(f"{path}: decoding failed ({e.__class__.__name__}: {e})") from None


def _read_audio(container, rate: int) -> np.ndarray | None:
    import av

    if not container.streams.audio:
        return None
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    chunks = []
    for frame in container.decode(audio=0):
        for out in resampler.resample(frame):
            chunks.append(out.to_ndarray().reshape(-1))
    for out in resampler.resample(None):
        chunks.append(out.to_ndarray().reshape(-1))
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def _read_with_media_module(path: Path, max_frames: int | None, audio: bool, audio_rate: int) -> Clip | None:
    try:
        from flashhead.media.video_io import read_video
    except ImportError:
        return None
    frames, fps, track = read_video(path, max_frames=max_frames)
    samples = None
    if audio and track is not None:
        waveform, rate = track
        samples = np.asarray(waveform, dtype=np.float32).reshape(-1)
        if rate != audio_rate:
            import soxr

            samples = soxr.resample(samples, rate, audio_rate, quality="HQ").astype(np.float32)
    return Clip(frames, fps or 25.0, samples, audio_rate, name=path.stem)


def _read_with_pyav(path: Path, max_frames: int | None, audio: bool, audio_rate: int) -> Clip:
    frames = list(iter_frames(path, max_frames))
    if not frames:
        raise MediaError(f"{path}: no video frame could be decoded")
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 25)
        samples = None
        if audio:
            try:
                samples = _read_audio(container, audio_rate)
            except Exception as e:
                log.warning("%s: audio track unreadable (%s); continuing without audio", path, e)
    return Clip(np.stack(frames), fps, samples, audio_rate, name=path.stem)


def load_clip(path: str | Path, max_frames: int | None = None, audio: bool = True, audio_rate: int = 16000) -> Clip:
    """Decode a whole video file.

    Args:
        path: the video file.
        max_frames: keep at most this many frames (the audio is cut to the same duration).
        audio: also decode the first audio stream, downmixed to mono and resampled to `audio_rate`.

    Raises:
        MediaError: the file is missing, not a video, or truncated so that no frame decodes.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: no such video file")
    clip = _read_with_media_module(path, max_frames, audio, audio_rate) or _read_with_pyav(
        path, max_frames, audio, audio_rate
    )
    if clip.audio is not None and max_frames is not None:
        clip.audio = clip.audio[: int(round(len(clip.frames) / clip.fps * audio_rate))]
    return clip


def list_videos(folder: str | Path) -> dict[str, Path]:
    """Video files directly in `folder`, keyed by file stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MediaError(f"{folder}: not a folder of videos")
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()}
