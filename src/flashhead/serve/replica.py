"""One engine replica of a Ray Serve deployment: the streaming engine of local serving, on one GPU of a cluster.

`EngineReplica` holds a `StreamEngine` run by the same `EngineWorker` thread as `flashhead serve` on one machine;
its methods are the session calls a front end needs (open, push PCM, pull frames, end, interrupt, close) and a
capacity report measured from its own rounds. Expected failures (full, unknown session, too much audio) come back
in-band as `{"error": [code, message]}`, so the front end can tell them from a lost replica.

`engine_deployment` makes the Serve deployment: one replica per GPU (`num_gpus=1`) on GPU clusters, `num_cpus`
on CPU-only ones, routed by flashhead.serve.placement (sticky sessions, most spare capacity first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flashhead.errors import AudioError, CapacityError, FlashHeadError, SessionError
from flashhead.pipeline.stream import StreamEngine, VideoChunk

logger = logging.getLogger(__name__)

DEPLOYMENT = "FlashHeadEngine"
PULL_SECONDS = 1.0  # a pull answers after this long even without a chunk (the front then asks again)


@dataclass(frozen=True)
class ReplicaSpec:
    """What each replica loads and admits (sent to every replica, so plain picklable values only)."""

    model: str = "auto"  # as `flashhead serve --model`
    weights: str | None = None
    device: str | None = None  # None: the replica's GPU when it has one, else CPU
    size: tuple[int, int] | None = None  # (height, width) output override; None: the model's own
    max_sessions: int = 8  # sessions one replica admits (its engine refuses more)
    max_batch: int = 8
    max_buffered_seconds: float = 120.0
    torch_threads: int | None = None  # CPU replicas sharing a machine: keep them from oversubscribing cores


@dataclass(frozen=True)
class ReplicaResources:
    """How Ray places replicas: a whole GPU each on GPU clusters, CPU cores otherwise."""

    replicas: int = 1
    gpus: float = 0.0
    cpus: float = 1.0
    stats_period_seconds: float = 2.0  # how often each replica's capacity reaches the routers
    max_ongoing_requests: int = 1000  # every open session keeps one pull waiting, plus its pushes


def measured_streams(engine: StreamEngine) -> int | None:
    """Most sessions this engine keeps real time, from its fitted round time (None before any round)."""
    if not engine.stats.round_seconds:
        return None
    budget = engine.realtime_margin * engine.chunk_seconds
    streams = 0
    for n in range(1, engine.max_sessions + 1):
        if math.ceil(n / engine.max_batch) * engine.predicted_round_seconds(min(n, engine.max_batch)) > budget:
            break
        streams = n
    return streams


def engine_capacity(engine: StreamEngine, opening: int = 0) -> dict[str, Any]:
    """Sessions, round time and real-time headroom of one engine, as replicas report them. `opening`: sessions
    being opened (their portraits still encoding), counted as sessions: a report made meanwhile must not show the
    replica emptier than it is about to be."""
    sessions = sum(1 for s in list(engine.sessions.values())) + opening
    active = engine.active_sessions()
    streams = measured_streams(engine)
    limit = engine.max_sessions if streams is None else min(streams, engine.max_sessions)
    batch = max(1, min(active, engine.max_batch))
    per_chunk = math.ceil(max(active, 1) / engine.max_batch) * engine.predicted_round_seconds(batch)
    return {
        "sessions": sessions,
        "max_sessions": engine.max_sessions,
        "measured_streams": streams,
        "free": max(0, limit - sessions),
        "round_seconds": round(engine.predicted_round_seconds(batch), 4),
        "chunk_seconds": engine.chunk_seconds,
        # > 1: chunks are generated faster than they play; None until a round was timed.
        "headroom": round(engine.chunk_seconds / per_chunk, 3) if per_chunk > 0 else None,
        "rounds": engine.stats.rounds,
        "measured_at": time.time(),
    }


def error_reply(error: FlashHeadError) -> dict:
    code = {CapacityError: "capacity", SessionError: "not_found", AudioError: "bad_audio"}.get(type(error), "internal")
    return {"error": [code, str(error)]}


@dataclass
class Outbox:
    """Chunks of one session waiting for the front end's next pull (filled by the engine thread)."""

    chunks: deque = field(default_factory=deque)  # (VideoChunk, latency)
    failure: str | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class OutboxSink:
    """ChunkSink of a replica session: hands chunks over to the replica's event loop."""

    def __init__(self, outbox: Outbox, loop: asyncio.AbstractEventLoop):
        self.outbox = outbox
        self.loop = loop

    def deliver(self, chunk: VideoChunk, latency: float | None) -> None:
        self.loop.call_soon_threadsafe(self._put, chunk, latency)

    def fail(self, error: BaseException) -> None:
        message = str(error) if isinstance(error, FlashHeadError) else f"generation failed: {type(error).__name__}"
        self.loop.call_soon_threadsafe(self._fail, message)

    def _put(self, chunk: VideoChunk, latency: float | None) -> None:
        self.outbox.chunks.append((chunk, latency))
        self.outbox.changed.set()

    def _fail(self, message: str) -> None:
        self.outbox.failure = message
        self.outbox.changed.set()


