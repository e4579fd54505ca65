"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


class FrameRate:
    """Frames per second over a sliding window, fed from the engine thread, read by the scraper."""

    def __init__(self, window_seconds: float = 10.0):
        self.window = window_seconds
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, frames: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._events.append((now, frames))
            self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._events) / self.window

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window:
            self._events.popleft()


class ServeMetrics:
    """Everything /metrics exports. Names are prefixed `flashhead_`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active_sessions = Gauge(
            "flashhead_active_sessions", "Open sessions by transport.", ["transport"], registry=r
        )
        self.sessions = Counter("flashhead_sessions", "Sessions opened, by transport.", ["transport"], registry=r)
        self.rejected = Counter(
            "flashhead_rejected_sessions",
            "Sessions and uploads refused, by reason (capacity, unauthorized, too_large, no_face, bad_request, ...).",
            ["reason"],
            registry=r,
        )
        self.aborted = Counter(
            "flashhead_aborted_sessions", "Sessions ended by an error, by code.", ["code"], registry=r
        )
        self.frames = Counter("flashhead_frames", "Frames generated.", registry=r)
        self.frame_rate = FrameRate()
        self.fps = Gauge("flashhead_frames_per_second", "Frames generated per second (10 s window).", registry=r)
        self.fps.set_function(self.frame_rate.rate)
        self.chunk_latency = Histogram(
            "flashhead_chunk_latency_seconds",
            "Chunk ready (its audio complete) -> chunk handed to the transport.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.session_open = Histogram(
            "flashhead_session_open_seconds",
            "Session admitted -> open on the engine (waiting for the engine thread, then the portrait's VAE encode).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.round_seconds = Histogram(
            "flashhead_round_seconds", "Duration of one engine round (a batch of chunks).", buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("flashhead_queue_depth", "Items waiting, by queue.", ["queue"], registry=r)
        self.jobs = Counter("flashhead_jobs", "Offline jobs finished, by status.", ["status"], registry=r)

    def watch_queue(self, name: str, depth: Callable[[], float]) -> None:
        self.queue_depth.labels(name).set_function(depth)

    def round_done(self, batch: int, seconds: float, frames: int) -> None:
        self.round_seconds.observe(seconds)
        self.frames_done(frames)

    def frames_done(self, frames: int) -> None:
        """Frames generated: by this server's engine, or by the cluster replicas it fronts (`serve --ray`)."""
        self.frames.inc(frames)
        self.frame_rate.add(frames)

    def chunk_sent(self, latency: float | None) -> None:
        if latency is not None:
            self.chunk_latency.observe(latency)

    def render(self) -> bytes:
        return generate_latest(self.registry)
