"""`flashhead bench`: how fast a full-size model runs on this machine, measured, printed as JSON.

Figures: steady frames per second of one stream (warm-up excluded), time from a new stream's first
chunk of audio to its first frame, milliseconds per chunk for every stage, how many real-time streams
the engine sustains with batching, peak GPU memory, and the software and switches in effect.
Official weights are used when present; otherwise the official configuration with random weights
(the same computation, so the same speed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import threading
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEFAULT_AUDIO = (
    Path(__file__).resolve().parents[3] / "shared" / "media" / "audio" / "speech_en_two_speakers_16k_30s.wav"
)


@dataclass
class BenchSettings:
    model: str = "lite"  # lite | pro (| tiny: the shipped small model, for equivalence checks)
    weights: str | None = None
    seconds: float = 10.0
    streams: int = 0  # 0: only one stream; N: also measure N concurrent streams; -1: search the real-time maximum
    dtype: str = "bfloat16"
    device: str = "cuda"
    audio: str | None = None
    switches: dict[str, bool | str] = field(default_factory=dict)  # SpeedConfig fields; missing ones are off
    trace: str | None = None  # also profile a 4-chunk stream: gzip'd Chrome trace written here


def _speech(path: str | None, seconds: float) -> np.ndarray:
    """`seconds` of 16 kHz mono speech from `path` (any audio file; repeated if shorter), or from the shared speech
    WAV; a synthetic voiced signal only when no file was given and that WAV is not there."""
    n = int(seconds * 16000)
    source = Path(path) if path else DEFAULT_AUDIO
    if path is None and not source.is_file():
        logger.warning("no speech file at %s; benchmarking on a synthetic voiced signal", source)
        t = np.arange(n) / 16000
        return (0.3 * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    samples = _wav_16k_mono(source)  # read without PyAV, which the GPU machines may lack
    if samples is None or not len(samples):
        from flashhead.media.audio_io import load_audio

        samples, _ = load_audio(source, 16000)  # other formats and rates; a one-line error for unreadable files
    if len(samples) < n:
        logger.warning("%s holds %.1f s of audio; repeated to %.1f s", source, len(samples) / 16000, seconds)
        samples = np.tile(samples, -(-n // len(samples)))
    return samples[:n]


def _wav_16k_mono(path: Path) -> np.ndarray | None:
    """A 16-bit, 16 kHz mono WAV's samples as float32, or None for any other file."""
    try:
        with wave.open(str(path)) as w:
            if w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2:
                return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    except (wave.Error, EOFError, OSError):
        pass
    return None


def build_pipeline(settings: BenchSettings):
    """The official pipeline if its weights are present, else the official configuration, randomly initialised;
    "tiny" is the small model shipped in the package (trained weights)."""
    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline
    from flashhead.pipeline.registry import official_weights_available

    dtype = getattr(torch, settings.dtype)
    if settings.model == "tiny":
        return FlashHeadPipeline.from_pretrained("tiny", device=settings.device, torch_dtype=dtype), "shipped"
    if settings.weights or (settings.model == "lite" and official_weights_available(None)):
        try:
            pipe = FlashHeadPipeline.from_pretrained(
                settings.model, weights=settings.weights, device=settings.device, torch_dtype=dtype,
                local_files_only=True,
            )  # fmt: skip
            return pipe, "official"
        except Exception as e:  # noqa: BLE001 - fall back to random weights, and say so
            logger.warning("official weights not usable (%s); using random weights", e)
    from diffusers import AutoencoderKLLTXVideo, AutoencoderKLWan
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from flashhead.models import FlashHeadDiT
    from flashhead.models.audio import Wav2VecEncoder
    from flashhead.models.dit import official_config
    from flashhead.models.vae import LTX_VIDEO_090_VAE_CONFIG, LTXVideoVAE, WanVideoVAE, wan_config_to_diffusers

    torch.manual_seed(0)
    with torch.device(settings.device):
        dit = FlashHeadDiT.from_config(official_config(settings.model)).eval().requires_grad_(False)
        if settings.model == "lite":
            vae = LTXVideoVAE(AutoencoderKLLTXVideo.from_config(LTX_VIDEO_090_VAE_CONFIG))
        else:
            vae = WanVideoVAE(AutoencoderKLWan.from_config(wan_config_to_diffusers()))
        encoder = Wav2VecEncoder(Wav2Vec2Model(Wav2Vec2Config()))  # the wav2vec2-base architecture
    pipe = FlashHeadPipeline(dit, vae, encoder).to(settings.device, dtype)
    pipe.name = f"random-weights {settings.model}"
    return pipe, "random"


