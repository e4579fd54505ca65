"""Limits and back-pressure as explicit objects: what the server admits, buffers and accepts.

- `ServeLimits`: every number the server enforces, in one place.
- `Admission`: counts live sessions and refuses new ones when full or shutting down.
- `ChunkQueue`: the bounded queue between the engine and one client. The engine never waits for a client: a
  client that falls `max_pending_chunks` behind is disconnected with a `slow_client` error. Chunks are never
  dropped silently, because a gap would desynchronise audio and video and lose speech, and a live client that
  is that far behind cannot catch up anyway.
- `UploadLimit`: an ASGI middleware that answers 413 before an oversize request body is read.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from starlette.exceptions import HTTPException

from flashhead.errors import CapacityError

MiB = 1024 * 1024
T = TypeVar("T")


@dataclass(frozen=True)
class ServeLimits:
    """What one server admits. Sizes are bytes, durations seconds."""

    max_sessions: int = 8  # live sessions (WebSocket + WebRTC); jobs are counted separately
    max_batch: int = 8  # chunks generated together in one engine round (when the app builds the engine)
    max_upload_bytes: int = 10 * MiB  # a portrait (upload, or base64 in a `start` message)
    max_job_upload_bytes: int = 200 * MiB  # image + audio of one offline job
    max_audio_message_bytes: int = 1 * MiB  # one binary WebSocket audio message (32 s of PCM16)
    max_session_seconds: float = 3600.0  # wall clock; then the session is ended (reason max_duration)
    max_buffered_audio_seconds: float = 120.0  # audio received but not generated yet, per session
    max_pending_chunks: int = 16  # generated chunks a client may have unsent before it is disconnected
    start_timeout_seconds: float = 15.0  # a WebSocket must send `start` within this
    max_queued_jobs: int = 32
    max_running_jobs: int = 1
    max_job_audio_seconds: float = 600.0
    job_ttl_seconds: float = 3600.0  # finished jobs (and their MP4) are deleted after this
    max_portraits: int = 256  # uploaded portraits kept (least recently used dropped first)
    portrait_ttl_seconds: float = 3600.0
    shutdown_grace_seconds: float = 20.0  # SIGTERM: time sessions get to finish before they are cut

    @property
    def engine_sessions(self) -> int:
        return self.max_sessions + self.max_running_jobs


class Admission:
    """Live-session slots; `closing` refuses everyone (graceful shutdown)."""

    def __init__(self, max_sessions: int):
        self.max_sessions = max_sessions
        self.active = 0
        self.closing = False

    def acquire(self) -> None:
        if self.closing:
            raise CapacityError("server is shutting down; not admitting new sessions")
        if self.active >= self.max_sessions:
            raise CapacityError(f"at capacity: {self.active} of {self.max_sessions} live sessions open")
        self.active += 1

    def release(self) -> None:
        self.active = max(0, self.active - 1)


class ChunkQueue(Generic[T]):
    """A bounded queue of chunks for one client (one producer, one consumer, both on the event loop).

    `offer` never blocks: it returns False when the queue is full, and the owner then fails the session.
    After `fail`, `get` returns the failure at once (queued chunks are abandoned).
    """

    def __init__(self, maxsize: int):
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._changed = asyncio.Event()
        self.failure: Exception | None = None

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, item: T) -> bool:
        if self.failure is not None:
            return True  # the session is already failing; nothing more to deliver
        if len(self._items) >= self.maxsize:
            return False
        self._items.append(item)
        self._changed.set()
        return True

    def fail(self, failure: Exception) -> None:
        if self.failure is None:
            self.failure = failure
        self._changed.set()

    async def get(self) -> T:
        """The next chunk; raises the failure once the session has failed."""
        while True:
            if self.failure is not None:
                raise self.failure
            if self._items:
                return self._items.popleft()
            self._changed.clear()
            await self._changed.wait()


class _BodyTooLarge(HTTPException):
    # An HTTPException, so that a framework that wraps body-parsing errors still answers 413.
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than the limit of {limit} bytes")


Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class UploadLimit:
    """ASGI middleware: HTTP bodies above a per-path-prefix limit get 413 before (or while) being read.

    The declared Content-Length is checked first; a chunked body is counted as it arrives and cut off at the limit.
    """

    def __init__(self, app: ASGIApp, limits: dict[str, int], default: int):
        self.app = app
        self.limits = sorted(limits.items(), key=lambda kv: -len(kv[0]))  # longest prefix first
        self.default = default

    def limit_for(self, path: str) -> int:
        return next((n for prefix, n in self.limits if path.startswith(prefix)), self.default)

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_413(send, limit)
            return
        received = 0
        started = False

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit)
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_413(send, limit)


async def _send_413(send, limit: int) -> None:
    body = b'{"error": {"code": "too_large", "message": "request body larger than the limit of %d bytes"}}' % limit
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
