"""Writing generated frames and speech to an MP4, and reading videos back.

`VideoWriter` encodes uint8 RGB frames to H.264 (yuv420p, no B-frames, so a player can show each frame as soon
as its packet arrives) and muxes the speech as AAC, trimmed or padded to the video's length. It writes to a
hidden temporary file next to the output and renames it into place only when everything succeeded, so an
interrupted run never leaves a half-written MP4 behind, nor replaces a good one. Every file carries a
provenance record in its metadata saying that it is AI-generated, by which flashhead version and model.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import os
import re
import secrets
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import soxr

from flashhead import __version__
from flashhead.errors import ConfigError, MediaError
from flashhead.media.audio_io import decode_audio, open_media
from flashhead.pipeline.speed import VIDEO_ENCODERS

logger = logging.getLogger(__name__)

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
# H.264 encoders (VIDEO_ENCODERS, the `video_encoder` speed switch's choices): x264 on the CPU, NVENC on NVIDIA GPUs
# that have the encoder block (not H100 / H200 / A100), or "auto": NVENC where it opens, else x264.
# x264 presets -> the nearest NVENC ones (p1 fastest ... p7 best).
NVENC_PRESETS = {"ultrafast": "p1", "superfast": "p1", "veryfast": "p2", "faster": "p3", "fast": "p3",
                 "medium": "p4", "slow": "p5", "slower": "p6", "veryslow": "p7"}  # fmt: skip
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
AI_GENERATED_NOTICE = (
    "AI-generated video: a synthetic talking head made with flashhead {version}; it shows no real event."
)


def provenance_tags(metadata: dict[str, Any] | None = None) -> dict[str, str]:
    """The MP4 metadata tags that mark a file as flashhead output.

    `comment` holds a sentence for people; `description` holds a JSON record for programs: generator, the
    statement that the video is AI-generated, the UTC creation time, and every item of `metadata` (model, seed,
    ...). Both are standard MP4 tags (`©cmt`, `desc`), which FFmpeg, exiftool and most players read.
    """
    record: dict[str, Any] = {
        "generator": f"flashhead {__version__}",
        "ai_generated": True,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    record.update(metadata or {})
    return {
        "comment": AI_GENERATED_NOTICE.format(version=__version__),
        "description": json.dumps(record, default=str),
    }


# Data-centre GPUs built without the NVENC block (NVIDIA's video encode/decode support matrix): FFmpeg then fails
# with a generic "error in an external library", so the reason is said by name instead.
GPUS_WITHOUT_NVENC = ("A100", "A30", "A800", "H100", "H800", "H200", "H20")


def _cuda_gpu_name() -> str | None:
    """The current CUDA GPU's name where this process already uses CUDA through torch (it neither imports torch nor
    initialises CUDA: a CPU-only job on a GPU machine, or a forked worker, stays as it is)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    return torch.cuda.get_device_name()


@functools.cache
def nvenc_unavailable_reason() -> str | None:
    """None when this process can open FFmpeg's NVENC H.264 encoder; else why not, in one line (checked once)."""
    gpu = _cuda_gpu_name()
    if gpu and any(re.search(rf"\b{model}\b", gpu) for model in GPUS_WITHOUT_NVENC):
        return f"the {gpu} has no NVENC video encoder"
    if "h264_nvenc" not in av.codecs_available:
        return "this FFmpeg build has no h264_nvenc"
    try:
        context = av.CodecContext.create("h264_nvenc", "w")
        context.width, context.height, context.pix_fmt = 256, 256, "yuv420p"
        context.time_base = Fraction(1, 25)
        context.open()  # loads the driver's encoder library and opens a session on the GPU
    except (av.FFmpegError, OSError, ValueError) as e:
        return f"h264_nvenc does not open here ({' '.join(str(e).split())})"
    return None


def resolve_encoder(encoder: str) -> str:
    """The H.264 encoder a writer asked for `encoder` uses: "auto" is h264_nvenc where it opens, else libx264."""
    if encoder not in VIDEO_ENCODERS:
        raise ConfigError(f"video encoder must be one of {', '.join(VIDEO_ENCODERS)}, not {encoder!r}")
    if encoder == "auto":
        return "libx264" if nvenc_unavailable_reason() else "h264_nvenc"
    if encoder == "h264_nvenc" and (reason := nvenc_unavailable_reason()):
        raise MediaError(f"video encoder h264_nvenc: {reason}; use libx264 or auto")
    return encoder


