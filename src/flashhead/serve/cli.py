"""`flashhead serve`: load a pipeline and serve it (wired into flashhead.cli as the `serve` command)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
import uvicorn

from flashhead.errors import ConfigError
from flashhead.serve.limits import MiB, ServeLimits

logger = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    """uvicorn, with SIGTERM/SIGINT draining the live sessions before the server stops.

    First signal: stop admitting, end every session (each gets its final chunk and a `done` message, within
    `shutdown_grace_seconds`), then stop uvicorn and exit 0. A second signal stops at once.
    """

    def __init__(self, config: uvicorn.Config, service, grace_seconds: float):
        super().__init__(config)
        self.service = service  # flashhead.serve.app.ServeService, or None for a foreign app
        self.grace_seconds = grace_seconds
        self._draining = False
        self._tasks: set[asyncio.Task] = set()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        name = signal.Signals(sig).name
        logger.warning("received %s: draining live sessions (up to %.0f s)", name, self.grace_seconds)
        # A signal handler may interrupt the loop anywhere: only call_soon_threadsafe is safe to use here.
        asyncio.get_event_loop().call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        task = asyncio.get_running_loop().create_task(self._drain())
        self._tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        try:
            if self.service is not None:
                await self.service.drain(self.grace_seconds)
        finally:
            self.should_exit = True


def run_server(
    app,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    limits: ServeLimits | None = None,
    sock: socket.socket | None = None,
    log_level: str = "info",
) -> None:
    """Serve `app` until SIGTERM/SIGINT (drained as in GracefulServer)."""
    service = getattr(getattr(app, "state", None), "service", None)
    limits = limits or (service.limits if service is not None else ServeLimits())
    ws_max = max(limits.max_upload_bytes * 4 // 3 + 64 * 1024, limits.max_audio_message_bytes + 1024)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, ws_max_size=ws_max, timeout_graceful_shutdown=5,
        ws_per_message_deflate=False,  # JPEG and PCM do not compress; deflate would only cost CPU
        lifespan="on",
    )  # fmt: skip
    server = GracefulServer(config, service, limits.shutdown_grace_seconds)
    server.run(sockets=[sock] if sock is not None else None)


def check_port_free(host: str, port: int) -> None:
    """Bind (host, port) as uvicorn will, and let go: a port in use is refused before the model loads and warms up
    (minutes for Pro), not after. Another process may still take it in between; uvicorn then says so itself."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]  # fmt: skip
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closed port's TIME_WAIT is fine
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigError(f"cannot serve on {host}:{port}: {e.strerror.lower()} (another server?)") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(
    model: Annotated[str, typer.Option("--model", "-m", help="auto, lite, pro, tiny, or a pipeline folder.")] = "auto",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port.")] = 8000,
    host: Annotated[
        str, typer.Option("--host", help="Address to bind (default loopback only; use --token when exposing it).")
    ] = "127.0.0.1",
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="FLASHHEAD_TOKEN", help="Require 'Authorization: Bearer TOKEN' everywhere."),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option("--weights", help="Folder of the official release (SoulX-FlashHead-1_3B).")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: best).")] = None,
    max_sessions: Annotated[int, typer.Option("--max-sessions", help="Live sessions at most.")] = 8,
    max_batch: Annotated[int, typer.Option("--max-batch", help="Chunks generated together per round.")] = 8,
    max_session_seconds: Annotated[
        float, typer.Option("--max-session-seconds", help="A live session is ended after this long.")
    ] = 3600.0,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest portrait upload.")] = 10.0,
    ice_any: Annotated[
        bool, typer.Option("--webrtc-any-interface", help="Let WebRTC media use every interface, not just --host.")
    ] = False,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray", help="Place sessions on engine replicas of a Ray cluster: local, auto or ray://HOST:PORT."
        ),
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option("--replicas", help="With --ray: engine replicas (default: one per GPU; 1 without GPUs)."),
    ] = None,
    optimized: Annotated[
        bool, typer.Option("--optimized", help="Every output-preserving speed switch on (--switches adjusts).")
    ] = False,
    switches: Annotated[
        str, typer.Option("--switches", help='Speed switches, e.g. "compile_dit,cuda_graphs,attention=cudnn".')
    ] = "",
    warmup: Annotated[
        bool | None,
        typer.Option(
            "--warmup/--no-warmup",
            help="Run every batch size once before serving (default: on when a speed switch is on).",
        ),
    ] = None,
    compile_cache: Annotated[
        str,
        typer.Option(
            "--compile-cache",
            help="File of torch.compile artefacts shared between runs: auto (per model, GPU, torch and switches, "
            "under ~/.cache/flashhead/compile), a path, or off.",
        ),
    ] = "auto",
) -> None:
    """Serve live talking heads (WebRTC, WebSocket) and offline jobs (HTTP) with a browser page at /."""
    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline
    from flashhead.pipeline.registry import resolve_model_name
    from flashhead.pipeline.speed import SpeedConfig
    from flashhead.serve.app import create_app

    if max_sessions < 1 or max_batch < 1:
        raise ConfigError("--max-sessions and --max-batch must be at least 1")
    if replicas is not None and (ray is None or replicas < 1):
        raise ConfigError("--replicas needs --ray and must be at least 1")
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be from 1 to 65535, got {port}")
    check_port_free(host, port)
    if not max_session_seconds > 0 or not max_upload_mb > 0:
        raise ConfigError("--max-session-seconds and --max-upload-mb must be more than 0")
    if not is_loopback(host) and token is None:
        logger.warning("serving on %s without --token: anyone who can reach it can use it", host)
    limits = ServeLimits(
        max_sessions=max_sessions, max_batch=max_batch, max_session_seconds=max_session_seconds,
        max_upload_bytes=int(max_upload_mb * MiB),
    )  # fmt: skip
    ice = None  # WebRTC media on every interface, as the HTTP server
    if not ice_any and host not in ("0.0.0.0", "::"):
        ice = ["127.0.0.1"] if host == "localhost" else [host]
    if ray is not None and (optimized or switches or warmup):
        raise ConfigError("--optimized, --switches and --warmup are not available with --ray yet")
    if ray is not None:
        serve_on_ray(ray, replicas, model, weights, device, limits, host, port, token, ice)
        return
    started = time.perf_counter()
    pipe = FlashHeadPipeline.from_pretrained(resolve_model_name(model, weights), weights=weights, device=device)
    loaded = time.perf_counter()
    speed = SpeedConfig.parse(switches, base=SpeedConfig.optimized() if optimized else None)
    pipe.optimize(speed)
    print(loaded_line(pipe.name, loaded - started, time.perf_counter() - loaded), flush=True)
    app = create_app(pipe, token=token, limits=limits, ice_addresses=ice)
    if warmup if warmup is not None else not speed.is_plain:
        warm_in_engine_thread(app.state.service.worker, pipe, max_batch, compile_cache)
    print(f"flashhead serve: {pipe.name} on http://{host}:{port}/ (auth {'on' if token else 'off'})")
    run_server(app, host, port, limits=limits)


