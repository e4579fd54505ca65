"""Cold start: do the compiling before the first user arrives, and keep the compiled kernels between processes.

With `compile_*` switches a fresh process compiles at its first chunk of each batch size (minutes for the
full-size models) and `cuda_graphs` captures one graph per batch size. A server calls `warm_up` before it
accepts sessions, so no session pays for that; and `load_compile_cache` / `save_compile_cache` carry
torch.compile's artefacts (Inductor's compiled graphs and autotuning results, `torch.compiler.
save_cache_artifacts`) in one file, so the next process on the same GPU type, torch version and switches
reuses them instead of compiling again:

    path = default_cache_path(pipe)
    hit = load_compile_cache(path)          # before the first compiled call
    warm_up(pipe, batch_sizes=[1, 2, 4, 8])  # compiles (or loads), captures CUDA graphs
    save_compile_cache(path)                 # what this process compiled, for the next one
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashhead.atomic import atomic_path

logger = logging.getLogger(__name__)


def default_cache_path(pipe: Any) -> Path:
    """One file per model, device type, torch version, dtype and switch set, under the user's cache folder.

    Compiled kernels are specific to all of them; a file made for another combination is never looked at.
    """
    device = torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else pipe.device.type
    key = {"model": pipe.name, "dit": dict(pipe.dit.config), "device": device, "torch": torch.__version__,
           "dtype": str(pipe.dtype), "speed": pipe.speed.to_dict()}  # fmt: skip
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flashhead" / "compile"
    return root / f"{_slug(pipe.name)}-{_slug(device)}-{digest}.bin"


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))[:48]


def load_compile_cache(path: str | Path) -> bool:
    """Load compile artefacts saved by an earlier process, if the file exists; True when it did."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - a stale or foreign file only costs a compile
        logger.warning("compile cache %s not used: %s", path, e)
        return False
    return True


def save_compile_cache(path: str | Path) -> int:
    """Write every compile artefact of this process to `path` (atomically); returns the bytes written (0:
    nothing was compiled)."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return 0
    data, _info = artifacts
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return len(data)


def warm_up(pipe: Any, batch_sizes: Sequence[int] = (1,), seed: int = 0, watermark: bool = True) -> dict[str, Any]:
    """Run two streaming rounds at each batch size through the real engine (on a grey image and quiet noise), a
    first chunk and a later one (their motion latents, and with early_first_frames their decodes, differ), so
    that compilation, autotuning and CUDA-graph capture happen now. `watermark`: as the engine that will serve (a
    server's marks every frame; with compile_color the marked conversion is a compiled graph of its own). Returns
    seconds per batch size and, on a GPU, the memory the process holds afterwards (weights, CUDA graphs' pools; the
    allocator's free blocks given back)."""
    from flashhead.pipeline.stream import StreamEngine

    cfg = pipe.config
    image = np.full((cfg.height, cfg.width, 3), 128, np.uint8)
    chunk = pipe.new_frames * cfg.sample_rate // cfg.fps
    noise = np.random.default_rng(seed).standard_normal(3 * chunk).astype(np.float32) * 0.01
    seconds: dict[int, float] = {}
    opened: dict[int, float] = {}
    for n in sorted(set(int(b) for b in batch_sizes)):
        if n < 1:
            raise ValueError(f"batch sizes must be >= 1, got {n}")
        # Opening a session encodes its portrait (the VAE encoder's own compile and convolution search on a first
        # start): warm-up work too, timed apart (`open_seconds_by_batch`) and counted in the batch size's seconds.
        start = time.perf_counter()
        engine = StreamEngine(pipe, max_sessions=n, max_batch=n, watermark=watermark)
        sessions = [engine.open_session(image, seed=seed + i) for i in range(n)]
        for session in sessions:
            session.push_audio(noise)
        opened[n] = round(time.perf_counter() - start, 3)
        while any(s.frames_emitted < 2 * pipe.new_frames for s in sessions):
            if not engine.step() and not engine.in_flight:
                short = [s.frames_emitted for s in sessions]
                raise RuntimeError(f"warm-up rounds at batch {n} stopped with {short} frames per session")
        if torch.cuda.is_available() and pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        seconds[n] = round(time.perf_counter() - start, 3)
        for session in sessions:
            engine.close_session(session.id)
    # The thread matters: cuDNN's algorithm choices are kept per thread (flashhead.serve.cli.warm_in_engine_thread).
    result: dict[str, Any] = {"seconds_by_batch": seconds, "open_seconds_by_batch": opened,
                              "total_seconds": round(sum(seconds.values()), 3),
                              "thread": threading.current_thread().name}  # fmt: skip
    if torch.cuda.is_available() and pipe.device.type == "cuda":
        # Compilation, autotuning and cuDNN's algorithm search leave free blocks in the allocator's cache (Pro
        # --optimized: 68.9 GiB reserved for 29.5 GiB at the peak, H200 session 32); give them back to the device.
        torch.cuda.empty_cache()
        result["gpu_memory_held_gib"] = round(torch.cuda.memory_reserved(pipe.device) / 2**30, 2)
    return result


def warm_batch_sizes(max_batch: int) -> list[int]:
    """Every batch size the engine can form (1 .. max_batch): each is its own compiled shape and CUDA graph."""
    return list(range(1, max_batch + 1))
