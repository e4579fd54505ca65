"""The front end of `flashhead serve --ray`: the same server, with its sessions on the engine replicas of a cluster.

`RayCluster` connects to Ray (`local`, `auto` or `ray://host:port`), deploys the engine replicas
(flashhead.serve.replica) and gives a `ClusterEngine`: what `create_app` needs of an engine (the model's
description, a session cap) plus a `ClusterWorker` in place of the local engine thread. The worker has the local
worker's interface, so sessions, WebSocket, WebRTC, jobs, auth and metrics work unchanged:

- `open_session` places the session (flashhead.serve.placement) and retries the next replica when one is full;
  when every replica refuses, the usual CapacityError reaches the client.
- each session has two tasks on the event loop: a pump that sends its audio, `end` and `interrupt` in order (one
  call in flight, consecutive audio merged), and a puller whose long-poll brings its chunks back.
- a replica that dies fails the puller's call at once: only that replica's sessions end, with a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flashhead.errors import AudioError, CapacityError, ConfigError, FlashHeadError, SessionError
from flashhead.pipeline.config import GenerationConfig
from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline
from flashhead.serve.metrics import ServeMetrics
from flashhead.serve.replica import DEPLOYMENT, PULL_SECONDS, ReplicaResources, ReplicaSpec, engine_deployment
from flashhead.serve.worker import ChunkSink

logger = logging.getLogger(__name__)

APP_NAME = "flashhead"
CALL_TIMEOUT = 30.0  # a call to a replica that takes longer: the replica is treated as lost


@dataclass
class RemotePipeline:
    """The model as the front end needs it: its size and timing, and portrait/audio preparation (no weights)."""

    name: str
    config: GenerationConfig
    new_frames: int
    motion_frames: int

    # The pipeline's own preparation code: it needs nothing but `config`.
    prepare_image = FlashHeadPipeline.prepare_image
    prepare_audio = FlashHeadPipeline.prepare_audio


def parse_address(address: str) -> str | None:
    """`local` -> None (start Ray in this process); `auto`, `ray://host:port`, `host:port` as Ray takes them."""
    if address == "local":
        return None
    if address == "auto" or address.startswith("ray://") or (":" in address and address.rsplit(":", 1)[1].isdigit()):
        return address
    raise ConfigError(f"--ray {address!r}: expected 'local', 'auto', 'ray://HOST:PORT' or 'HOST:PORT'")


def _runtime_env(address: str | None) -> dict:
    """Replicas must run this front end's flashhead: on a local Ray its source folder is put on their path;
    a remote cluster gets the package shipped with the job (or has it installed: then this is a no-op copy)."""
    import flashhead

    package = Path(flashhead.__file__).parent
    if address is None:
        paths = [str(package.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}
    return {"py_modules": [str(package)]}


class ReplicaLost(Exception):
    """The replica holding a session is gone (its calls now reach another replica, or none)."""


class RayCluster:
    """A connection to Ray with the engine deployment running on it. Use as a context manager, or call `shutdown`."""

    def __init__(self, handle, info: dict, resources: ReplicaResources, spec: ReplicaSpec, started_ray: bool):
        self.handle = handle
        self.info = info
        self.resources = resources
        self.spec = spec
        self._started_ray = started_ray

    @classmethod
    def connect(
        cls,
        address: str,
        spec: ReplicaSpec,
        resources: ReplicaResources | None = None,
        *,
        replicas: int | None = None,
        num_cpus: int | None = None,
    ) -> RayCluster:
        """Connect (or start a local Ray with `num_cpus`), deploy the replicas and wait until they serve.

        Without `resources`: `replicas` replicas (default one per GPU of the cluster), a whole GPU each; on a
        cluster without GPUs, one CPU core each (default one replica).
        """
        import ray
        from ray import serve

        target = parse_address(address)
        started = not ray.is_initialized()
        if started:
            try:
                ray.init(address=target, num_cpus=num_cpus if target is None else None, include_dashboard=False,
                         log_to_driver=False, runtime_env=_runtime_env(target))  # fmt: skip
            except ConnectionError as e:
                raise ConfigError(f"--ray {address}: cannot connect to a Ray cluster ({e})") from None
        if resources is None:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            resources = ReplicaResources(replicas=replicas or gpus or 1, gpus=1.0 if gpus else 0.0)
        serve.start(proxy_location="Disabled")  # the FastAPI front end is the only ingress
        handle = serve.run(engine_deployment(spec, resources), name=APP_NAME, route_prefix=None)
        info = handle.describe.remote().result(timeout_s=600)
        logger.info("ray: %d engine replica(s) of %s ready", resources.replicas, info["model"])
        return cls(handle, info, resources, spec, started)

    def engine(self, max_sessions: int | None = None) -> ClusterEngine:
        """The engine to serve (`create_app(cluster.engine())`); `max_sessions` caps the front end's sessions."""
        return ClusterEngine(self, max_sessions)

    def shutdown(self) -> None:
        import ray
        from ray import serve

        if self._started_ray:  # our own Ray: everything goes with it
            serve.shutdown()
            ray.shutdown()
            return
        with contextlib.suppress(Exception):  # best effort: the cluster may already be gone
            serve.delete(APP_NAME, _blocking=False)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class ClusterEngine:
    """What the server sees of the cluster where it would see a StreamEngine."""

    def __init__(self, cluster: RayCluster, max_sessions: int | None = None):
        info = cluster.info
        self.cluster = cluster
        self.pipeline = RemotePipeline(info["model"], info["config"], info["new_frames"], info["motion_frames"])
        # The front end's own cap (default: every replica full, plus a job). Each replica refuses what it
        # cannot take (its session cap, its measured real-time capacity), and placement tries the next one.
        self.max_sessions = max_sessions or cluster.resources.replicas * cluster.spec.max_sessions + 1
        self.sessions: dict = {}  # engine sessions live on the replicas; nothing here is ever ready locally

    def make_worker(self, observer: ServeMetrics | None = None) -> ClusterWorker:
        return ClusterWorker(self, observer)

    def replicas(self) -> dict[str, dict]:
        """The routers' latest capacity report of each replica (filled once a session has been placed)."""
        from flashhead.serve.placement import routing_view

        return routing_view(DEPLOYMENT)


