"""Offline jobs over HTTP: a portrait and an audio file in, an MP4 out, generated on the live engine.

A job is an ordinary (non-realtime) engine session, so it shares batches with live streams instead of blocking
them. Its audio is fed to the engine on credit: a few chunks ahead, one more for every chunk written, so a long
file neither fills the engine's audio buffer nor piles frames up in memory. Frames are written by the job's own
thread (watermarked, as `flashhead generate` does), never on the event loop or the engine thread. Results live in
one temporary folder, deleted `job_ttl_seconds` after the job finished and when the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flashhead.errors import AudioError, CapacityError, FlashHeadError, SessionError
from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline
from flashhead.pipeline.stream import StreamSession, VideoChunk
from flashhead.serve.limits import ServeLimits
from flashhead.serve.metrics import ServeMetrics
from flashhead.serve.portraits import PortraitStore
from flashhead.serve.worker import EngineWorker

logger = logging.getLogger(__name__)

CREDIT_CHUNKS = 4  # chunks of audio a job keeps queued in the engine


@dataclass
class Job:
    id: str
    folder: Path
    image_path: Path
    audio_path: Path
    seed: int
    crop: bool
    status: str = "queued"  # queued -> running -> done | failed | cancelled
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    total_frames: int | None = None
    frames_done: int = 0
    error: str | None = None

    @property
    def video_path(self) -> Path:
        return self.folder / "video.mp4"

    def describe(self) -> dict[str, Any]:
        progress = 0.0
        if self.status == "done":
            progress = 1.0
        elif self.total_frames:
            progress = min(self.frames_done / self.total_frames, 1.0)
        return {
            "id": self.id,
            "status": self.status,
            "progress": round(progress, 4),
            "frames": self.frames_done,
            "total_frames": self.total_frames,
            "error": self.error,
            "created_at": self.created,
            "started_at": self.started,
            "finished_at": self.finished,
            "video_url": f"/v1/jobs/{self.id}/video" if self.status == "done" else None,
        }


class _Cancelled(Exception):
    pass


class JobWriter:
    """The sink of one job's engine session: writes its chunks to the MP4 and feeds the engine more audio."""

    def __init__(self, job: Job, worker: EngineWorker, waveform: np.ndarray, fps: int, sample_rate: int, slice_: int):
        self.job = job
        self.worker = worker
        self.waveform = waveform
        self.fps = fps
        self.sample_rate = sample_rate
        self.slice = slice_
        self.session: StreamSession | None = None
        self._fed = 0
        self._inbox: queue.Queue[VideoChunk | BaseException] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()

    # ChunkSink (engine thread)
    def deliver(self, chunk: VideoChunk, latency: float | None) -> None:
        self._inbox.put(chunk)

    def fail(self, error: BaseException) -> None:
        self._inbox.put(error)

    def cancel(self) -> None:
        self._inbox.put(_Cancelled())

    def start(self, session: StreamSession) -> None:
        self.session = session
        self._feed(CREDIT_CHUNKS)
        self._thread = threading.Thread(target=self._run, name=f"flashhead-{self.job.id}", daemon=True)
        self._thread.start()

    def _feed(self, chunks: int) -> None:
        assert self.session is not None
        end = min(self._fed + chunks * self.slice, len(self.waveform))
        if end > self._fed:
            self.worker.push_audio(self.session, self.waveform[self._fed : end], self.sample_rate)
            self._fed = end
        if self._fed >= len(self.waveform) and not self.session.ended:
            self.session.end()
            self.worker.notify()

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            self._write()
        except BaseException as e:  # noqa: BLE001 - reported through the future
            error = e
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped
            self._loop.call_soon_threadsafe(self._finish, error)

    def _finish(self, error: BaseException | None) -> None:
        if not self.finished.done():
            if error is None:
                self.finished.set_result(None)
            else:
                self.finished.set_exception(error)

    def _write(self) -> None:
        from flashhead.media.video_io import VideoWriter
        from flashhead.media.watermark import embed_watermark

        metadata = {"model": self.worker.engine.pipeline.name, "seed": self.job.seed, "source": "flashhead serve"}
        # The server's engines mark frames on the device; an engine handed to create_app without it is marked here.
        marked = getattr(self.worker.engine, "watermark", True)
        # Audio given up front is muxed as frames arrive (flat memory); the writer cuts it at the last frame.
        # The server's speed settings (auto with --optimized); a Ray front end's pipeline has none: x264.
        speed = getattr(self.worker.engine.pipeline, "speed", None)
        encoder = speed.video_encoder if speed is not None else "libx264"
        with VideoWriter(
            self.job.video_path, fps=self.fps, encoder=encoder, metadata=metadata, audio=self.waveform,
            sample_rate=self.sample_rate,
        ) as writer:  # fmt: skip
            while True:
                item = self._inbox.get()
                if isinstance(item, BaseException):
                    raise item
                if len(item.frames):
                    writer.write_frames(item.frames if marked else embed_watermark(item.frames))
                    self.job.frames_done += len(item.frames)
                if item.final:
                    return
                self._feed(1)


