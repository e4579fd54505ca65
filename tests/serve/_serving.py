"""Test helpers: a real server on 127.0.0.1 (an ephemeral port) and a WebSocket client for it."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import wave
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import uvicorn

from _util import MEDIA
from flashhead.serve.app import create_app


class ServerThread:
    """uvicorn serving `app` in a background thread on 127.0.0.1; `url` is its http:// address."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", ws_max_size=64 * 1024 * 1024, ws_per_message_deflate=False, lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            assert self.thread.is_alive(), "server thread died"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    @property
    def service(self):
        return self.app.state.service


def wait_until(predicate, timeout: float = 10.0) -> bool:
    """Poll `predicate` until it holds or `timeout` passes (for effects on the server that follow a reply)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(process, url: str, timeout: float = 90.0) -> None:
    """Poll `url`/healthz until a server started as `process` (stdout piped) answers 200; fail with its output
    if it exits first or `timeout` passes."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "server did not come up"
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)


@contextmanager
def serve(target, **kwargs):
    with ServerThread(create_app(target, **kwargs)) as server:
        yield server


def speech(seconds: float, offset: float = 0.0) -> np.ndarray:
    """Real speech (16 kHz mono float32), looped to `seconds`."""
    with wave.open(str(MEDIA / "audio" / "speech_en_two_speakers_16k_30s.wav")) as f:
        assert f.getframerate() == 16000 and f.getnchannels() == 1 and f.getsampwidth() == 2
        pcm = np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float32) / 32768
    start = int(offset * 16000) % len(pcm)
    n = int(seconds * 16000)
    return np.resize(np.roll(pcm, -start), n).astype(np.float32)


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def random_portrait(pipe, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)


@dataclass
class StreamResult:
    session_id: str | None = None
    frames: int = 0
    audio_samples: int = 0
    chunks: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    done: dict | None = None
    close_code: int | None = None
    first_send: float | None = None
    first_chunk: float | None = None
    finished: float | None = None
    client_latencies: list[float] = field(default_factory=list)  # last needed sample sent -> chunk received

    def summary(self) -> dict:
        span = (self.finished or 0) - (self.first_send or 0)
        lat = self.client_latencies
        return {
            "session": self.session_id, "frames": self.frames, "chunks": len(self.chunks),
            "fps": round(self.frames / span, 2) if span > 0 else None,
            "first_chunk_s": None if self.first_chunk is None else round(self.first_chunk - self.first_send, 3),
            "latency_p50_s": round(float(np.median(lat)), 3) if lat else None,
            "latency_max_s": round(float(np.max(lat)), 3) if lat else None,
            "server_latency_p50_ms": float(np.median([c["latency_ms"] for c in self.chunks if c["latency_ms"]]))
            if any(c["latency_ms"] for c in self.chunks) else None,
        }  # fmt: skip


async def stream_audio(
    ws_url: str,
    audio: np.ndarray,
    *,
    start: dict,
    piece_seconds: float = 0.1,
    realtime_factor: float | None = 1.0,
    headers: dict | None = None,
    disconnect_after: float | None = None,
    send_raw: list[bytes] | None = None,
    timeout: float = 120.0,
    payloads: list[bytes] | None = None,
) -> StreamResult:
    """One WebSocket client: start, send `audio` as PCM16 in pieces (paced at `realtime_factor` x real time,
    or as fast as possible when None), `end`, and collect every chunk until `done` or the socket closes.
    `payloads`: a list that receives each chunk's frame bytes."""
    import websockets

    result = StreamResult()
    async with websockets.connect(ws_url + "/v1/stream", additional_headers=headers, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", **start}))
        sent_log: list[tuple[int, float]] = []

        async def sender():
            ready = await ready_event.wait()
            del ready
            for raw in send_raw or []:
                await ws.send(raw)
            piece = int(piece_seconds * 16000)
            t0 = time.monotonic()
            result.first_send = t0
            for i, s in enumerate(range(0, len(audio), piece)):
                await ws.send(pcm16(audio[s : s + piece]))
                sent_log.append((min(s + piece, len(audio)), time.monotonic()))
                if disconnect_after is not None and time.monotonic() - t0 > disconnect_after:
                    await ws.close()
                    return
                if realtime_factor:
                    await asyncio.sleep(max(0.0, t0 + (i + 1) * piece_seconds / realtime_factor - time.monotonic()))
            await ws.send(json.dumps({"type": "end"}))

        ready_event = asyncio.Event()
        task = None
        header = None
        try:
            async with asyncio.timeout(timeout):
                async for message in ws:
                    if isinstance(message, bytes):
                        assert header is not None, "binary payload without a chunk header"
                        assert len(message) == sum(header["frame_bytes"]) + header["audio_bytes"]
                        assert header["start_frame"] == result.frames, "frames missing or out of order"
                        now = time.monotonic()
                        result.first_chunk = result.first_chunk or now
                        result.frames += header["num_frames"]
                        result.audio_samples += header["audio_bytes"] // 2
                        last = (header["start_frame"] + header["num_frames"]) * 640
                        sent_at = next((t for n, t in sent_log if n >= last), None)
                        if sent_at is not None and header["num_frames"]:
                            result.client_latencies.append(now - sent_at)
                        result.chunks.append(header)
                        if payloads is not None:
                            payloads.append(message[: sum(header["frame_bytes"])])
                        header = None
                        continue
                    msg = json.loads(message)
                    if msg["type"] == "ready":
                        result.session_id = msg["session_id"]
                        ready_event.set()
                        task = asyncio.create_task(sender())
                    elif msg["type"] == "chunk":
                        header = msg
                    elif msg["type"] == "error":
                        result.errors.append(msg)
                    elif msg["type"] == "done":
                        result.done = msg
        except websockets.ConnectionClosed:
            pass
        finally:
            result.finished = time.monotonic()
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        result.close_code = ws.close_code
    return result
