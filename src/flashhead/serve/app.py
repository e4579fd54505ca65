"""The FastAPI application: routes that validate, authenticate and translate; the engine does the work.

`create_app(pipeline_or_engine)` builds everything a server needs around one engine: the engine thread, the
live-session hub, the portrait store, the job queue, the WebRTC gateway and the metrics. docs/serving.md is
the API reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from flashhead.errors import (
    AudioError,
    CapacityError,
    ConfigError,
    FlashHeadError,
    ImageError,
    MediaError,
    NoFaceError,
    SessionError,
)
from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline
from flashhead.pipeline.stream import StreamEngine
from flashhead.serve.auth import BearerAuth, Unauthorized
from flashhead.serve.jobs import JobManager
from flashhead.serve.limits import ServeLimits, UploadLimit
from flashhead.serve.metrics import ServeMetrics
from flashhead.serve.portraits import PortraitStore
from flashhead.serve.protocol import WebRTCOffer
from flashhead.serve.sessions import SessionHub
from flashhead.serve.websocket import WebSocketStream
from flashhead.serve.worker import EngineWorker

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"

# HTTP status and wire code of each user-facing error.
ERROR_STATUS: dict[type[FlashHeadError], tuple[int, str]] = {
    NoFaceError: (422, "no_face"),
    ImageError: (422, "bad_image"),
    AudioError: (422, "bad_audio"),
    MediaError: (422, "bad_media"),
    ConfigError: (422, "bad_request"),
    CapacityError: (503, "capacity"),
    SessionError: (404, "not_found"),
}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class ServeService:
    """Everything one server holds; `app.state.service`."""

    def __init__(
        self,
        engine: StreamEngine,
        *,
        token: str | None,
        limits: ServeLimits,
        ice_addresses: list[str] | None,
    ):
        self.engine = engine
        self.pipeline: FlashHeadPipeline = engine.pipeline
        self.limits = limits
        self.auth = BearerAuth(token)
        self.metrics = ServeMetrics()
        # An engine may bring its own worker: the Ray front end's runs sessions on cluster replicas.
        make_worker = getattr(engine, "make_worker", None)
        self.worker = make_worker(self.metrics) if make_worker else EngineWorker(engine, observer=self.metrics)
        self.hub = SessionHub(self.worker, limits, self.metrics)
        self.portraits = PortraitStore(self.pipeline, max_items=limits.max_portraits, ttl=limits.portrait_ttl_seconds)
        self.jobs = JobManager(self.worker, self.portraits, limits, self.metrics)
        self.webrtc, self.webrtc_missing = None, None
        try:  # aiortc and PyAV (the serve extra): without them the rest of the server still runs
            from flashhead.serve.webrtc import WebRTCGateway, restrict_ice_addresses
        except ImportError as e:
            self.webrtc_missing = (
                f"WebRTC is not available on this server ({e}): pip install 'flashhead[serve]' (aiortc, PyAV)"
            )
            logger.warning("%s; WebSocket streams still work", self.webrtc_missing)
        else:
            self.webrtc = WebRTCGateway(self.hub, self.pipeline.config.fps, local_only=ice_addresses is not None)
            restrict_ice_addresses(ice_addresses)
        self.encode_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="flashhead-encode")
        self.draining = False
        self.started = time.time()
        m = self.metrics
        m.watch_queue("engine_ready", lambda: sum(s.has_chunk_ready() for s in list(engine.sessions.values())))
        m.watch_queue("outbound_chunks", self.hub.pending_chunks)
        m.watch_queue("jobs", lambda: self.jobs.queued)

    async def start(self) -> None:
        self.worker.start()
        self.jobs.start()

    async def drain(self, timeout: float | None = None) -> None:
        """Stop admitting; end every live session and give them `timeout` seconds to send their final chunk."""
        self.draining = True
        self.jobs.accepting = False
        await self.hub.drain(self.limits.shutdown_grace_seconds if timeout is None else timeout)

    async def close(self) -> None:
        if not self.draining:
            await self.drain(0.0)
        if self.webrtc is not None:
            await self.webrtc.close_all()
        await self.jobs.close()
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
        self.portraits.close()
        self.encode_pool.shutdown(wait=False, cancel_futures=True)

    def health(self) -> dict:
        config = self.pipeline.config
        return {
            "status": "draining" if self.draining else ("ok" if self.worker.running else "engine stopped"),
            "model": self.pipeline.name,
            "width": config.width,
            "height": config.height,
            "fps": config.fps,
            "sample_rate": config.sample_rate,
            "chunk_frames": self.pipeline.new_frames,
            "sessions": self.hub.admission.active,
            "max_sessions": self.hub.admission.max_sessions,
            "jobs_queued": self.jobs.queued,
            "auth": self.auth.enabled,
            "webrtc": self.webrtc is not None,
            "uptime_seconds": round(time.time() - self.started, 1),
        } | ({"replicas": self.engine.replicas()} if hasattr(self.engine, "replicas") else {})


def create_app(
    engine_or_pipeline: StreamEngine | FlashHeadPipeline,
    *,
    token: str | None = None,
    limits: ServeLimits | None = None,
    ice_addresses: Sequence[str] | None = ("127.0.0.1",),
) -> FastAPI:
    """Build the server app around a loaded pipeline (an engine is made for it) or a ready engine.

    Args:
        engine_or_pipeline: the model. A given engine (local, or a Ray cluster's ClusterEngine) is used as is
            (its `max_sessions` caps the live sessions, less `limits.max_running_jobs` slots kept for offline jobs).
        token: enables bearer-token auth on every API endpoint.
        limits: sizes, counts and durations the server enforces.
        ice_addresses: the only addresses WebRTC media may use (default loopback; None: every interface).
    """
    limits = limits or ServeLimits()
    if isinstance(engine_or_pipeline, StreamEngine) or hasattr(engine_or_pipeline, "make_worker"):
        engine = engine_or_pipeline  # a local engine, or flashhead.serve.cluster.ClusterEngine
        if isinstance(engine, StreamEngine):
            engine.watermark = True  # everything a server sends is marked (cluster replicas mark their own)
    else:
        engine = StreamEngine(
            engine_or_pipeline, max_sessions=limits.engine_sessions, max_batch=limits.max_batch,
            max_buffered_seconds=limits.max_buffered_audio_seconds, watermark=True,
        )  # fmt: skip
    service = ServeService(
        engine, token=token, limits=limits, ice_addresses=None if ice_addresses is None else list(ice_addresses)
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(title="flashhead", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(
        UploadLimit,
        limits={"/v1/jobs": limits.max_job_upload_bytes, "/v1/portraits": limits.max_upload_bytes},
        default=limits.max_upload_bytes,
    )

    @app.exception_handler(FlashHeadError)
    async def flashhead_error(request: Request, error: FlashHeadError) -> JSONResponse:
        status, code = next(((s, c) for t, (s, c) in ERROR_STATUS.items() if isinstance(error, t)), (500, "internal"))
        if request.url.path in ("/v1/portraits", "/v1/jobs", "/v1/webrtc/offer") and status != 404:
            service.metrics.rejected.labels(code).inc()
        return error_response(status, code, str(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
                503: "unavailable"}.get(
            error.status_code, "bad_request"
        )
        if error.status_code == 413:
            service.metrics.rejected.labels("too_large").inc()
        return error_response(error.status_code, code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def validation_error(request: Request, error: ValidationError | RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(422, "bad_request", f"{where}: {first['msg']}" if where else first["msg"])

    def authenticated(request: Request) -> None:
        try:
            service.auth.check(request)
        except Unauthorized as e:
            service.metrics.rejected.labels("unauthorized").inc()
            raise HTTPException(401, str(e), headers={"WWW-Authenticate": "Bearer"}) from None

    def admitting() -> None:
        if service.draining:
            raise CapacityError("server is shutting down; not accepting new work")

    api = APIRouter(dependencies=[Depends(authenticated)])

    @api.get("/healthz")
    async def healthz() -> JSONResponse:
        health = service.health()
        return JSONResponse(health, status_code=200 if health["status"] == "ok" else 503)

    @api.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @api.post("/v1/portraits", status_code=201, dependencies=[Depends(admitting)])
    async def upload_portrait(
        file: Annotated[UploadFile, File(description="A portrait image (PNG, JPEG, WebP).")],
        crop: Annotated[bool, Form()] = True,
    ) -> dict:
        data = await file.read()
        if len(data) > limits.max_upload_bytes:  # the middleware stops bodies far larger than this
            raise HTTPException(413, f"portrait of {len(data)} bytes; the limit is {limits.max_upload_bytes}")
        image = await service.portraits.prepare(data, Path(file.filename or "").suffix, crop=crop)
        portrait = service.portraits.add(image)
        return {
            "id": portrait.id, "width": image.shape[1], "height": image.shape[0],
            "image_url": f"/v1/portraits/{portrait.id}/image",
        }  # fmt: skip

    @api.get("/v1/portraits/{portrait_id}/image")
    async def portrait_image(portrait_id: str) -> Response:
        return Response(service.portraits.get(portrait_id).png(), media_type="image/png")

    @api.post("/v1/webrtc/offer", dependencies=[Depends(admitting)])
    async def webrtc_offer(offer: WebRTCOffer) -> dict:
        if service.webrtc is None:
            raise HTTPException(503, service.webrtc_missing)
        portrait = service.portraits.get(offer.portrait_id).image
        try:
            answer = await service.webrtc.connect(offer, portrait)
        except ValueError as e:  # aiortc: malformed SDP
            raise HTTPException(400, f"invalid offer: {e}") from None
        return answer.model_dump()

    @api.post("/v1/jobs", status_code=202, dependencies=[Depends(admitting)])
    async def submit_job(
        image: Annotated[UploadFile, File(description="Portrait image.")],
        audio: Annotated[UploadFile, File(description="Speech: WAV/MP3/M4A/FLAC/OGG or a video file.")],
        seed: Annotated[int, Form()] = 42,
        crop: Annotated[bool, Form()] = True,
    ) -> dict:
        job = await service.jobs.submit((image.filename, image), (audio.filename, audio), seed=seed, crop=crop)
        return job.describe() | {"status_url": f"/v1/jobs/{job.id}"}

    @api.get("/v1/jobs/{job_id}")
    async def job_status(job_id: str) -> dict:
        return service.jobs.get(job_id).describe()

    @api.get("/v1/jobs/{job_id}/video")
    async def job_video(job_id: str) -> Response:
        job = service.jobs.get(job_id)
        if job.status != "done":
            return error_response(409, "not_ready", f"job {job_id} is {job.status}, not done")
        return FileResponse(job.video_path, media_type="video/mp4", filename=f"{job_id}.mp4")

    @api.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str) -> dict:
        return service.jobs.cancel(job_id).describe()

    app.include_router(api)

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        await WebSocketStream(ws, service).run()

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