class JobManager:
    """Accepts jobs, runs `max_running_jobs` of them at a time on the engine, and cleans up after them."""

    def __init__(
        self,
        worker: EngineWorker,
        portraits: PortraitStore,
        limits: ServeLimits,
        metrics: ServeMetrics,
    ):
        self.worker = worker
        self.pipeline: FlashHeadPipeline = worker.engine.pipeline
        self.portraits = portraits
        self.limits = limits
        self.metrics = metrics
        self.root = Path(tempfile.mkdtemp(prefix="flashhead-jobs-"))
        self.jobs: dict[str, Job] = {}
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._writers: dict[str, JobWriter] = {}
        self._runners: list[asyncio.Task] = []
        self.accepting = True

    def start(self) -> None:
        self._runners = [asyncio.create_task(self._run()) for _ in range(self.limits.max_running_jobs)]

    @property
    def queued(self) -> int:
        return sum(j.status == "queued" for j in self.jobs.values())

    async def submit(self, image: tuple[str, Any], audio: tuple[str, Any], *, seed: int, crop: bool) -> Job:
        """Store the uploads (file name, readable async file) and queue the job; CapacityError when full."""
        self.sweep()
        if not self.accepting:
            raise CapacityError("server is shutting down; not accepting jobs")
        if self.queued >= self.limits.max_queued_jobs:
            raise CapacityError(f"job queue full ({self.limits.max_queued_jobs} waiting); try again later")
        job_id = f"j-{secrets.token_hex(8)}"
        folder = self.root / job_id
        folder.mkdir()
        paths = []
        for kind, (name, upload) in (("image", image), ("audio", audio)):
            path = folder / f"{kind}{Path(name or '').suffix[:8]}"
            with path.open("wb") as out:
                while block := await upload.read(1 << 20):
                    out.write(block)
            paths.append(path)
        job = Job(job_id, folder, paths[0], paths[1], seed, crop)
        self.jobs[job_id] = job
        self._queue.put_nowait(job)
        return job

    def get(self, job_id: str) -> Job:
        self.sweep()
        try:
            return self.jobs[job_id]
        except KeyError:
            raise SessionError(f"no job {job_id!r} (unknown or expired)") from None

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.status in ("queued", "running"):
            self._set_status(job, "cancelled", "cancelled by the client")
            writer = self._writers.get(job_id)
            if writer is not None:
                self.worker.close_session(job_id)
                writer.cancel()
        else:
            self._remove(job)
        return job

    def sweep(self) -> None:
        limit = time.time() - self.limits.job_ttl_seconds
        for job in [j for j in self.jobs.values() if j.finished is not None and j.finished < limit]:
            self._remove(job)

    def _remove(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        shutil.rmtree(job.folder, ignore_errors=True)

    def _set_status(self, job: Job, status: str, error: str | None = None) -> None:
        job.status = status
        job.error = error
        if status in ("done", "failed", "cancelled"):
            job.finished = time.time()
            self.metrics.jobs.labels(status).inc()
            if status != "done":
                job.video_path.unlink(missing_ok=True)

    async def _run(self) -> None:
        while True:
            job = await self._queue.get()
            if job.status != "queued":
                continue
            try:
                await self._process(job)
                if job.status == "running":
                    self._set_status(job, "done")
            except _Cancelled:
                pass
            except FlashHeadError as e:
                if job.status == "running":
                    self._set_status(job, "failed", str(e))
            except asyncio.CancelledError:
                if job.status in ("queued", "running"):
                    self._set_status(job, "cancelled", "server shutting down")
                raise
            except Exception as e:
                logger.exception("job %s failed", job.id)
                if job.status == "running":
                    self._set_status(job, "failed", f"internal error: {type(e).__name__}")
            finally:
                self._writers.pop(job.id, None)
                self.worker.close_session(job.id)

    async def _process(self, job: Job) -> None:
        job.status, job.started = "running", time.time()
        loop = asyncio.get_running_loop()
        waveform = await loop.run_in_executor(None, self.pipeline.prepare_audio, job.audio_path, None)
        config = self.pipeline.config
        seconds = len(waveform) / config.sample_rate
        if seconds > self.limits.max_job_audio_seconds:
            raise AudioError(f"audio is {seconds:.0f} s long; the limit is {self.limits.max_job_audio_seconds:.0f} s")
        job.total_frames = round(seconds * config.fps)
        portrait = await self.portraits.prepare_path(job.image_path, crop=job.crop)
        if job.status != "running":
            return
        slice_ = self.pipeline.new_frames * config.sample_rate // config.fps
        writer = JobWriter(job, self.worker, waveform, config.fps, config.sample_rate, slice_)
        self._writers[job.id] = writer
        # The hub leaves `max_running_jobs` engine slots free for jobs, so this is admitted.
        future = self.worker.open_session(portrait, writer, seed=job.seed, realtime=False, session_id=job.id)
        writer.start(await asyncio.wrap_future(future))
        await writer.finished

    async def close(self) -> None:
        """Stop: queued and running jobs are cancelled, every result is deleted."""
        self.accepting = False
        for task in self._runners:
            task.cancel()
        await asyncio.gather(*self._runners, return_exceptions=True)
        for job_id, writer in list(self._writers.items()):
            self.worker.close_session(job_id)
            writer.cancel()
        for job in self.jobs.values():
            if job.status in ("queued", "running"):
                self._set_status(job, "cancelled", "server shutting down")
        shutil.rmtree(self.root, ignore_errors=True)