@dataclass
class RemoteSession:
    """A session as the server holds it: the same calls as StreamSession, carried out on its replica."""

    id: str
    replica: str
    worker: ClusterWorker
    sample_rate: int
    ended: bool = False
    closed: bool = False
    _ops: deque = field(default_factory=deque)  # ("audio", samples) | ("end",) | ("interrupt",)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def push_audio(self, samples: np.ndarray, sample_rate: int | None = None) -> None:
        from flashhead.models.audio import prepare_waveform

        if self.ended:
            raise SessionError(f"session {self.id} has ended; open a new one")
        # Decoded and resampled here, so bad audio is refused at once, as by a local engine.
        waveform = prepare_waveform(samples, sample_rate or self.sample_rate, self.sample_rate).numpy()
        if waveform.size:
            self._queue("audio", waveform)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self._queue("end")

    def interrupt(self) -> None:
        # Audio not sent yet is dropped here; what the replica holds is dropped there.
        self._ops = deque(op for op in self._ops if op[0] != "audio")
        self._queue("interrupt")

    def _queue(self, *op) -> None:
        self._ops.append(op)
        self._wake.set()

    def take_ops(self) -> list[tuple]:
        """Queued calls, consecutive audio merged into one."""
        ops: list[tuple] = []
        while self._ops:
            op = self._ops.popleft()
            if op[0] == "audio" and ops and ops[-1][0] == "audio":
                ops[-1] = ("audio", np.concatenate([ops[-1][1], op[1]]))
            else:
                ops.append(op)
        self._wake.clear()
        return ops


