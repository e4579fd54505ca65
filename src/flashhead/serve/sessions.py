"""Live sessions as the server sees them: an engine session, its outbound queue, its deadline, its slot.

A transport (WebSocket or WebRTC) opens a `LiveSession` through the `SessionHub`, pushes the client's audio
into it and reads `Delivery`s from `session.queue`. The engine thread delivers chunks through the session
(a `ChunkSink`), which hands them to the event loop; if the client lets `max_pending_chunks` pile up, the
session fails with `slow_client` instead of stalling the engine or other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass

import numpy as np

from flashhead.errors import AudioError, FlashHeadError, SessionError
from flashhead.pipeline.stream import StreamSession, VideoChunk
from flashhead.serve.limits import Admission, ChunkQueue, ServeLimits
from flashhead.serve.metrics import ServeMetrics
from flashhead.serve.worker import EngineWorker

logger = logging.getLogger(__name__)


class SessionFailure(Exception):
    """Why a live session stopped early: a wire error code and a one-line message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Delivery:
    chunk: VideoChunk
    latency: float | None  # see EngineWorker
    index: int  # 0, 1, 2, ... per session


class LiveSession:
    """One client's stream. Its methods are called on the event loop, except the sink methods (engine thread)."""

    def __init__(self, hub: SessionHub, transport: str, realtime: bool):
        self.hub = hub
        self.transport = transport
        self.realtime = realtime
        self.id = f"{'rtc' if transport == 'webrtc' else 'ws'}-{secrets.token_hex(6)}"
        self.queue: ChunkQueue[Delivery] = ChunkQueue(hub.limits.max_pending_chunks)
        self.engine_session: StreamSession | None = None
        self.end_reason: str | None = None
        self.frames_sent = 0
        self._loop = asyncio.get_running_loop()
        self._delivered = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._closed = False
        self.closed = asyncio.Event()
        self.aborted = asyncio.Event()

    # -- ChunkSink (engine thread) --------------------------------------------------------------------

    def deliver(self, chunk: VideoChunk, latency: float | None) -> None:
        self._call_soon(self._accept, chunk, latency)

    def fail(self, error: BaseException) -> None:
        message = str(error) if isinstance(error, FlashHeadError) else f"generation failed: {type(error).__name__}"
        self._call_soon(self.abort, SessionFailure("internal", message))

    def _call_soon(self, fn, *args) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: the server is gone
            self._loop.call_soon_threadsafe(fn, *args)

    # -- event loop -----------------------------------------------------------------------------------

    def _accept(self, chunk: VideoChunk, latency: float | None) -> None:
        if self._closed:
            return
        if not self.queue.offer(Delivery(chunk, latency, self._delivered)):
            self.abort(
                SessionFailure(
                    "slow_client",
                    f"client too slow: {self.queue.maxsize} chunks generated but not yet sent; disconnecting",
                )
            )
            return
        self._delivered += 1

    def push_audio(self, samples: np.ndarray, sample_rate: int) -> None:
        """Queue audio; audio after `end` (or after the deadline ended the session) is ignored."""
        if self.engine_session is None or self.end_reason is not None or self._closed:
            return
        try:
            self.hub.worker.push_audio(self.engine_session, samples, sample_rate)
        except SessionError:
            pass  # ended between the check and the push
        except AudioError as e:
            raise SessionFailure("bad_audio", str(e)) from None

    def end(self, reason: str = "end") -> None:
        """No more audio: the rest is generated and the final chunk closes the stream."""
        if self.end_reason is None:
            self.end_reason = reason
        if self.engine_session is not None and not self._closed:
            self.engine_session.end()
            self.hub.worker.notify()

    def interrupt(self) -> None:
        if self.engine_session is not None:
            self.engine_session.interrupt()

    def abort(self, failure: SessionFailure) -> None:
        """Stop now: the transport gets `failure` from the queue and reports it to the client."""
        if self.queue.failure is None and not self._closed:
            self.hub.metrics.aborted.labels(failure.code).inc()
            logger.info("session %s aborted: %s", self.id, failure.message)
        self.queue.fail(failure)
        self.aborted.set()
        self._release_engine()

    def close(self) -> None:
        """The transport is finished with this session (normal end, error or client gone)."""
        if self._closed:
            return
        self._closed = True
        self._release_engine()
        if self._deadline is not None:
            self._deadline.cancel()
        self.hub._forget(self)
        self.closed.set()

    def _release_engine(self) -> None:
        if self.engine_session is not None:
            self.hub.worker.close_session(self.engine_session.id)

    def start_deadline(self, seconds: float) -> None:
        self._deadline = self._loop.call_later(seconds, self.end, "max_duration")


class SessionHub:
    """Admits live sessions, opens them on the engine and ends them all on shutdown."""

    def __init__(self, worker: EngineWorker, limits: ServeLimits, metrics: ServeMetrics):
        self.worker = worker
        self.limits = limits
        self.metrics = metrics
        # Engine slots beyond these stay free for offline jobs.
        self.admission = Admission(min(limits.max_sessions, worker.engine.max_sessions - limits.max_running_jobs))
        self.sessions: dict[str, LiveSession] = {}

    async def open(self, transport: str, portrait: np.ndarray, *, seed: int, realtime: bool) -> LiveSession:
        """Admit and open a session; CapacityError when full or shutting down (the transport counts refusals)."""
        self.admission.acquire()
        live = LiveSession(self, transport, realtime)
        self.sessions[live.id] = live
        self.metrics.active_sessions.labels(transport).inc()
        started = time.monotonic()
        try:
            future = self.worker.open_session(portrait, live, seed=seed, realtime=realtime, session_id=live.id)
            live.engine_session = await asyncio.wrap_future(future)
            await self.worker.reference_encoded(live.engine_session)
        except BaseException:
            live.close()
            raise
        self.metrics.session_open.observe(time.monotonic() - started)
        if live._closed or live.queue.failure is not None:  # cut (shutdown) while the portrait was encoded
            live._release_engine()
        elif live.end_reason is not None:  # drained meanwhile: end the engine session too
            live.end(live.end_reason)
        self.metrics.sessions.labels(transport).inc()
        live.start_deadline(self.limits.max_session_seconds)
        return live

    def _forget(self, live: LiveSession) -> None:
        if self.sessions.pop(live.id, None) is not None:
            self.admission.release()
            self.metrics.active_sessions.labels(live.transport).dec()

    def pending_chunks(self) -> int:
        return sum(len(s.queue) for s in list(self.sessions.values()))

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown: admit no one, end every session, wait up to `timeout` for their final chunks."""
        self.admission.closing = True
        live = list(self.sessions.values())
        for s in live:
            s.end("shutdown")
        if live:
            await asyncio.wait([asyncio.ensure_future(s.closed.wait()) for s in live], timeout=timeout)
        for s in list(self.sessions.values()):
            s.abort(SessionFailure("shutdown", "server shutting down; the session was cut before its end"))
