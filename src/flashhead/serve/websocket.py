"""The WebSocket transport: the protocol of flashhead.serve.protocol on one socket per session.

Two tasks per session: the receiver turns binary messages into audio for the engine and text messages into
`end` / `interrupt`; the sender turns delivered chunks into `chunk` headers + payloads (frames encoded in a
thread pool, off the event loop). A protocol violation ends only this session: the client gets an `error`
message and the socket is closed with a matching close code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from pydantic import ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from flashhead.errors import CapacityError, FlashHeadError, ImageError, NoFaceError, SessionError
from flashhead.serve.auth import Unauthorized
from flashhead.serve.protocol import (
    ChunkHeader,
    DoneMessage,
    EndMessage,
    ErrorMessage,
    InterruptedMessage,
    InterruptMessage,
    ReadyMessage,
    StartMessage,
    client_message,
    decode_pcm,
    encode_frames,
    encode_pcm16,
)
from flashhead.serve.sessions import Delivery, LiveSession, SessionFailure

if TYPE_CHECKING:
    from flashhead.serve.app import ServeService

logger = logging.getLogger(__name__)

CLOSE_CODES = {
    "unauthorized": 1008, "bad_request": 1008, "slow_client": 1008, "bad_audio": 1007, "too_large": 1009,
    "capacity": 1013, "shutdown": 1001, "no_face": 1008, "bad_image": 1008, "internal": 1011,
}  # fmt: skip
ERROR_GRACE_SECONDS = 2.0  # time a failing session's sender gets to tell the client before the socket is cut


def error_code(error: FlashHeadError) -> str:
    if isinstance(error, NoFaceError):
        return "no_face"
    if isinstance(error, ImageError):
        return "bad_image"
    if isinstance(error, CapacityError):
        return "capacity"
    return "bad_request"


class WebSocketStream:
    def __init__(self, ws: WebSocket, service: ServeService):
        self.ws = ws
        self.service = service
        self._send_lock = asyncio.Lock()

    async def run(self) -> None:
        await self.ws.accept()
        try:
            self.service.auth.check(self.ws, allow_query=True)
        except Unauthorized as e:
            self.service.metrics.rejected.labels("unauthorized").inc()
            await self._fail("unauthorized", str(e))
            return
        try:
            start = await self._receive_start()
            live = await self._open(start)
        except SessionFailure as f:
            self.service.metrics.rejected.labels(f.code).inc()
            await self._fail(f.code, f.message)
            return
        except WebSocketDisconnect:
            return
        try:
            await self._stream(live, start)
        except WebSocketDisconnect:
            pass  # the client left; its session is closed below
        finally:
            live.close()

    async def _receive_start(self) -> StartMessage:
        limits = self.service.limits
        try:
            message = await asyncio.wait_for(self.ws.receive(), limits.start_timeout_seconds)
        except asyncio.TimeoutError:
            raise SessionFailure("bad_request", f"no start message within {limits.start_timeout_seconds:g} s") from None
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        text = message.get("text")
        if text is None:
            raise SessionFailure("bad_request", "the first message must be a JSON start message, not binary audio")
        if len(text) > limits.max_upload_bytes * 4 // 3 + 4096:
            raise SessionFailure("too_large", f"start message larger than the {limits.max_upload_bytes}-byte limit")
        try:
            start = client_message.validate_json(text)
        except ValidationError as e:
            raise SessionFailure("bad_request", _first_error(e)) from None
        if not isinstance(start, StartMessage):
            raise SessionFailure("bad_request", f"expected a start message first, got {start.type!r}")
        return start

    async def _open(self, start: StartMessage) -> LiveSession:
        service = self.service
        try:
            if start.portrait_id is not None and start.portrait is None:
                portrait = service.portraits.get(start.portrait_id).image
            else:
                data = start.portrait_bytes(service.limits.max_upload_bytes)
                portrait = await service.portraits.prepare(data, crop=start.crop)
            return await service.hub.open("websocket", portrait, seed=start.seed, realtime=start.realtime)
        except OverflowError as e:
            raise SessionFailure("too_large", str(e)) from None
        except ValueError as e:
            raise SessionFailure("bad_request", str(e)) from None
        except SessionError as e:
            raise SessionFailure("bad_request", str(e)) from None
        except FlashHeadError as e:
            raise SessionFailure(error_code(e), str(e)) from None

    async def _stream(self, live: LiveSession, start: StartMessage) -> None:
        config = self.service.pipeline.config
        ready = ReadyMessage(
            session_id=live.id, width=config.width, height=config.height, fps=config.fps,
            sample_rate=config.sample_rate, chunk_frames=self.service.pipeline.new_frames, encoding=start.encoding,
            realtime=start.realtime,
        )  # fmt: skip
        await self._send_text(ready.model_dump_json())
        sender = asyncio.create_task(self._send_chunks(live, start))
        receiver = asyncio.create_task(self._receive(live, start))
        aborted = asyncio.create_task(live.aborted.wait())
        try:
            done, _ = await asyncio.wait({sender, receiver, aborted}, return_when=asyncio.FIRST_COMPLETED)
            if receiver in done and receiver.result() == "gone":
                return  # the client left: nothing more to send
            if sender not in done:  # failed (bad input or slow client): let the sender report it, briefly
                await asyncio.wait({sender}, timeout=ERROR_GRACE_SECONDS)
        finally:
            for task in (sender, receiver, aborted):
                task.cancel()
            await asyncio.gather(sender, receiver, aborted, return_exceptions=True)
            if self.ws.application_state == WebSocketState.CONNECTED:
                await self._close(1000)

    async def _receive(self, live: LiveSession, start: StartMessage) -> str:
        limit = self.service.limits.max_audio_message_bytes
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return "gone"
            try:
                data = message.get("bytes")
                if data is not None:
                    if len(data) > limit:
                        raise SessionFailure("too_large", f"audio message of {len(data)} bytes; the limit is {limit}")
                    live.push_audio(decode_pcm(data, start.format), start.sample_rate)
                    continue
                try:
                    command = client_message.validate_json(message.get("text") or "")
                except ValidationError as e:
                    raise SessionFailure("bad_request", _first_error(e)) from None
                if isinstance(command, EndMessage):
                    live.end("end")
                elif isinstance(command, InterruptMessage):
                    live.interrupt()
                    await self._send_text(InterruptedMessage(session_id=live.id).model_dump_json())
                else:
                    raise SessionFailure("bad_request", "the session has already started")
            except FlashHeadError as e:  # AudioError from decoding
                live.abort(SessionFailure("bad_audio", str(e)))
                return "aborted"
            except SessionFailure as f:
                live.abort(f)
                return "aborted"

    async def _send_chunks(self, live: LiveSession, start: StartMessage) -> None:
        loop = asyncio.get_running_loop()
        metrics = self.service.metrics
        try:
            while True:
                delivery: Delivery = await live.queue.get()
                chunk = delivery.chunk
                frames = await loop.run_in_executor(
                    self.service.encode_pool, encode_frames, chunk.frames, start.encoding, start.jpeg_quality
                )
                audio = encode_pcm16(chunk.audio)
                header = ChunkHeader(
                    session_id=live.id, index=delivery.index, start_frame=chunk.start_frame,
                    num_frames=len(chunk.frames), pts=chunk.pts, fps=chunk.fps, frame_bytes=[len(f) for f in frames],
                    audio_bytes=len(audio), final=chunk.final,
                    latency_ms=None if delivery.latency is None else round(delivery.latency * 1000, 1),
                )  # fmt: skip
                async with self._send_lock:
                    await self.ws.send_text(header.model_dump_json())
                    await self.ws.send_bytes(b"".join(frames) + audio)
                live.frames_sent += len(chunk.frames)
                metrics.chunk_sent(delivery.latency)
                if chunk.final:
                    done = DoneMessage(session_id=live.id, reason=live.end_reason or "end", frames=live.frames_sent)
                    await self._send_text(done.model_dump_json())
                    await self._close(1000)
                    return
        except SessionFailure as f:
            await self._fail(f.code, f.message)

    async def _send_text(self, text: str) -> None:
        async with self._send_lock:
            await self.ws.send_text(text)

    async def _fail(self, code: str, message: str) -> None:
        """Tell the client what went wrong and close the socket (best effort: the client may be gone)."""
        with contextlib.suppress(Exception):  # the client is gone or stuck; closing is all that is left
            await asyncio.wait_for(self._send_text(ErrorMessage(code=code, message=message).model_dump_json()), 2.0)
        await self._close(CLOSE_CODES.get(code, 1008))

    async def _close(self, code: int) -> None:
        if self.ws.application_state != WebSocketState.CONNECTED:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code), 2.0)


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("start", "end", "interrupt"))
    message = first.get("msg", "invalid message").removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
