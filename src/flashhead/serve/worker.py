"""The engine thread: the only thread that runs the model.

`EngineWorker` loops `engine.step()` in one thread. It sleeps on a condition when no session has a chunk ready
and is woken by new audio, `end()` and submitted commands; while live (realtime) sessions are open it also
wakes every `keepalive_tick` seconds, so that the engine can give an idle avatar its keep-alive silence on time.
Everything else that needs the model (encoding a new session's portrait) is submitted as a command and runs
between rounds, so the model is never used by two threads at once.

Chunks leave through `ChunkSink`s, called in this thread; the server's sinks only hand the chunk over to the
event loop (`loop.call_soon_threadsafe`) or to a job's writer thread and return at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from flashhead.errors import SessionError
from flashhead.pipeline.speed import apply_thread_settings
from flashhead.pipeline.stream import StreamEngine, StreamSession, VideoChunk

logger = logging.getLogger(__name__)


class ChunkSink(Protocol):
    def deliver(self, chunk: VideoChunk, latency: float | None) -> None:
        """A chunk of this sink's session (engine thread; must not block)."""

    def fail(self, error: BaseException) -> None:
        """Generation failed for this sink's session; the session is closed (engine thread; must not block)."""


class RoundObserver(Protocol):
    def round_done(self, batch: int, seconds: float, frames: int) -> None: ...


class EngineWorker:
    """Runs a StreamEngine in a dedicated thread and routes its chunks to per-session sinks.

    Chunk latency, as reported to sinks: the time from the moment a session's next chunk became ready (the last
    audio sample it needs arrived, or the engine decided it needs keep-alive silence, or the previous chunk of a
    backlog was delivered) to the moment the chunk is delivered.
    """

    def __init__(self, engine: StreamEngine, *, keepalive_tick: float = 0.05, observer: RoundObserver | None = None):
        self.engine = engine
        self.keepalive_tick = keepalive_tick
        self.observer = observer
        self._sinks: dict[str, ChunkSink] = {}
        self._ready_at: dict[str, float] = {}
        self._commands: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flashhead-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current round, fail pending commands and join the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- called from other threads ------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run `fn(*args, **kwargs)` in the engine thread between two rounds."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                future.set_exception(SessionError("the engine is stopping"))
                return future
            self._commands.append((lambda: fn(*args, **kwargs), future))
            self._cond.notify()
        return future

    def open_session(self, portrait: np.ndarray, sink: ChunkSink, **options: Any) -> concurrent.futures.Future:
        """Open an engine session (portrait encoded in the engine thread) whose chunks go to `sink`."""

        def open_and_attach() -> StreamSession:
            session = self.engine.open_session(portrait, **options)
            self._sinks[session.id] = sink
            return session

        return self.submit(open_and_attach)

    @staticmethod
    async def reference_encoded(session: StreamSession, poll_seconds: float = 0.002) -> None:
        """Wait, without blocking the event loop or the engine thread, until the GPU has encoded the session's
        portrait. The engine thread only queues that encode (for Pro a 33-frame Wan2.1 encode), so a client told
        `ready` at once and sending its audio straight away would find its first chunk queued behind it."""
        while not session.reference_ready():
            await asyncio.sleep(poll_seconds)

    def close_session(self, session_id: str) -> None:
        """Close a session now; a chunk of it still in flight is discarded."""
        self._sinks.pop(session_id, None)
        self._ready_at.pop(session_id, None)
        self.engine.close_session(session_id)

    def push_audio(self, session: StreamSession, samples: np.ndarray, sample_rate: int) -> None:
        session.push_audio(samples, sample_rate)
        self._note_ready(session, time.monotonic())
        self.notify()

    def notify(self) -> None:
        with self._cond:
            self._cond.notify()

    # -- the engine thread ----------------------------------------------------------------------------

    def _note_ready(self, session: StreamSession, now: float) -> None:
        if session.has_chunk_ready():
            self._ready_at.setdefault(session.id, now)

    def _sessions(self) -> list[StreamSession]:
        return list(self.engine.sessions.values())

    def _run(self) -> None:
        # The compiler settings live per thread in torch >= 2.12: this thread may compile a new shape (a batch size).
        speed = getattr(self.engine.pipeline, "speed", None)
        if speed is not None:
            apply_thread_settings(speed)
        while True:
            with self._cond:
                sessions = self._sessions()
                busy = self.engine.in_flight or any(s.has_chunk_ready() for s in sessions)  # a round may wait
                if not (self._stopping or self._commands or busy):
                    live = any(s.realtime and not s.ended for s in sessions)
                    self._cond.wait(self.keepalive_tick if live else None)
                commands, self._commands = self._commands, []
                stopping = self._stopping
            for run, future in commands:
                if stopping:
                    future.set_exception(SessionError("the engine is stopping"))
                    continue
                try:
                    future.set_result(run())
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)
            if stopping:
                return
            self._round()

    def _round(self) -> None:
        start = time.monotonic()
        for s in self._sessions():
            self._note_ready(s, start)
        try:
            chunks = self.engine.step(start)
        except Exception as e:
            logger.exception("engine round failed")
            self._fail_ready(e)
            return
        done = time.monotonic()
        if self.observer is not None and chunks:
            frames = sum(len(c.frames) for c in chunks)
            self.observer.round_done(len(chunks), done - start, frames)
        for chunk in chunks:
            # A chunk not marked ready before the round became ready inside it (keep-alive silence).
            ready_at = self._ready_at.pop(chunk.session_id, start)
            sink = self._sinks.get(chunk.session_id)
            if chunk.final:
                self._sinks.pop(chunk.session_id, None)
                self.engine.close_session(chunk.session_id)
            else:
                session = self.engine.sessions.get(chunk.session_id)
                if session is not None:
                    self._note_ready(session, done)
            if sink is not None:
                latency = done - ready_at if len(chunk.frames) else None
                sink.deliver(chunk, latency)

    def _fail_ready(self, error: Exception) -> None:
        for s in self._sessions():
            if s.has_chunk_ready():
                sink = self._sinks.get(s.id)
                self.close_session(s.id)
                if sink is not None:
                    sink.fail(error)
