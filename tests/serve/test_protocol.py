"""Wire-format helpers and back-pressure objects, without a server."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
from pydantic import ValidationError

from flashhead.errors import AudioError, CapacityError
from flashhead.serve.auth import BearerAuth
from flashhead.serve.limits import Admission, ChunkQueue
from flashhead.serve.protocol import client_message, decode_pcm, encode_frames, encode_pcm16


def test_pcm_round_trip_and_malformed_payloads():
    samples = np.linspace(-1, 1, 101, dtype=np.float32)
    decoded = decode_pcm(encode_pcm16(samples), "pcm_s16le")
    assert np.abs(decoded - samples).max() < 1e-4
    with pytest.raises(AudioError, match="whole number of 2-byte samples"):
        decode_pcm(b"\x00\x01\x02", "pcm_s16le")
    with pytest.raises(AudioError, match="NaN"):
        decode_pcm(np.array([0.1, np.nan], "<f4").tobytes(), "f32le")
    assert decode_pcm(np.array([0.5], "<f4").tobytes(), "f32le")[0] == 0.5


def test_start_message_validation():
    start = client_message.validate_json('{"type": "start", "portrait_id": "p-1"}')
    assert start.sample_rate == 16000 and start.format == "pcm_s16le" and not start.realtime
    with pytest.raises(ValidationError, match="sample_rate must be 16000"):
        client_message.validate_json('{"type": "start", "portrait_id": "p", "sample_rate": 44100}')
    with pytest.raises(ValidationError):
        client_message.validate_json('{"type": "start", "portrait_id": "p", "volume": 3}')  # unknown field
    with pytest.raises(ValidationError):
        client_message.validate_json('{"type": "dance"}')
    encoded = base64.b64encode(b"abc").decode()
    inline = client_message.validate_json(json.dumps({"type": "start", "portrait": encoded}))
    assert inline.portrait_bytes(10) == b"abc"
    with pytest.raises(OverflowError):
        inline.portrait_bytes(1)
    with pytest.raises(ValueError, match="base64"):
        client_message.validate_json('{"type": "start", "portrait": "not base64!"}').portrait_bytes(100)


def test_encode_frames():
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 64, 3), dtype=np.uint8)
    raw = encode_frames(frames, "rgb24")
    assert [len(f) for f in raw] == [32 * 64 * 3] * 3 and raw[1] == frames[1].tobytes()
    assert all(f[:2] == b"\xff\xd8" for f in encode_frames(frames, "jpeg"))  # JPEG SOI marker


def test_chunk_queue_is_bounded_and_fails_fast():
    async def run():
        queue: ChunkQueue[int] = ChunkQueue(2)
        assert queue.offer(1) and queue.offer(2)
        assert not queue.offer(3)  # full: the owner fails the session instead of waiting
        assert await queue.get() == 1
        queue.fail(RuntimeError("slow"))
        with pytest.raises(RuntimeError, match="slow"):
            await queue.get()  # queued chunks are abandoned once failed

    asyncio.run(run())


def test_admission():
    slots = Admission(1)
    slots.acquire()
    with pytest.raises(CapacityError, match="1 of 1"):
        slots.acquire()
    slots.release()
    slots.closing = True
    with pytest.raises(CapacityError, match="shutting down"):
        slots.acquire()


def test_bearer_auth_rejects_empty_tokens():
    with pytest.raises(ValueError):
        BearerAuth("  ")
    assert not BearerAuth(None).enabled