class VideoWriter:
    """Write an H.264 + AAC MP4, frame chunk by frame chunk, atomically.

    Use as a context manager::

        with VideoWriter("out.mp4", metadata={"model": "lite", "seed": 42}) as writer:
            writer.set_audio(waveform, 16000)
            for chunk in chunks:
                writer.write_frames(chunk)

    The file appears at `path` when the block ends without an exception; on any exception, KeyboardInterrupt
    included, the temporary file is deleted and `path` is left as it was.

    Args:
        path: the MP4 to write (any existing file is replaced on success).
        fps: frame rate.
        crf: x264 constant rate factor, 0 (lossless) to 51; 18 is visually lossless for most content.
        preset: x264 speed/size trade-off ("ultrafast" ... "veryslow"; NVENC gets the nearest of its p1-p7).
        encoder: "libx264" (CPU), "h264_nvenc" (the GPU's video encoder; a MediaError where it is missing) or
            "auto" (NVENC where it opens, else x264). NVENC takes `crf` as its constant-quality level (`cq`).
        metadata: items added to the provenance record (see `provenance_tags`).
        audio, sample_rate: the speech, if known up front (same as calling `set_audio`).
        audio_bitrate: AAC bit rate in bit/s.

    Audio given before the first frames is muxed as the frames arrive, so memory stays flat for long streams;
    audio given later makes the writer hold the encoded video packets (a few MB a minute) until it arrives.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        fps: int | Fraction = 25,
        crf: int = 18,
        preset: str = "medium",
        encoder: str = "libx264",
        metadata: dict[str, Any] | None = None,
        audio: np.ndarray | None = None,
        sample_rate: int | None = None,
        audio_bitrate: int = 96_000,
    ) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise MediaError(f"{self.path}: output folder does not exist")
        if not 0 <= crf <= 51:
            raise ConfigError(f"crf must be between 0 and 51, not {crf}")
        if fps <= 0:
            raise ConfigError(f"fps must be positive, not {fps}")
        if preset not in X264_PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(X264_PRESETS)}, not {preset!r}")
        self.fps = Fraction(fps)
        self.crf = crf
        self.preset = preset
        self.encoder = resolve_encoder(encoder)  # before any file exists: a missing encoder leaves nothing behind
        self._auto = encoder == "auto"
        self.tags = provenance_tags(metadata)
        self.audio_bitrate = audio_bitrate
        self.frames_written = 0

        self._tmp: Path | None = None
        self._container: av.container.OutputContainer | None = None
        self._video = None
        self._size: tuple[int, int] | None = None  # (height, width)
        self._held: list[av.Packet] = []  # video packets waiting until we know whether audio comes
        self._audio_known = False  # set_audio was called, or close() began (no audio then)
        self._audio: np.ndarray | None = None  # mono float32 at _audio_rate
        self._audio_rate = 0
        self._audio_stream = None
        self._audio_muxed = 0  # samples of _audio already handed to the encoder
        self._closed = False
        if audio is not None:
            if sample_rate is None:
                raise MediaError("sample_rate is required with audio")
            self.set_audio(audio, sample_rate)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def write_frames(self, frames: np.ndarray) -> None:
        """Append frames: uint8 RGB of shape (T, H, W, 3), or one (H, W, 3) frame. All frames share one size."""
        frames = self._check_frames(frames)
        if len(frames) == 0:
            return
        if self._container is None:
            self._open(frames.shape[1], frames.shape[2])
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts = self.frames_written
            self.frames_written += 1
            self._emit(self._video.encode(video_frame))

    def set_audio(self, waveform: np.ndarray, sample_rate: int) -> None:
        """Mux this mono waveform (shape (n,), full scale 1.0) as the soundtrack; call once.

        Audio longer than the video is cut at the video's end, shorter audio is padded with silence, so both
        streams end within one AAC frame of each other. Rates AAC lacks are resampled to 48 kHz.
        """
        if self._closed:
            raise MediaError(f"{self.path}: writer is closed")
        if self._audio is not None:
            raise MediaError(f"{self.path}: audio was already set")
        audio = np.asarray(waveform, dtype=np.float32).squeeze()
        if audio.ndim != 1:
            raise MediaError(f"audio must be a mono waveform of shape (n,), not {tuple(np.shape(waveform))}")
        if sample_rate <= 0:
            raise MediaError(f"sample rate must be positive, not {sample_rate}")
        if sample_rate not in AAC_RATES:
            audio = soxr.resample(audio, sample_rate, 48000, quality="HQ")
            sample_rate = 48000
        self._audio = np.ascontiguousarray(np.clip(audio, -1.0, 1.0))
        self._audio_rate = sample_rate
        if self._container is not None:
            self._add_audio_stream()
            self._release_held()
        self._audio_known = True

    def close(self) -> Path:
        """Finish encoding, write the file and move it into place; returns the path."""
        if self._closed:
            return self.path
        if self._container is None:
            self.abort()
            raise MediaError(f"{self.path}: no frames were written")
        try:
            self._release_held()
            self._emit(self._video.encode(None))
            if self._audio_stream is not None:
                # Like ffmpeg -shortest, but never dropping frames: cut or pad the audio to the video's length.
                self._mux_audio_until(float(self.frames_written / self.fps), pad=True)
                for packet in self._audio_stream.encode(None):
                    self._container.mux(packet)
            self._container.close()
            with open(self._tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self._tmp, self.path)
        except BaseException as e:
            self.abort()
            if isinstance(e, (av.FFmpegError, OSError)):
                raise MediaError(f"{self.path}: could not write the video ({e})") from None
            raise
        self._closed = True
        return self.path

    def abort(self) -> None:
        """Stop writing and delete the temporary file; `path` is left untouched."""
        self._closed = True
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.close()
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()

    def _check_frames(self, frames: np.ndarray) -> np.ndarray:
        if self._closed:
            raise MediaError(f"{self.path}: writer is closed")
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise MediaError(f"frames must be RGB of shape (T, H, W, 3) or (H, W, 3), not {frames.shape}")
        if frames.dtype != np.uint8:
            raise MediaError(f"frames must be uint8, not {frames.dtype}")
        height, width = frames.shape[1:3]
        if self._size is not None and (height, width) != self._size:
            raise MediaError(f"frame size changed from {self._size[1]}x{self._size[0]} to {width}x{height}")
        if height % 2 or width % 2:
            raise MediaError(f"frame size {width}x{height} must be even for yuv420p H.264")
        return frames

    def _open(self, height: int, width: int) -> None:
        self._size = (height, width)
        # A hidden name in the output folder, so the final rename is atomic (same file system). Created with
        # open("x") rather than mkstemp, whose 0600 mode would make the finished video private to its owner.
        self._tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.part")
        self._tmp.open("xb").close()
        try:
            self._container = av.open(str(self._tmp), mode="w", format="mp4", options={"movflags": "+faststart"})
            self._container.metadata.update(self.tags)
            # bf=0: no B-frames, so every packet decodes to a frame at once (low-latency playback and streaming).
            if self.encoder == "h264_nvenc":
                options = {"rc": "vbr", "cq": str(self.crf), "preset": NVENC_PRESETS[self.preset], "bf": "0"}
            else:
                options = {"crf": str(self.crf), "preset": self.preset, "bf": "0"}
            self._video = self._container.add_stream(self.encoder, rate=self.fps, options=options)
            self._video.width, self._video.height = width, height
            self._video.pix_fmt = "yuv420p"
            if self.encoder == "h264_nvenc" and self._auto:
                try:  # now, not at the first frame: a GPU out of encoder sessions falls back to x264
                    self._video.codec_context.open()
                except av.FFmpegError as e:
                    logger.warning("%s: NVENC did not open (%s); encoding with libx264", self.path, e)
                    self._container.close()
                    self._tmp.unlink()
                    self._container, self.encoder = None, "libx264"
                    return self._open(height, width)
            if self._audio is not None:
                self._add_audio_stream()
        except BaseException:
            self.abort()
            raise

    def _add_audio_stream(self) -> None:
        self._audio_stream = self._container.add_stream("aac", rate=self._audio_rate, layout="mono")
        self._audio_stream.bit_rate = self.audio_bitrate

    def _emit(self, packets: list[av.Packet]) -> None:
        """Mux video packets, each after the audio up to its time; hold them while the audio is still unknown."""
        if not self._audio_known:
            self._held.extend(packets)
            return
        for packet in packets:
            if self._audio_stream is not None:
                self._mux_audio_until(float(packet.pts * packet.time_base + 1 / self.fps))
            self._container.mux(packet)

    def _release_held(self) -> None:
        self._audio_known = True
        held, self._held = self._held, []
        self._emit(held)

    def _mux_audio_until(self, seconds: float, pad: bool = False) -> None:
        end = round(seconds * self._audio_rate)
        if not pad:
            end = min(end, len(self._audio))
        start = self._audio_muxed
        if end <= start:
            return
        chunk = self._audio[start:end]
        if len(chunk) < end - start:
            chunk = np.concatenate([chunk, np.zeros(end - start - len(chunk), np.float32)])
        frame = av.AudioFrame.from_ndarray(chunk[None], format="flt", layout="mono")
        frame.sample_rate = self._audio_rate
        frame.pts = start
        for packet in self._audio_stream.encode(frame):
            self._container.mux(packet)
        self._audio_muxed = end


def read_video(
    path: str | os.PathLike, *, max_frames: int | None = None
) -> tuple[np.ndarray, float, tuple[np.ndarray, int] | None]:
    """Decode a video file.

    Returns:
        (frames, fps, audio): uint8 RGB frames (T, H, W, 3) (the first `max_frames` if given); the frame rate;
        and (mono float32 waveform, sample rate) of the first audio track, or None if there is none.

    Raises:
        MediaError: the file is missing, empty, corrupt, or has no video track.
    """
    with open_media(path, MediaError, "video") as container:
        if not container.streams.video:
            raise MediaError(f"{path}: has no video track")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        frames = []
        try:
            for frame in container.decode(stream):
                if max_frames is not None and len(frames) >= max_frames:
                    break
                frames.append(frame.to_ndarray(format="rgb24"))
        except av.FFmpegError as e:
            if not frames:
                raise MediaError(f"{path}: video could not be decoded ({getattr(e, 'strerror', None) or e})") from None
        if not frames:
            raise MediaError(f"{path}: the video track holds no frames")
    audio = None
    with open_media(path, MediaError, "video") as container:
        if container.streams.audio:
            waveform, sample_rate, _ = decode_audio(container, container.streams.audio[0])
            audio = (waveform, sample_rate)
    return np.stack(frames), fps, audio


def probe(path: str | os.PathLike) -> dict[str, Any]:
    """Describe a media file from its headers (no decoding).

    Returns a dict with: format, duration (s), metadata (container tags); video_codec, profile, pix_fmt, width,
    height, fps, frames, video_duration, b_frames (whether frames are reordered); audio_codec, sample_rate,
    channels, audio_duration. Stream keys are None when the file lacks that stream.
    """
    with open_media(path, MediaError, "media") as container:
        info: dict[str, Any] = {
            "format": container.format.name,
            "duration": container.duration / av.time_base if container.duration is not None else None,
            "metadata": dict(container.metadata),
        }
        info.update(dict.fromkeys(["video_codec", "profile", "pix_fmt", "width", "height", "fps", "frames"]))
        info.update(dict.fromkeys(["video_duration", "b_frames", "audio_codec", "sample_rate", "channels"]))
        info["audio_duration"] = None
        if container.streams.video:
            video = container.streams.video[0]
            context = video.codec_context
            info.update(
                video_codec=context.name,
                profile=context.profile,
                pix_fmt=context.format.name if context.format else None,
                width=context.width,
                height=context.height,
                fps=float(video.average_rate or video.guessed_rate or 0),
                frames=video.frames or sum(1 for p in container.demux(video) if p.size),
                video_duration=_stream_seconds(video),
                b_frames=bool(context.has_b_frames),
            )
        if container.streams.audio:
            audio = container.streams.audio[0]
            info.update(
                audio_codec=audio.codec_context.name,
                sample_rate=audio.rate,
                channels=audio.channels,
                audio_duration=_stream_seconds(audio),
            )
    return info


def read_provenance(path: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance record flashhead wrote into a video's metadata, or None if it has none."""
    with open_media(path, MediaError, "video") as container:
        description = container.metadata.get("description", "")
    try:
        record = json.loads(description)
    except json.JSONDecodeError:
        return None
    if isinstance(record, dict) and str(record.get("generator", "")).startswith("flashhead"):
        return record
    return None


def _stream_seconds(stream) -> float | None:
    if stream.duration is None or not stream.time_base:
        return None
    return float(stream.duration * stream.time_base)