def median_parts(parts: list[dict]) -> dict[str, float | None]:
    """Per key, the median over the first-frame streams (None where no stream has the figure)."""
    keys = dict.fromkeys(k for p in parts for k in p)
    values = {k: [p[k] for p in parts if p.get(k) is not None] for k in keys}
    return {k: round(float(np.median(v)), 1) if v else None for k, v in values.items()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_ms(fn, repeat: int) -> tuple[float, object]:
    """Median ms (0.1 ms) of `repeat` synchronised calls of `fn` after one warm-up call, and its last result."""
    out = fn()
    times = []
    for _ in range(repeat):
        _sync()
        start = time.perf_counter()
        out = fn()
        _sync()
        times.append(1000 * (time.perf_counter() - start))
    return round(float(np.median(times)), 1), out


@contextlib.contextmanager
def _phase(bar, label: str, every: float = 1.0):
    """One step of the progress bar, named; redrawn every `every` seconds while it runs, so that a warm-up that
    compiles for minutes shows its elapsed time rather than a bar that looks stuck."""
    bar.set_postfix_str(label, refresh=True)
    done = threading.Event()

    def redraw_until_done() -> None:
        while not done.wait(every):
            bar.refresh()

    redraw = threading.Thread(target=redraw_until_done, name="bench-progress", daemon=True)
    if not bar.disable:
        redraw.start()
    try:
        yield
    finally:
        done.set()
        if redraw.is_alive():
            redraw.join()
    bar.update()


def run_benchmark(settings: BenchSettings, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from flashhead.pipeline.speed import SpeedConfig, apply_process_settings
    from flashhead.pipeline.stream import StreamEngine
    from flashhead.pipeline.timing import StageTimer

    speed = SpeedConfig.from_dict(settings.switches)
    apply_process_settings(speed)  # before anything runs a GEMM
    audio = _speech(settings.audio, settings.seconds)  # a bad file is refused before the models load
    pipe, weights = build_pipeline(settings)
    pipe.optimize(speed)
    image = np.random.default_rng(0).integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)
    chunk_samples = pipe.new_frames * pipe.config.sample_rate // pipe.config.fps
    steps = 4 + (1 if settings.trace else 0) + (1 if settings.streams else 0)
    bar = tqdm(total=steps, desc=f"bench {settings.model}", disable=not progress)

    def stream_once(engine: StreamEngine, samples: np.ndarray, parts: list | None = None) -> tuple[float, float, int]:
        first, total, frames = run_stream(engine, image, samples, first_frame_parts=parts)
        return first, total, len(frames)

    engine = StreamEngine(pipe, max_sessions=256, max_batch=64)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    warm_start = time.perf_counter()
    with _phase(bar, "warm-up: compile, tune, capture" if not speed.is_plain else "warm-up"):
        stream_once(engine, audio[: 2 * chunk_samples])  # kernels, allocator, caches, compile, graphs
    warmup_seconds = time.perf_counter() - warm_start

    def open_once() -> float:  # the portrait's encode, GPU work included: it precedes the first audio's clock
        _sync()
        began = time.perf_counter()
        session = engine.open_session(image, seed=0)
        _sync()
        took = time.perf_counter() - began
        engine.close_session(session.id)
        return took

    parts: list[dict] = []
    with _phase(bar, "first frames, session opens"):
        first_frame = [stream_once(engine, audio[:chunk_samples], parts)[0] for _ in range(3)]
        # A live stream's first chunk is not its last: audio waits behind it, and the first round also queues the
        # next chunk's audio features and noise (as for a server's client, which sends on). Timed apart, the same way.
        first_frame_more_audio = [stream_once(engine, audio[: 2 * chunk_samples])[0] for _ in range(2)]
        session_open = [open_once() for _ in range(3)]
    with _phase(bar, "steady stream"):
        frames, total, steady = timed_stream(engine, image, audio)
    peak_bytes = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0  # warm-up and timed runs
    with _phase(bar, "stages, video encode"):
        staged = pipe.timer = StageTimer(memory=True)  # resets the peak counter at each stage
        stream_once(engine, audio)
        summary = staged.summary()
        stages = {k: v["mean_ms"] for k, v in summary.items()}
        stage_peaks = {k: v["peak_gib"] for k, v in summary.items() if "peak_gib" in v}
        pipe.timer = StageTimer(sync=False)
        encoder, encode_ms = video_encode_ms(frames, audio, pipe.config.fps, pipe.config.sample_rate,
                                             pipe.speed.video_encoder)  # fmt: skip
    # per chunk, like the rest; None where no encoder could run (the reason is in `video_encoder`)
    stages["video_encode"] = None if encode_ms is None else round(encode_ms * pipe.new_frames / max(len(frames), 1), 3)

    dit_ms = stages.get("dit", 0.0) / pipe.config.num_inference_steps
    report = {
        "model": settings.model,
        "weights": weights,
        "resolution": [pipe.config.height, pipe.config.width],
        "new_frames_per_chunk": pipe.new_frames,
        # Steady: a chunk per period after the first (steady_fps); stream: the whole stream, first chunk included.
        "steady_fps": round(steady, 2),
        "stream_fps": round(len(frames) / total, 2),
        "time_to_first_frame_ms": round(1000 * float(np.median(first_frame)), 1),
        "first_frame_parts_ms": median_parts(parts),
        "time_to_first_frame_more_audio_ms": round(1000 * float(np.median(first_frame_more_audio)), 1),
        # Opening a stream (its portrait encoded) comes before those clocks start; a server says `ready` after it.
        "session_open_ms": round(1000 * float(np.median(session_open)), 1),
        "stage_ms_per_chunk": stages,
        "video_encoder": encoder,
        "dit_ms_per_step": round(dit_ms, 2),
        **dit_utilisation(pipe, dit_ms),
        **vae_utilisation(pipe, stages),
        "warmup_seconds": round(warmup_seconds, 1),
        # Colour correction runs on the GPU in every configuration (compile_color only fuses it).
        "switches": {"dtype": settings.dtype, **speed.to_dict(), "color_on_gpu": True},
    }
    if speed.vae_cutlass_conv:  # which convolutions CUTLASS took (the rest stayed on cuDNN), or why none
        from flashhead.models.vae import cutlass_conv

        report["cutlass_conv"] = (
            {"library": str(cutlass_conv.load_library().path), "choices": cutlass_conv.choices(),
             "kept_choices": str(kept.path) if (kept := cutlass_conv.tuned_choices()) else None,
             "layout_copies": cutlass_conv.layout_copies}
            if cutlass_conv.available()
            else "not available (no sm_90 GPU, or the library is not built: see flashhead.models.vae.cutlass_conv)"
        )
    if settings.trace:
        with _phase(bar, "profiled stream"):
            write_trace(engine, image, audio[: 4 * chunk_samples], Path(settings.trace))
        report["trace"] = settings.trace
    if settings.streams:
        with _phase(bar, f"batched streams (up to {settings.streams})" if settings.streams > 0 else "batched streams"):
            report["streams"] = measure_streams(pipe, image, audio, chunk_samples, settings.streams,
                                                trace=settings.trace)  # fmt: skip
    bar.close()
    if torch.cuda.is_available():
        # The whole run's peak (warm-up included: compilation, autotuning, graph captures), the steady chunk's
        # (the largest stage peak of the staged stream: what serving needs beyond the warm-up), and what the
        # process holds from the device at the end (the allocator's cache and the CUDA graphs' pools).
        peak_bytes = max(peak_bytes, torch.cuda.max_memory_allocated(), *staged.peak_bytes.values())
        report["peak_gpu_memory_gib"] = round(peak_bytes / 2**30, 2)
        report["stage_peak_gpu_memory_gib"] = stage_peaks
        report["steady_peak_gpu_memory_gib"] = max(stage_peaks.values(), default=None)
        report["gpu_memory_reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)
        # What stays once the allocator's free blocks go back (as a server's warm-up ends): weights, the CUDA
        # graphs' pools, live tensors. The rest of the reserved figure is cache another process could have.
        torch.cuda.empty_cache()
        report["gpu_memory_held_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)
    else:
        report["peak_gpu_memory_gib"] = None
    report["environment"] = environment()
    return report


def video_encode_ms(
    frames: np.ndarray, audio: np.ndarray, fps: int, sample_rate: int, encoder: str
) -> tuple[str, float | None]:
    """Milliseconds to write `frames` with their speech as an MP4 (a temporary file), as the server's jobs and
    `FlashHeadOutput.save` do, and the encoder that ran ("libx264 (...)" with the reason where "auto" found no NVENC).
    Without PyAV (a GPU image with torch alone) nothing is encoded: (the reason, None), and the rest of the benchmark
    stands.
    """
    import tempfile

    try:
        from flashhead.media.video_io import VideoWriter, nvenc_unavailable_reason
    except ImportError as err:  # PyAV is a dependency of the package, but the benchmark may run from a source tree
        return f"none: {err}", None

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with VideoWriter(Path(tmp) / "bench.mp4", fps=fps, encoder=encoder, audio=audio, sample_rate=sample_rate) as w:
            w.write_frames(frames)
        ms = 1000 * (time.perf_counter() - start)
        used = w.encoder
    # No NVENC here, or one that would not open a session (the writer's fallback: no reason is cached then).
    if encoder == "auto" and used == "libx264":
        used = f"libx264 (auto: {nvenc_unavailable_reason() or 'NVENC did not open a session'})"
    return used, ms


def first_frame_split(session) -> dict[str, float | None]:
    """Milliseconds from a session's first audio to its first round being all queued on the host, and how long the
    host then waited for the first frames: a wait near zero means the host set the time to the first frame."""

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(1000 * seconds, 1)

    start = session.first_audio_at
    queued = session.first_round_queued_at
    return {"round_queued_ms": ms(queued - start) if queued and start else None,
            "host_wait_ms": ms(session.first_frame_wait_s)}  # fmt: skip


def run_stream(
    engine, image: np.ndarray, samples: np.ndarray, seed: int = 0, deliveries: list | None = None,
    first_frame_parts: list | None = None,
) -> tuple[float, float, np.ndarray]:
    """One stream fed all its audio at once: (seconds to first frame, total seconds, frames (T, H, W, 3)).

    `deliveries` (a list) receives (seconds since the start, frames) for every chunk once it is all handed out (a
    first chunk can come in two pieces: early_first_frames). `first_frame_parts` (a list) receives the stream's
    `first_frame_parts` dict.
    """
    session = engine.open_session(image, seed=seed)
    _sync()
    start = time.perf_counter()
    session.push_audio(samples)
    session.end()
    first = None
    chunks = []
    piece = 0  # frames of the chunk being handed out so far
    per_chunk = engine.pipeline.new_frames
    while produced := engine.step():
        mine = [c for c in produced if c.session_id == session.id]
        chunks.extend(c.frames for c in mine)
        if first is None:  # the frames are on the host (their copy's event was waited for); later work may run on
            first = time.perf_counter() - start
        for c in mine:
            piece += len(c.frames)
            if deliveries is not None and piece and (piece >= per_chunk or c.final):
                deliveries.append((time.perf_counter() - start, piece))
            piece = 0 if piece >= per_chunk or c.final else piece
    _sync()
    engine.close_session(session.id)
    if first_frame_parts is not None:
        first_frame_parts.append(first_frame_split(session))
    frames = np.concatenate(chunks) if chunks else np.zeros((0, 0, 0, 3), np.uint8)
    return first or 0.0, time.perf_counter() - start, frames


def write_trace(engine, image: np.ndarray, samples: np.ndarray, path: Path) -> None:
    """A stream of `samples` under torch.profiler, its Chrome trace gzip'd to `path` (written whole or not at all).

    Each stage is a named range (`StageTimer`), so benchmarks/trace_stages.py can charge the GPU work to the stage
    that launched it and show what ran between stages.
    """
    profile_to(engine.pipeline, path, lambda: run_stream(engine, image, samples))


def profile_to(pipe, path: Path, work) -> None:
    """Run `work()` under torch.profiler with the pipeline's stages as named ranges (not synchronised) and write
    the Chrome trace gzip'd to `path`, whole or not at all."""
    import gzip
    import shutil
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    from flashhead.atomic import atomic_path
    from flashhead.pipeline.timing import StageTimer

    timer, pipe.timer = pipe.timer, StageTimer(sync=False)  # the stage ranges, without synchronising
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    try:
        with profile(activities=activities) as prof:
            work()
            _sync()
    finally:
        pipe.timer = timer
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with atomic_path(path) as part, open(raw, "rb") as src, gzip.open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)


def streams_trace_path(trace: str | Path, streams: int) -> Path:
    """Where `bench --trace T --streams N` writes the batched round's trace: beside T, `.streamsN` before `.json`."""
    trace = Path(trace)
    stem = trace.name.removesuffix(".gz").removesuffix(".json")
    return trace.with_name(f"{stem}.streams{streams}.json.gz")


def steady_fps(deliveries: list[tuple[float, int]], frames_per_chunk: int) -> float | None:
    """A stream's pace once it runs: `frames_per_chunk` per chunk period, the period being the time from the first
    chunk's hand-out to the last one's over the chunks in between (None for a single chunk).

    The first chunk's own time is the time to the first frame (reported apart). The first and the last hand-outs
    are the prompt ones: with launch-ahead each chunk between them is handed out only once the next one is queued,
    and a final chunk emits fewer frames for the same work, so neither their times nor their frames are counted.
    """
    if len(deliveries) < 2:
        return None
    return frames_per_chunk * (len(deliveries) - 1) / (deliveries[-1][0] - deliveries[0][0])


def timed_stream(engine, image: np.ndarray, samples: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float, float]:
    """One timed stream (`run_stream`): its frames, total seconds and steady FPS (`steady_fps`; the whole stream's
    rate when it made a single chunk)."""
    deliveries: list[tuple[float, int]] = []
    _, total, frames = run_stream(engine, image, samples, seed=seed, deliveries=deliveries)
    steady = steady_fps(deliveries, engine.pipeline.new_frames)
    return frames, total, len(frames) / total if steady is None else steady


def dit_utilisation(pipe, dit_ms_per_step: float, batch: int = 1) -> dict:
    """DiT FLOPs per step (from the architecture), achieved TFLOP/s and MFU against the GPU's bf16 peak."""
    from flashhead.pipeline.flops import dit_forward_flops, peak_flops

    cfg = pipe.config
    _, f, h, w = pipe.vae.latent_shape(cfg.frame_num, cfg.height, cfg.width)
    flops = dit_forward_flops(pipe.dit.config, (f, h, w), batch=batch)
    out = {"dit_tflop_per_step": round(flops / 1e12, 3)}
    # With fp8 the blocks' linears run on float8 units, whose dense peak is twice bf16's: the MFU stays counted
    # against bf16 (what the bf16 path is judged by), so say so where it would otherwise read as a bf16 figure.
    out["dit_mfu_basis"] = "dense bf16 peak" + (
        " (fp8 on: the linears' float8 peak is twice it)" if getattr(pipe.dit, "_flashhead_fp8", False) else "")
    if dit_ms_per_step > 0:
        achieved = flops / (dit_ms_per_step / 1000)
        out["dit_tflops_achieved"] = round(achieved / 1e12, 1)
        peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
        out["dit_mfu"] = round(achieved / peak, 4) if peak else None
    return out


def vae_utilisation(pipe, stage_ms: dict, batch: int = 1) -> dict:
    """The VAE stages' FLOPs per chunk (counted once per pipeline: flashhead.pipeline.flops.vae_flops) and, on a GPU
    with a known peak, each stage's MFU at its measured milliseconds for `batch` streams."""
    from flashhead.pipeline.flops import peak_flops, vae_flops

    cfg = pipe.config
    if getattr(pipe, "_vae_flops", None) is None:
        latent = pipe.vae.latent_shape(cfg.frame_num, cfg.height, cfg.width)
        pipe._vae_flops = vae_flops(pipe.vae, latent, pipe.motion_frames, cfg.height, cfg.width)
    peak = peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    mfu = {name: round(batch * flops / (stage_ms[name] / 1000) / peak, 4)
           for name, flops in pipe._vae_flops.items() if peak and stage_ms.get(name)}  # fmt: skip
    return {"vae_tflop_per_chunk": {k: round(v / 1e12, 3) for k, v in pipe._vae_flops.items()}, "vae_mfu": mfu or None}


def measure_streams(
    pipe, image, audio, chunk_samples: int, streams: int, deadline: float | None = None, trace: str | Path | None = None
) -> dict:
    """Aggregate FPS with N streams batched; with streams=-1 search the most real-time streams.

    Per batch size: the round's milliseconds (median of two, unsynchronised like a server's rounds), and from one
    more round with every stage synchronised, where a batched round's time goes (`stage_ms`, per round; `dit_mfu` at
    that batch). `deadline` (a time.perf_counter() value) stops the search before the next batch size once passed.
    `trace`: also one more round per batch size under torch.profiler, its Chrome trace at `streams_trace_path`
    (benchmarks/trace_stages.py charges its kernels to the stages: which kernels a batched round spends its time in).
    """
    from flashhead.pipeline.stream import StreamEngine
    from flashhead.pipeline.timing import StageTimer

    chunk_seconds = pipe.new_frames / pipe.config.fps
    stage_ms: dict[int, dict[str, float]] = {}
    traces: dict[int, Path] = {}

    def round_time(n: int) -> float:
        engine = StreamEngine(pipe, max_sessions=n, max_batch=n)
        sessions = [engine.open_session(image, seed=i) for i in range(n)]
        for s in sessions:
            # 2 rounds to warm up, 2 timed, 1 by stage (and 1 profiled)
            s.push_audio(np.resize(audio, (6 if trace else 5) * chunk_samples))
        # Warm-up: a first chunk and a later one at this batch size (their shapes, graphs and, with
        # early_first_frames, decodes differ; a first chunk can take two steps).
        while any(s.frames_emitted < 2 * pipe.new_frames for s in sessions):
            engine.step()
        times = []
        for _ in range(2):
            _sync()
            t0 = time.perf_counter()
            engine.step()
            _sync()
            times.append(time.perf_counter() - t0)
        timer, pipe.timer = pipe.timer, StageTimer()
        try:
            engine.step()
            stage_ms[n] = {k: round(v["mean_ms"] * v["count"], 3) for k, v in pipe.timer.summary().items()}
        finally:
            pipe.timer = timer
        if trace:
            traces[n] = streams_trace_path(trace, n)
            profile_to(pipe, traces[n], engine.step)
        return float(np.median(times))

    results = {}
    candidates = [streams] if streams > 0 else [1, 2, 4, 8, 12, 16, 20, 24, 32, 48, 64]
    best = 0
    for n in candidates:
        if deadline is not None and time.perf_counter() > deadline:
            results["stopped"] = f"time budget spent before {n} streams"
            break
        t = round_time(n)
        results[n] = {"round_ms": round(1000 * t, 1), "aggregate_fps": round(n * pipe.new_frames / t, 1),
                      "realtime": t <= chunk_seconds, "stage_ms": stage_ms[n]}  # fmt: skip
        dit = stage_ms[n].get("dit")
        if dit:
            results[n]["dit_mfu"] = dit_utilisation(pipe, dit / pipe.config.num_inference_steps, batch=n).get("dit_mfu")
        results[n]["vae_mfu"] = vae_utilisation(pipe, stage_ms[n], batch=n)["vae_mfu"]
        if n in traces:
            results[n]["trace"] = str(traces[n])
        if t <= chunk_seconds:
            best = n
        elif streams < 0:
            break
    return {"by_streams": results, "max_realtime_streams_measured": best, "chunk_seconds": chunk_seconds}


def environment() -> dict:
    from flashhead.pipeline.speed import CUBLASLT_WORKSPACE_ENV

    env = {"torch": torch.__version__, "python": platform.python_version()}
    env[CUBLASLT_WORKSPACE_ENV] = os.environ.get(CUBLASLT_WORKSPACE_ENV)  # cublaslt_no_workspace: "0"
    if torch.cuda.is_available():
        env |= {
            "gpu": torch.cuda.get_device_name(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    else:
        env |= {"gpu": None, "cpu": platform.processor() or platform.machine()}
    return env


def main(settings: BenchSettings, json_path: Path | None = None, progress: bool = True) -> dict:
    report = run_benchmark(settings, progress=progress)
    text = json.dumps(report, indent=2)
    print(text)
    if json_path is not None:
        json_path.write_text(text)
    return report
