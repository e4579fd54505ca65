"""The streaming engine: many live avatar sessions on one pipeline, audio in, frames out.

A session receives PCM in pieces of any size (20 ms microphone frames or a whole TTS sentence at once).
As soon as one chunk's worth of new audio (Lite 0.96 s, Pro 1.12 s) is buffered, the chunk can be
generated; the engine gathers every session that has a chunk ready and generates them together, one DiT
call per denoising step for the whole batch. Each chunk's new frames come back with their frame index, a
timestamp and the exact audio samples they show, so a transport can play audio and video in sync.

Memory and time per chunk are bounded: the Temporal Audio Context Cache is a fixed 8 s FIFO and a session
keeps only its latest motion latents. The engine knows nothing of HTTP or WebRTC (see flashhead.serve).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from flashhead.errors import AudioError, CapacityError, SessionError
from flashhead.models.audio import AudioContextCache, prepare_waveform
from flashhead.pipeline.flashhead_pipeline import (
    ChunkNoise,
    FlashHeadPipeline,
    HostFrames,
    ReferenceState,
    reference_generator,
)

logger = logging.getLogger(__name__)


@dataclass
class VideoChunk:
    """New frames of one session, in order, with the audio they lip-sync to."""

    session_id: str
    frames: np.ndarray  # (n, H, W, 3) uint8
    start_frame: int  # index of frames[0] since the session started
    fps: int
    audio: np.ndarray  # (n * sample_rate / fps,) float32: the samples these frames show (silence when idle)
    final: bool = False  # the session's last chunk after `end()`

    @property
    def pts(self) -> float:
        """Presentation time of the first frame, in seconds from the session start."""
        return self.start_frame / self.fps


@dataclass
class _AudioAhead:
    """A slice taken and encoded ahead on a side CUDA stream; `ready` is recorded when its context is done."""

    samples: np.ndarray
    filled: int
    context: torch.Tensor
    ready: torch.cuda.Event


@dataclass
class _Round:
    """A round queued on the device whose frames are on their way to the host."""

    sessions: list[StreamSession]
    slices: list[tuple[np.ndarray, int]]  # (samples, real samples) each chunk shows
    finals: list[bool]
    frames: HostFrames  # every chunk's new frames, or those after `early`'s
    launched: float  # time.perf_counter() when it was queued
    early: HostFrames | None = None  # first frames handed out ahead of the rest (early_first_frames), until delivered
    handed: list[int] = field(default_factory=list)  # frames of each chunk already handed out


@dataclass
class _Pending:
    samples: np.ndarray
    speech: bool  # False for silence the engine inserted to keep the avatar alive


class StreamSession:
    """One avatar: its portrait, noise generators, audio FIFO and motion latents.

    `push_audio`, `end` and `interrupt` may be called from any thread; generation happens in the engine.
    """

    def __init__(
        self,
        session_id: str,
        reference: ReferenceState,
        cache: AudioContextCache,
        seed: int,
        realtime: bool,
        max_buffered_seconds: float,
    ):
        self.id = session_id
        self.reference = reference
        self.cache = cache
        self.realtime = realtime
        self.generator = torch.Generator().manual_seed(seed)
        self.encode_generator = torch.Generator().manual_seed(seed + 1)
        self.motion_latents = reference.first_motion
        self.sample_rate = cache.config.sample_rate
        self.max_buffered = int(max_buffered_seconds * self.sample_rate)
        self._lock = threading.Lock()
        self._pending: deque[_Pending] = deque()
        self._pending_samples = 0
        self.frames_emitted = 0
        self.frames_following = 0  # the rest of a chunk whose early frames were handed out, still on its way
        self._consumed = 0  # samples (speech and inserted silence) already generated
        self.speech_samples = 0  # real (not inserted) samples received
        self.ended = False
        self.finished = False
        self.opened_at = time.monotonic()
        self.first_audio_at: float | None = None
        self.first_frame_at: float | None = None
        # Where a first frame's time went (benchmarks): when its first round was all queued, how long the host then
        # waited for the frames (near zero: the host, not the GPU, set the time to the first frame).
        self.first_round_queued_at: float | None = None
        self.first_frame_wait_s: float | None = None
        self.ready_since: tuple[float, int] | None = None  # (time, order) it first had a chunk ready
        # Work done ahead while the GPU ran the previous round (pinned_memory / audio_stream switches).
        self.noise_ahead: ChunkNoise | None = None
        self.audio_ahead: _AudioAhead | None = None
        self.in_flight = 0  # rounds launched with this session's chunk and not delivered yet
        self.final_launched = False  # its last chunk is launched: it takes no further round
        self.reference_encoded: torch.cuda.Event | None = None  # recorded after the portrait's encode (CUDA)

    def reference_ready(self) -> bool:
        """Whether the GPU has finished encoding the portrait (its launch returns before: open_session waits for
        nothing). A server says `ready` only then, so a client's first audio does not queue behind the encode."""
        return self.reference_encoded is None or self.reference_encoded.query()

    # -- called by clients --------------------------------------------------------------------------

    def push_audio(self, samples: np.ndarray | torch.Tensor, sample_rate: int | None = None) -> None:
        """Queue speech (mono, any length, any rate: resampled to 16 kHz)."""
        if self.ended:
            raise SessionError(f"session {self.id} has ended; open a new one")
        waveform = prepare_waveform(samples, sample_rate or self.sample_rate, self.sample_rate).numpy()
        if waveform.size == 0:
            return
        with self._lock:
            # Keep-alive silence that is queued but not generated yet gives way to real speech.
            while self._pending and not self._pending[-1].speech:
                self._pending_samples -= self._pending.pop().samples.size
            if self._pending_samples + waveform.size > self.max_buffered:
                raise AudioError(
                    f"session {self.id}: more than {self.max_buffered / self.sample_rate:.0f} s of audio queued"
                )
            self._pending.append(_Pending(waveform, True))
            self._pending_samples += waveform.size
            self.speech_samples += waveform.size
            if self.first_audio_at is None:
                self.first_audio_at = time.monotonic()

    def end(self) -> None:
        """No more audio: the last partial chunk is generated (padded with silence) and the session finishes."""
        self.ended = True

    def interrupt(self) -> None:
        """Drop all queued speech not yet generated; the avatar is idle again from the next chunk."""
        with self._lock:
            dropped = sum(p.samples.size for p in self._pending if p.speech)
            self._pending.clear()
            self._pending_samples = 0
            self.speech_samples -= dropped

    # -- used by the engine ---------------------------------------------------------------------------

    @property
    def slice_samples(self) -> int:
        return self.cache.slice_samples

    @property
    def buffered_samples(self) -> int:
        return self._pending_samples

    def total_frames(self) -> int:
        """Frames a finished session shows: its speech and inserted silence, at 25 fps."""
        fps = self.cache.config.fps
        return round(self.consumed_samples_total() * fps / self.sample_rate)

    def consumed_samples_total(self) -> int:
        return self._consumed + self._pending_samples

    def has_chunk_ready(self) -> bool:
        if self.finished or self.final_launched:
            return False
        return self.audio_ahead is not None or self._pending_samples >= self.slice_samples or self.ended

    def keep_alive(self, now: float, lead_seconds: float) -> None:
        """A live session whose audio has run dry gets one chunk of silence, so its video never freezes.

        Silence is added only when the frames generated so far would run out within `lead_seconds` (the time
        a chunk takes to generate): a live avatar starts moving as soon as it is opened and never stalls.
        """
        if not self.realtime or self.ended or self.audio_ahead is not None:
            return
        fps = self.cache.config.fps
        start = self.first_frame_at if self.first_frame_at is not None else self.opened_at
        shown_until = start + (self.frames_emitted + self.frames_following) / fps  # the last generated one played
        if now + lead_seconds >= shown_until and self._pending_samples < self.slice_samples:
            with self._lock:
                missing = self.slice_samples - self._pending_samples
                self._pending.append(_Pending(np.zeros(missing, dtype=np.float32), False))
                self._pending_samples += missing

    def take_slice(self) -> tuple[np.ndarray, int]:
        """Pop one slice of samples (zero-padded at the end of a stream) and how many of them are real."""
        with self._lock:
            out = np.zeros(self.slice_samples, dtype=np.float32)
            filled = 0
            while filled < self.slice_samples and self._pending:
                head = self._pending[0]
                n = min(self.slice_samples - filled, head.samples.size)
                out[filled : filled + n] = head.samples[:n]
                filled += n
                if n == head.samples.size:
                    self._pending.popleft()
                else:
                    head.samples = head.samples[n:]
            self._pending_samples -= filled
            self._consumed += filled
            return out, filled