def warm_in_engine_thread(worker, pipe, max_batch: int, compile_cache: str) -> dict:
    """`prepare_engine` in the engine thread that will serve the sessions, before the server listens.

    torch keeps cuDNN's convolution-algorithm choices per thread (its cuDNN benchmark cache is thread-local), and
    cuBLAS / cuDNN handles too: a warm-up in the main thread left the engine thread to search again in its first
    session for every convolution run outside a CUDA graph (wav2vec2's, the first chunk's decode in pieces with
    early_first_frames): the likely cause of a Pro server's first frame 1.65 s after the first audio against the
    bench's 0.32 s (session 34). Starting the worker here is what the server's start does later (a no-op then)."""
    worker.start()
    return worker.submit(prepare_engine, pipe, max_batch, compile_cache).result()


def prepare_engine(pipe, max_batch: int, compile_cache: str) -> dict:
    """Cold start before the first session: load compile artefacts, run every batch size once, save what
    was compiled for the next start (flashhead.pipeline.warmup). Returns `warm_up`'s result."""
    from flashhead.pipeline.warmup import (
        default_cache_path,
        load_compile_cache,
        save_compile_cache,
        warm_batch_sizes,
        warm_up,
    )

    compiles = any(getattr(pipe.speed, name) for name in ("compile_dit", "compile_vae", "compile_color"))
    path = None
    if compiles and compile_cache != "off":
        path = default_cache_path(pipe) if compile_cache == "auto" else Path(compile_cache)
    started = time.perf_counter()
    hit = load_compile_cache(path) if path is not None else False
    read_s = time.perf_counter() - started
    result = warm_up(pipe, warm_batch_sizes(max_batch))
    from torch._dynamo.utils import counters

    graphs = counters["inductor"]
    cache = "off" if path is None else f"{'loaded' if hit else 'new'} {path}"
    cache += f" in {read_s:.1f} s" if hit else ""
    if path is not None and hit and graphs["fxgraph_cache_miss"] == 0:
        cache += ", unchanged"  # every graph came from the file: writing it again (seconds) would add nothing
    elif path is not None:
        started = time.perf_counter()
        saved = save_compile_cache(path)
        cache += f", saved {saved} B in {time.perf_counter() - started:.1f} s" if saved else ""
    if compiles:  # whether the artefacts were really used: a loaded file whose graphs all miss saved nothing
        cache += f"; Inductor graphs: {graphs['fxgraph_cache_hit']} cached, {graphs['fxgraph_cache_miss']} compiled"
    print(warmed_up_line(max_batch, result, cache), flush=True)
    return result