class ClusterWorker:
    """EngineWorker's interface over the replicas; used on the server's event loop only."""

    def __init__(self, engine: ClusterEngine, observer: ServeMetrics | None = None):
        self.engine = engine
        self.observer = observer
        self.handle = engine.cluster.handle
        self._sessions: dict[str, RemoteSession] = {}
        self.placements: deque[tuple[str, str]] = deque(maxlen=1000)  # (session, replica), latest last
        self._running = False

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._loop = asyncio.get_running_loop()

    def stop(self, timeout: float = 30.0) -> None:
        """Close every session (called from a thread other than the event loop's, as EngineWorker.stop)."""
        self._running = False
        done = asyncio.run_coroutine_threadsafe(self._close_all(), self._loop)
        with contextlib.suppress(Exception):
            done.result(timeout)

    @property
    def running(self) -> bool:
        return self._running

    async def _close_all(self) -> None:
        for session_id in list(self._sessions):
            self.close_session(session_id)

    # -- the EngineWorker calls -----------------------------------------------------------------------

    def submit(self, fn, *args: Any, **kwargs: Any):
        raise NotImplementedError("the Ray front end runs no model code itself")

    def open_session(self, portrait: np.ndarray, sink: ChunkSink, **options: Any) -> asyncio.Future:
        """Place and open a session (a future of its RemoteSession); CapacityError when every replica is full."""
        return asyncio.ensure_future(self._open(portrait, sink, **options))

    @staticmethod
    async def reference_encoded(session: RemoteSession) -> None:
        """Nothing to wait for here: a replica answers the open once its GPU has encoded the portrait."""

    def push_audio(self, session: RemoteSession, samples: np.ndarray, sample_rate: int) -> None:
        session.push_audio(samples, sample_rate)

    def notify(self) -> None:
        pass  # the pump of each session wakes on its own queue

    def close_session(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None or session.closed:
            return
        session.closed = True
        for task in session._tasks:
            task.cancel()
        task = asyncio.ensure_future(self._call(session, "close", session_id, timeout=5.0))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # best effort; a lost replica is fine

    # -- replicas -------------------------------------------------------------------------------------

    async def _open(self, portrait: np.ndarray, sink: ChunkSink, *, seed: int, realtime: bool,
                    session_id: str) -> RemoteSession:  # fmt: skip
        refused: list[str] = []
        last = ""
        while True:
            reply = await asyncio.wait_for(
                self.handle.open.remote(portrait, seed=seed, realtime=realtime, session_id=session_id,
                                        exclude=tuple(refused)),
                CALL_TIMEOUT,
            )  # fmt: skip
            if "error" not in reply:
                break
            code, message = reply["error"]
            if code != "capacity":
                raise (SessionError if code == "not_found" else FlashHeadError)(message)
            if reply["replica"] in refused:  # the router had nothing else to offer: every replica is full
                total = max(len(refused), len(self.engine.replicas()))
                raise CapacityError(f"at capacity: every engine replica is full ({total} replicas; last: {last})")
            refused.append(reply["replica"])
            last = message
        session = RemoteSession(session_id, reply["replica"], self, self.engine.pipeline.config.sample_rate)
        self._sessions[session_id] = session
        self.placements.append((session_id, session.replica))
        session._tasks = [asyncio.ensure_future(self._pump(session, sink)),
                          asyncio.ensure_future(self._pull(session, sink))]  # fmt: skip
        return session

    async def _call(self, session: RemoteSession, method: str, *args: Any, timeout: float = CALL_TIMEOUT, **kwargs):
        response = getattr(self.handle, method).remote(*args, replica=session.replica, **kwargs)
        return await asyncio.wait_for(response, timeout)

    async def _pump(self, session: RemoteSession, sink: ChunkSink) -> None:
        try:
            while True:
                await session._wake.wait()
                for op in session.take_ops():
                    if op[0] == "audio":
                        reply = await self._call(session, "push", session.id, op[1])
                    else:
                        reply = await self._call(session, op[0], session.id)
                    if "error" in reply:
                        code, message = reply["error"]
                        if code == "lost":
                            raise ReplicaLost(message)
                        raise (AudioError if code == "bad_audio" else SessionError)(message)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._lost(session, sink, e)

    async def _pull(self, session: RemoteSession, sink: ChunkSink) -> None:
        try:
            while True:
                reply = await self._call(session, "pull", session.id, timeout=PULL_SECONDS + CALL_TIMEOUT)
                if "error" in reply:
                    raise ReplicaLost(reply["error"][1])
                for chunk, latency in reply["chunks"]:
                    if self.observer is not None and len(chunk.frames):
                        self.observer.frames_done(len(chunk.frames))  # rounds are timed on the replicas
                    sink.deliver(chunk, latency)
                    if chunk.final:
                        self._forget(session)
                        return
                if reply["failure"] is not None:
                    raise SessionError(reply["failure"])
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._lost(session, sink, e)

    def _lost(self, session: RemoteSession, sink: ChunkSink, error: Exception) -> None:
        if session.closed:
            return
        if not isinstance(error, FlashHeadError):  # the replica died, or its node, or it stopped answering
            logger.warning("engine replica %s lost (%s): ending its session %s", session.replica, error, session.id)
            error = SessionError("the engine replica serving this session was lost; start a new session")
        self.close_session(session.id)
        sink.fail(error)

    def _forget(self, session: RemoteSession) -> None:
        # Finished normally: the replica closed it after its final chunk.
        self._sessions.pop(session.id, None)
        session.closed = True
        for task in session._tasks:
            if task is not asyncio.current_task():
                task.cancel()