class EngineReplica:
    """A Serve replica: one pipeline, one StreamEngine, one engine thread. Methods are called by the front end.

    Every call accepts the routing keywords of flashhead.serve.placement (`replica`, `exclude`) and ignores them.
    """

    def __init__(self, spec: ReplicaSpec):
        import torch

        from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline
        from flashhead.pipeline.registry import resolve_model_name
        from flashhead.serve.worker import EngineWorker

        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
        weights = Path(spec.weights) if spec.weights else None
        model = resolve_model_name(spec.model, weights)
        pipe = FlashHeadPipeline.from_pretrained(model, weights=weights, device=device)
        if spec.size is not None:
            pipe.config = pipe.config.replace(height=spec.size[0], width=spec.size[1])
        self.spec = spec
        self.engine = StreamEngine(
            pipe, max_sessions=spec.max_sessions, max_batch=spec.max_batch,
            max_buffered_seconds=spec.max_buffered_seconds, watermark=True,
        )  # fmt: skip
        self.worker = EngineWorker(self.engine)
        self.worker.start()
        self.outboxes: dict[str, Outbox] = {}
        self.opening = 0  # sessions whose open has reached this replica and not finished (engine_capacity)
        self.id, self.actor_name = self._identity()
        logger.info("engine replica %s: %s on %s", self.id, pipe.name, device)

    @staticmethod
    def _identity() -> tuple[str, str]:
        import ray
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id, ray.get_runtime_context().get_actor_name()

    def __del__(self) -> None:
        self.worker.stop(timeout=5.0)

    # -- what the front end needs to know ---------------------------------------------------------------

    async def describe(self, **routing: Any) -> dict:
        """The model as the front end shows it (name, generation config, chunk size) and this replica's identity."""
        pipe = self.engine.pipeline
        return {
            "replica": self.id, "actor_name": self.actor_name, "model": pipe.name,
            "config": pipe.config, "new_frames": pipe.new_frames, "motion_frames": pipe.motion_frames,
            "device": str(pipe.device), "max_sessions": self.engine.max_sessions,
        }  # fmt: skip

    async def capacity(self, **routing: Any) -> dict:
        return engine_capacity(self.engine, self.opening) | {"replica": self.id, "actor_name": self.actor_name}

    def record_routing_stats(self) -> dict:
        """Ray Serve polls this periodically; the router places new sessions by it."""
        return engine_capacity(self.engine, self.opening) | {"replica": self.id, "actor_name": self.actor_name}

    # -- sessions -----------------------------------------------------------------------------------------

    async def open(self, portrait: np.ndarray, *, seed: int, realtime: bool, session_id: str, **routing: Any) -> dict:
        outbox = Outbox()
        sink = OutboxSink(outbox, asyncio.get_running_loop())
        self.opening += 1
        try:
            future = self.worker.open_session(portrait, sink, seed=seed, realtime=realtime, session_id=session_id)
            await self.worker.reference_encoded(await asyncio.wrap_future(future))
        except FlashHeadError as e:
            return error_reply(e) | {"replica": self.id}
        finally:
            self.opening -= 1
        self.outboxes[session_id] = outbox
        return {"replica": self.id, "session": session_id}

    def _misrouted(self, routing: dict) -> dict | None:
        """A call meant for another replica reaches this one only when that replica is gone (placement)."""
        meant = routing.get("replica")
        if meant is not None and meant != self.id:
            return {"error": ["lost", f"engine replica {meant} is gone"], "chunks": [], "failure": None}
        return None

    async def push(self, session_id: str, samples: np.ndarray, **routing: Any) -> dict:
        """Queue 16 kHz mono float32 speech (the front end has decoded and resampled it)."""
        if lost := self._misrouted(routing):
            return lost
        try:
            self.worker.push_audio(self.engine.session(session_id), samples, self.engine.pipeline.config.sample_rate)
        except FlashHeadError as e:
            return error_reply(e)
        return {}

    async def end(self, session_id: str, **routing: Any) -> dict:
        if lost := self._misrouted(routing):
            return lost
        session = self.engine.sessions.get(session_id)
        if session is not None:
            session.end()
            self.worker.notify()
        return {}

    async def interrupt(self, session_id: str, **routing: Any) -> dict:
        if lost := self._misrouted(routing):
            return lost
        session = self.engine.sessions.get(session_id)
        if session is not None:
            session.interrupt()
        return {}

    async def close(self, session_id: str, **routing: Any) -> dict:
        if lost := self._misrouted(routing):
            return lost
        self.worker.close_session(session_id)
        outbox = self.outboxes.pop(session_id, None)
        if outbox is not None:
            outbox.failure = outbox.failure or "closed"
            outbox.changed.set()
        return {}

    async def pull(self, session_id: str, timeout: float = PULL_SECONDS, **routing: Any) -> dict:
        """The session's chunks since the last pull; waits up to `timeout` for the first one.

        Returns {"chunks": [(VideoChunk, latency), ...], "failure": message or None}; the final chunk ends it.
        """
        if lost := self._misrouted(routing):
            return lost
        outbox = self.outboxes.get(session_id)
        if outbox is None:
            return {"chunks": [], "failure": f"no session {session_id!r} on replica {self.id}"}
        if not outbox.chunks and outbox.failure is None:
            outbox.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(outbox.changed.wait(), timeout)
        chunks = list(outbox.chunks)
        outbox.chunks.clear()
        if any(chunk.final for chunk, _ in chunks) or outbox.failure is not None:
            self.outboxes.pop(session_id, None)
        return {"chunks": chunks, "failure": outbox.failure}


def engine_deployment(spec: ReplicaSpec, resources: ReplicaResources):
    """The bound Serve application: `resources.replicas` engine replicas routed by CapacityRouter."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from flashhead.serve.placement import CapacityRouter

    actor_options: dict[str, Any] = {"num_cpus": resources.cpus}
    if resources.gpus:
        actor_options["num_gpus"] = resources.gpus
    deployment = serve.deployment(
        EngineReplica,
        name=DEPLOYMENT,
        num_replicas=resources.replicas,
        ray_actor_options=actor_options,
        max_ongoing_requests=resources.max_ongoing_requests,
        request_router_config=RequestRouterConfig(
            request_router_class=CapacityRouter, request_routing_stats_period_s=resources.stats_period_seconds
        ),
    )
    return deployment.bind(spec)
