"""WebSocket and WebRTC-signalling message schemas (the wire format documented in docs/serving.md).

A WebSocket session is one text `start` message, then binary audio messages (PCM of any length) and the text
messages `end` / `interrupt`. The server answers `ready`, then for every generated chunk one text `chunk`
header immediately followed by one binary payload: the chunk's encoded frames back to back, then its audio as
PCM16. A session closes with `done` (or `error`, after which the socket is closed).
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from flashhead.errors import AudioError

SAMPLE_RATE = 16000  # the only rate the server accepts; resample on the client
AudioFormat = Literal["pcm_s16le", "f32le"]
FrameEncoding = Literal["jpeg", "rgb24"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- client -> server -------------------------------------------------------------------------------


class StartMessage(_Message):
    """Opens a session. Exactly one of `portrait` (base64 image file) and `portrait_id` (from POST /v1/portraits)."""

    type: Literal["start"]
    portrait: str | None = None
    portrait_id: str | None = None
    crop: bool = True  # detect and crop the face of an inline `portrait`
    seed: int = 42
    realtime: bool = False  # a live source (microphone): the avatar keeps moving in silence
    sample_rate: int = SAMPLE_RATE
    format: AudioFormat = "pcm_s16le"
    encoding: FrameEncoding = "jpeg"
    jpeg_quality: int = Field(default=85, ge=10, le=100)

    @field_validator("sample_rate")
    @classmethod
    def _rate(cls, value: int) -> int:
        if value != SAMPLE_RATE:
            raise ValueError(f"sample_rate must be {SAMPLE_RATE} (mono PCM); resample on the client, got {value}")
        return value

    def portrait_bytes(self, max_bytes: int) -> bytes:
        if (self.portrait is None) == (self.portrait_id is None):
            raise ValueError("give exactly one of portrait (base64) and portrait_id")
        assert self.portrait is not None
        too_large = OverflowError(f"portrait larger than the {max_bytes}-byte limit")
        if len(self.portrait) > max_bytes * 4 // 3 + 4:  # refused before decoding
            raise too_large
        try:
            data = base64.b64decode(self.portrait, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("portrait is not valid base64") from None
        if len(data) > max_bytes:
            raise too_large
        return data


class EndMessage(_Message):
    """No more audio: the rest is generated, then the server sends the final chunk and `done`."""

    type: Literal["end"]


class InterruptMessage(_Message):
    """Drop the audio not generated yet (barge-in); the session stays open."""

    type: Literal["interrupt"]


ClientMessage = Annotated[StartMessage | EndMessage | InterruptMessage, Field(discriminator="type")]
client_message = TypeAdapter(ClientMessage)


# -- server -> client -------------------------------------------------------------------------------


class ReadyMessage(_Message):
    type: Literal["ready"] = "ready"
    session_id: str
    width: int
    height: int
    fps: int
    sample_rate: int
    chunk_frames: int  # new frames per chunk; a chunk needs chunk_frames / fps seconds of audio
    encoding: FrameEncoding
    realtime: bool


class ChunkHeader(_Message):
    """Precedes one binary message: frames[0] | frames[1] | ... | audio (PCM16 mono, `sample_rate`)."""

    type: Literal["chunk"] = "chunk"
    session_id: str
    index: int  # 0, 1, 2, ... per session
    start_frame: int  # index of the first frame since the session started
    num_frames: int
    pts: float  # start_frame / fps, seconds
    fps: int
    frame_bytes: list[int]  # length of each encoded frame in the payload, in order
    audio_bytes: int  # length of the PCM16 audio at the end of the payload (2 bytes per sample)
    latency_ms: float | None  # server side: chunk ready (its audio complete) -> handed to the socket
    final: bool


class ErrorMessage(_Message):
    """A failure; `fatal` errors are followed by the server closing the socket."""

    type: Literal["error"] = "error"
    code: str
    message: str
    fatal: bool = True


class DoneMessage(_Message):
    """The session's last message: every frame was sent. `reason`: end, max_duration or shutdown."""

    type: Literal["done"] = "done"
    session_id: str
    reason: str
    frames: int


class InterruptedMessage(_Message):
    type: Literal["interrupted"] = "interrupted"
    session_id: str


# -- WebRTC signalling ------------------------------------------------------------------------------


class WebRTCOffer(_Message):
    """POST /v1/webrtc/offer: the browser's SDP offer (audio sendrecv, video recvonly, a data channel)."""

    sdp: str
    type: Literal["offer"]
    portrait_id: str
    seed: int = 42


class WebRTCAnswer(_Message):
    sdp: str
    type: Literal["answer"] = "answer"
    session_id: str


# -- audio payloads ---------------------------------------------------------------------------------


def decode_pcm(data: bytes, fmt: AudioFormat) -> np.ndarray:
    """A binary audio message -> float32 samples in [-1, 1]; AudioError for a malformed payload."""
    width = 2 if fmt == "pcm_s16le" else 4
    if len(data) % width:
        raise AudioError(f"{fmt} audio message of {len(data)} bytes is not a whole number of {width}-byte samples")
    if fmt == "pcm_s16le":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
    if not np.isfinite(samples).all():
        raise AudioError("f32le audio message contains NaN or infinite samples")
    return samples


def encode_pcm16(samples: np.ndarray) -> bytes:
    """float32 in [-1, 1] -> little-endian PCM16 (clipped)."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def encode_frames(frames: np.ndarray, encoding: FrameEncoding, jpeg_quality: int = 85) -> list[bytes]:
    """(n, H, W, 3) uint8 -> one payload per frame: a JPEG file, or the raw RGB bytes (H * W * 3)."""
    if encoding == "rgb24":
        return [np.ascontiguousarray(f).tobytes() for f in frames]
    from PIL import Image

    out = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=jpeg_quality)
        out.append(buffer.getvalue())
    return out