def loaded_line(name: str, load_s: float, optimize_s: float) -> str:
    """The startup line once the model is in memory (benchmarks/serve_cold_start.py reads it): the seconds that
    loading the weights and applying the speed switches took (the cold start's other parts beside the warm-up)."""
    return f"flashhead serve: {name} loaded in {load_s:.1f} s, speed switches applied in {optimize_s:.1f} s"


def warmed_up_line(max_batch: int, result: dict, cache: str) -> str:
    """The startup line after the warm-up (benchmarks/serve_cold_start.py reads it): seconds, GPU memory held where
    there is a GPU, the part of the seconds spent opening the warm-up's sessions (their portraits' encode), what
    the compile cache did, and the thread it ran in (the engine's: see `warm_in_engine_thread`)."""
    held = f", {result['gpu_memory_held_gib']:.1f} GiB of GPU memory held" if "gpu_memory_held_gib" in result else ""
    opened = result.get("open_seconds_by_batch")
    opened = f"sessions opened in {sum(opened.values()):.1f} s; " if opened else ""
    return (f"flashhead serve: warmed up batch sizes 1-{max_batch} in {result['total_seconds']:.1f} s{held} "
            f"({opened}compile cache: {cache}; in thread {result.get('thread', '?')})")  # fmt: skip


def serve_on_ray(
    address: str, replicas: int | None, model: str, weights: Path | None, device: str | None, limits: ServeLimits,
    host: str, port: int, token: str | None, ice: list[str] | None,
) -> None:  # fmt: skip
    """The same server, its sessions placed on engine replicas of a Ray cluster (docs/scaling.md)."""
    try:
        from flashhead.serve.cluster import RayCluster, parse_address
        from flashhead.serve.replica import ReplicaSpec
    except ImportError as e:
        raise ConfigError(f"--ray needs Ray Serve: pip install 'flashhead[serve]' ({e})") from None
    from flashhead.serve.app import create_app

    parse_address(address)  # a bad address fails before Ray starts
    spec = ReplicaSpec(
        model=model, weights=str(weights) if weights else None, device=device, max_sessions=limits.max_sessions,
        max_batch=limits.max_batch, max_buffered_seconds=limits.max_buffered_audio_seconds,
    )  # fmt: skip
    with RayCluster.connect(address, spec, replicas=replicas) as cluster:
        engine = cluster.engine()
        # The front end admits every replica's sessions; each replica still refuses beyond its own measured capacity.
        front = ServeLimits(**{**limits.__dict__, "max_sessions": engine.max_sessions - limits.max_running_jobs})
        app = create_app(engine, token=token, limits=front, ice_addresses=ice)
        n = cluster.resources.replicas
        print(f"flashhead serve: {cluster.info['model']} on {n} Ray replica(s), http://{host}:{port}/ "
              f"(auth {'on' if token else 'off'})")  # fmt: skip
        run_server(app, host, port, limits=front)