@dataclass
class EngineStats:
    rounds: int = 0
    chunks: int = 0
    frames: int = 0
    round_seconds: deque = field(default_factory=lambda: deque(maxlen=50))  # (batch size, seconds)


class StreamEngine:
    """Schedules sessions onto one pipeline, batching chunks that are ready at the same time.

    Args:
        pipeline: a loaded FlashHeadPipeline (shared by every session; portraits are per session).
        max_sessions: hard cap on open sessions.
        max_batch: most chunks generated together in one round.
        realtime_margin: admission keeps the predicted round time below this fraction of a chunk's duration.
    """

    def __init__(
        self,
        pipeline: FlashHeadPipeline,
        max_sessions: int = 16,
        max_batch: int = 8,
        realtime_margin: float = 0.85,
        max_buffered_seconds: float = 120.0,
        watermark: bool = False,
    ):
        self.pipeline = pipeline
        self.watermark = watermark  # frames leave marked (added on the device); servers turn it on
        self.max_sessions = max_sessions
        self.max_batch = max_batch
        self.realtime_margin = realtime_margin
        self.max_buffered_seconds = max_buffered_seconds
        self.sessions: dict[str, StreamSession] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._ready_order = itertools.count()
        self._in_flight: _Round | None = None  # launched ahead (launch_ahead switch), delivered by the next step
        self._last_delivered = 0.0

    @property
    def chunk_seconds(self) -> float:
        return self.pipeline.new_frames / self.pipeline.config.fps

    # -- sessions -----------------------------------------------------------------------------------

    def open_session(
        self,
        portrait: np.ndarray,
        *,
        seed: int = 42,
        realtime: bool = False,
        session_id: str | None = None,
    ) -> StreamSession:
        """Admit a session for a prepared portrait (H, W, 3) uint8 at the pipeline's output size.

        `realtime=True` marks a live session (microphone): its video keeps going in silence when no audio
        arrives. Raises CapacityError when the engine is full.
        """
        with self._lock:  # the slot is reserved under the lock, so concurrent opens cannot exceed the limits
            if len(self.sessions) >= self.max_sessions:
                raise CapacityError(f"at capacity: {len(self.sessions)} of {self.max_sessions} sessions open")
            if realtime and not self.can_admit_realtime():
                active = self.active_sessions()
                raise CapacityError(
                    f"at measured capacity: {active} active sessions already need "
                    f"{self.predicted_round_seconds(min(active + 1, self.max_batch)):.2f} s per "
                    f"{self.chunk_seconds:.2f} s chunk with one more"
                )
            session_id = session_id or f"s{next(self._ids)}"
            if session_id in self.sessions:
                raise SessionError(f"session {session_id} already exists")
            self.sessions[session_id] = None  # type: ignore[assignment]  # reserved while the portrait encodes
        try:
            reference = self.pipeline.encode_reference(portrait, generator=reference_generator(seed))
            cache = AudioContextCache(
                self.pipeline.audio_encoder, self.pipeline.new_frames, self.pipeline.audio_config()
            )
            session = StreamSession(session_id, reference, cache, seed, realtime, self.max_buffered_seconds)
            if self.pipeline.speed.pinned_memory:
                # The first chunk's noise, drawn now from the session's generator (the numbers its first launch
                # would draw), so that no host work sits between the first audio features and the first DiT. Under
                # torchrun (one CPU thread per process) drawing Pro's took 18 ms there while the GPU idled (run 44's
                # trace); `flashhead bench` on one H100 showed no change in the first frame (run 46).
                session.noise_ahead = self.pipeline.draw_noise(session.generator)
            if reference.latents.is_cuda:
                session.reference_encoded = torch.cuda.Event()
                session.reference_encoded.record()
        except BaseException:
            with self._lock:
                self.sessions.pop(session_id, None)
            raise
        with self._lock:
            self.sessions[session_id] = session
        return session

    def close_session(self, session_id: str) -> None:
        with self._lock:
            self.sessions.pop(session_id, None)

    def session(self, session_id: str) -> StreamSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionError(f"no session {session_id!r}")
        return session

    def _open(self) -> list[StreamSession]:
        return [s for s in list(self.sessions.values()) if s is not None]

    def realtime_sessions(self) -> int:
        return sum(s.realtime for s in self._open())

    def active_sessions(self) -> int:
        """Sessions that still take batch slots: every unfinished one, live or not."""
        return sum(not s.finished for s in self._open())

    # -- capacity -----------------------------------------------------------------------------------

    def predicted_round_seconds(self, batch: int) -> float:
        """Time of a round of `batch` chunks, from a linear fit t = a + b * batch of recent rounds."""
        rounds = list(self.stats.round_seconds)
        if not rounds:
            return 0.0
        sizes = np.array([r[0] for r in rounds], dtype=np.float64)
        times = np.array([r[1] for r in rounds], dtype=np.float64)
        if np.ptp(sizes) == 0:  # one batch size seen: assume cost proportional to batch size
            return float(times.mean() / sizes.mean() * batch)
        b, a = np.polyfit(sizes, times, 1)
        return float(max(a, 0.0) + max(b, 0.0) * batch)

    def can_admit_realtime(self) -> bool:
        live = self.active_sessions() + 1
        rounds = math.ceil(live / self.max_batch)  # rounds needed per chunk period
        per_round = self.predicted_round_seconds(min(live, self.max_batch))
        return rounds * per_round <= self.realtime_margin * self.chunk_seconds

    # -- generation ---------------------------------------------------------------------------------

    @property
    def in_flight(self) -> bool:
        """Whether a round was launched ahead and waits for the next `step` to deliver its frames."""
        return self._in_flight is not None

    @property
    def launches_ahead(self) -> bool:
        """Whether the next round is queued before the current one's frames are waited for: with the launch_ahead
        switch, and always where the pipeline is split over GPUs, whose followers otherwise wait for the leader's
        host between chunks (Pro on 2 H200s: 334.2 -> 326.0 ms per chunk; one GPU: no change, docs/performance-log.md).
        """
        return self.pipeline.speed.launch_ahead or self.pipeline.sequence_parallel

    def step(self, now: float | None = None) -> list[VideoChunk]:
        """Run one round: generate the next chunk of up to `max_batch` ready sessions (longest waiting first).

        Launching ahead (`launches_ahead`), the round after it is queued on the device before this round's
        frames are waited for, and delivered by the next call (not while this round holds a first chunk).
        """
        now = time.monotonic() if now is None else now
        sessions = self._open()
        lead = self.predicted_round_seconds(min(len(sessions), self.max_batch)) + 0.2
        for s in sessions:
            s.keep_alive(now, lead_seconds=lead)
        out: list[VideoChunk] = []
        for s in sessions:  # ended with every frame shown: close the stream without generating padding
            if s.ended and not s.finished and s.in_flight == 0 and s.buffered_samples == 0 \
                    and s.total_frames() <= s.frames_emitted:  # fmt: skip
                s.finished = True
                empty = np.zeros((0, self.pipeline.config.height, self.pipeline.config.width, 3), np.uint8)
                out.append(
                    VideoChunk(s.id, empty, s.frames_emitted, self.pipeline.config.fps, np.zeros(0, np.float32), True)
                )
        current, self._in_flight = self._in_flight, None
        try:
            if current is None:
                current = self._launch(self._ready(sessions, now))
                if current is None:
                    return out
            if current.early is not None:  # a first chunk's first frames; the next call delivers the rest
                out.extend(self._deliver(current, early=True))
                self._in_flight = current
                return out
            # A session's first chunk is handed out before the next round is queued: queuing it first would add
            # the host's launch time of a whole round to the time to the first frame.
            if self.launches_ahead and all(s.first_frame_at is not None for s in current.sessions):
                self._in_flight = self._launch(self._ready(self._open(), now, ahead=True))
            out.extend(self._deliver(current))
        except BaseException:
            for r in (current, self._in_flight):  # a failed round's frames are lost; do not wait for them
                for s in r.sessions if r is not None else ():
                    s.in_flight = 0
            self._in_flight = None
            raise
        return out

    def _ready(self, sessions: list[StreamSession], now: float, ahead: bool = False) -> list[StreamSession]:
        """The sessions of the next round: up to max_batch with a chunk ready, longest waiting first."""
        ready = []
        for s in sessions:
            if not s.has_chunk_ready():
                continue
            if ahead and s.ended and s.buffered_samples == 0 and s.audio_ahead is None \
                    and s.total_frames() <= s.frames_emitted + s.in_flight * self.pipeline.new_frames:  # fmt: skip
                continue  # every frame is in flight already: the session closes once they are delivered
            if s.ready_since is None:
                s.ready_since = (now, next(self._ready_order))  # ties (one clock reading) in the order seen
            ready.append(s)
        return sorted(ready, key=lambda s: s.ready_since)[: self.max_batch]

    def _launch(self, ready: list[StreamSession]) -> _Round | None:
        """Queue one round's generation and the copy of its frames to the host; nothing here waits for the GPU."""
        if not ready:
            return None
        started = time.perf_counter()
        pipe = self.pipeline
        speed = pipe.speed
        ahead = [s.audio_ahead for s in ready]
        slices = [(a.samples, a.filled) if a is not None else s.take_slice() for s, a in zip(ready, ahead, strict=True)]
        with pipe.timer("audio_features"):
            contexts: list[torch.Tensor | None] = [None] * len(ready)
            fresh = [i for i, a in enumerate(ahead) if a is None]
            for i, a in enumerate(ahead):
                if a is not None:
                    torch.cuda.current_stream().wait_event(a.ready)
                    a.context.record_stream(torch.cuda.current_stream())
                    contexts[i] = a.context
                    ready[i].audio_ahead = None
            if fresh:
                for i in fresh:
                    ready[i].cache.append(slices[i][0])
                for i, context in zip(fresh, self._encode_audio([ready[i] for i in fresh]), strict=True):
                    contexts[i] = context
        noise_kwargs = {}
        if speed.pinned_memory or any(s.noise_ahead is not None for s in ready):
            # Each session's next noise from its own generator, in order: drawn ahead last round, or now.
            drawn = [s.noise_ahead or pipe.draw_noise(s.generator) for s in ready]
            noise_kwargs = {"noises": [d.initial for d in drawn],
                            "renoises": None if pipe.config.use_euler else [d.renoise for d in drawn]}  # fmt: skip
        finals = [s.ended and s.buffered_samples == 0 for s in ready]
        audio_ahead = None
        if self._audio_on_side_stream():
            # Queued once this round's DiT is (not before the chunk, not after it): launching wav2vec2 takes the host
            # ~11 ms, during which a GPU with only the last round's tail queued went idle; after the whole chunk,
            # cuDNN's blocking streams for its positional conv waited for the decode and re-encode, and the next
            # DiT for the audio. Here it all runs beside this chunk's DiT and decode (traces, docs/performance-log.md).
            nexts = [s for s, final in zip(ready, finals, strict=True) if not final]
            if self.launches_ahead:
                # ... except where rounds are queued ahead (sequence parallel): there the GPU still has the last
                # round's decode and re-encode to run, and the DiT's graph launch can hold the host until that DiT
                # has run (2 x H200 trace, run 42: 286 ms in cudaGraphLaunch), so wav2vec2 queued after it kept the
                # decode waiting ~20 ms. Queued first, it runs beside the last round's tail (same kernels, exact).
                self._encode_audio_ahead(nexts)
            else:
                audio_ahead = functools.partial(self._encode_audio_ahead, nexts)
        copies: list[HostFrames] = []
        early: list[HostFrames] = []

        def start_copy(results: list) -> None:
            skip = early[0].lengths if early else [0] * len(results)  # frames that went ahead
            videos = [r.frames_from(pipe.motion_frames + n) for r, n in zip(results, skip, strict=True)]
            copies.append(HostFrames.start(videos, pinned=speed.pinned_memory, watermark=self.watermark,
                                           compiled=speed.compile_color, side_stream=speed.copy_stream))  # fmt: skip

        def start_early_copy(results: list) -> None:
            early.append(HostFrames.start([r.frames_from(pipe.motion_frames) for r in results], pinned=True,
                                          watermark=self.watermark, compiled=speed.compile_color,
                                          side_stream=speed.copy_stream))  # fmt: skip

        # early_first_frames: a new session's first frames leave as soon as they are decoded (the decode pauses
        # for them, where the VAE can: flashhead_pipeline.generate_chunks), not after the whole chunk's decode.
        first = speed.early_first_frames and speed.pinned_memory and any(s.first_frame_at is None for s in ready)

        # With pinned memory the frames' copy is queued before the motion re-encode (non-blocking), so they reach
        # the host without waiting for it: the first frame earlier by the re-encode's time. A blocking copy there
        # would stall the host before it queued the re-encode, so without pinned memory it comes last.
        results = pipe.generate_chunks(
            [s.reference for s in ready], [s.motion_latents for s in ready], contexts,
            generators=[s.generator for s in ready], encode_generators=[s.encode_generator for s in ready],
            while_denoising=audio_ahead, before_encode=start_copy if speed.pinned_memory else None,
            first_frames=start_early_copy if first else None, **noise_kwargs,
        )  # fmt: skip
        for s, result, final in zip(ready, results, finals, strict=True):
            s.motion_latents = result.motion_latents  # on the device: the next round can be queued behind this one
            s.ready_since = None
            s.in_flight += 1
            s.final_launched = s.final_launched or final
        # While the GPU works on this round, prepare the next one (the host sync comes with the frames).
        for s in ready:
            s.noise_ahead = pipe.stage_noise(pipe.draw_noise(s.generator)) if speed.pinned_memory else None
        if not copies:
            start_copy(results)
        queued_at = time.monotonic()
        for s in ready:
            s.first_round_queued_at = s.first_round_queued_at or queued_at
        return _Round(ready, slices, finals, copies[0], started, early[0] if early else None, [0] * len(ready))

    def _deliver(self, r: _Round, early: bool = False) -> list[VideoChunk]:
        """Wait for a launched round's frames and hand them out as chunks: its early frames only, with `early`."""
        waiting_since = time.monotonic()
        frames_all = (r.early if early else r.frames).wait()
        if early:
            r.early = None
        emitted_at = time.monotonic()
        spf = self.pipeline.config.sample_rate // self.pipeline.config.fps
        out = []
        for i, (s, (samples, _), frames, final) in enumerate(zip(r.sessions, r.slices, frames_all, r.finals,
                                                                   strict=True)):  # fmt: skip
            last = final and not early
            if not early:
                s.in_flight -= 1
            if final:  # drop the frames that only show the end-of-stream padding
                keep = s.total_frames() - s.frames_emitted
                frames = frames[: max(keep, 0)]
                s.finished = s.finished or last
            if s.first_frame_at is None and (len(frames) or not early):
                s.first_frame_at, s.first_frame_wait_s = emitted_at, emitted_at - waiting_since
            if self.sessions.get(s.id) is not s or (early and not len(frames)):
                continue  # closed while its chunk was being generated, or nothing to show yet
            handed = r.handed[i]  # the chunk's frames (and their audio) that an early piece took already
            out.append(VideoChunk(s.id, frames, s.frames_emitted, self.pipeline.config.fps,
                                  samples[handed * spf : (handed + len(frames)) * spf], last))  # fmt: skip
            r.handed[i] += len(frames)
            s.frames_emitted += len(frames)
            s.frames_following = self.pipeline.new_frames - r.handed[i] if early else 0
        self.stats.frames += sum(len(c.frames) for c in out)
        if early:
            return out
        done = time.perf_counter()
        self.stats.rounds += 1
        self.stats.chunks += len(r.sessions)
        # A round launched ahead started on the device when the one before it was delivered.
        self.stats.round_seconds.append((len(r.sessions), done - max(r.launched, self._last_delivered)))
        self._last_delivered = done
        return out

    def _encode_audio(self, sessions: list[StreamSession]) -> list[torch.Tensor]:
        """One audio-encoder call for the sessions' (already appended) FIFOs -> each one's chunk context."""
        buffers = torch.stack([s.cache.buffer for s in sessions])
        if self.pipeline.device.type == "cuda":
            buffers = buffers.pin_memory()  # copied without blocking the host (it may be a side stream's turn)
        features = self.pipeline.audio_encoder(buffers)  # (B, S, L, H)
        return [s.cache.context(f) for s, f in zip(sessions, features, strict=True)]

    def _audio_on_side_stream(self) -> bool:
        """audio_stream: the next round's audio features are computed ahead, on a side CUDA stream (CUDA only)."""
        return self.pipeline.speed.audio_stream and self.pipeline.device.type == "cuda"

    def _encode_audio_ahead(self, sessions: list[StreamSession]) -> None:
        """Take and encode the next full slice of each session on a side CUDA stream (audio_stream switch)."""
        sessions = [s for s in sessions if s.buffered_samples >= s.slice_samples and s.audio_ahead is None]
        if not sessions:
            return
        if not hasattr(self, "_audio_stream"):
            # High priority: its kernels are small and get SMs as the decode's free up, so the audio is ready
            # when the next chunk's DiT needs it instead of running after the decode, on the critical path.
            self._audio_stream = torch.cuda.Stream(priority=-1)
        side = self._audio_stream  # no wait on the main stream: the inputs are host samples and fixed weights
        taken = [s.take_slice() for s in sessions]
        for s, (samples, _) in zip(sessions, taken, strict=True):
            s.cache.append(samples)
        with torch.cuda.stream(side):
            contexts = self._encode_audio(sessions)
            for s, (samples, filled), context in zip(sessions, taken, contexts, strict=True):
                event = torch.cuda.Event()
                event.record(side)
                s.audio_ahead = _AudioAhead(samples, filled, context, event)

    def run_until_idle(self, sessions: Iterable[StreamSession] | None = None) -> list[VideoChunk]:
        """Generate until no session has a chunk ready (tests and offline use; servers call `step`)."""
        chunks = []
        while (produced := self.step()) or self.in_flight:
            chunks.extend(produced)
        if sessions is not None:
            for s in sessions:
                if s.finished:
                    self.close_session(s.id)
        return chunks
