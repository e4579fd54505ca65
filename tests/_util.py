"""Shared test helpers: where the shared fixtures and media live, and how to compare tensors."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import struct
import sys
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# FLASHHEAD_SHARED: where ../shared is elsewhere (the device machine gets only the repo and carried folders).
SHARED = Path(os.environ.get("FLASHHEAD_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
MEDIA = SHARED / "media"
SPEECH_16K = MEDIA / "audio" / "speech_en_two_speakers_16k_30s.wav"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module, with benchmarks/ on the path for its imports of sibling scripts."""
    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.append(folder)
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def speech_16k(seconds: float) -> np.ndarray:
    """The first `seconds` of the shared 16 kHz mono speech recording, float32 in [-1, 1]."""
    with wave.open(str(SPEECH_16K)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1
        pcm = np.frombuffer(w.readframes(int(seconds * 16000)), dtype=np.int16)
    return pcm.astype(np.float32) / 32768


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of 8-bit images or videos in dB; inf when they are identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ||a - b|| / ||b||, computed in float64."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def load_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Tensors and metadata (JSON values decoded) of ../shared/fixtures/<name>.safetensors."""
    from safetensors import safe_open

    path = FIXTURES / f"{name}.safetensors"
    if not path.exists():
        pytest.skip(f"fixture {path} not present")
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        meta: dict[str, object] = {}
        for k, v in (f.metadata() or {}).items():
            try:
                meta[k] = json.loads(v)
            except json.JSONDecodeError:
                meta[k] = v
    return tensors, meta


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose key starts with `prefix`, with the prefix stripped."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header claims width x height: its image data is a few bytes, not the pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


class ReductionFeatures:
    """The two things a persistent-reduction heuristic reads of Inductor's SIMDKernelFeatures (no graph here)."""

    def __init__(self, numel: int, hint):
        import sympy

        self.reduction_numel, self.hint = sympy.Integer(numel), hint

    def get_reduction_hint(self):
        return self.hint


class OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every operator dispatched while it is active (`log.names`), e.g. a custom op's calls."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def cuda_ms(fn, *args, repeats: int = 50) -> float:
    """Mean milliseconds of `fn(*args)` on the current CUDA stream (CUDA events; five calls of warm-up first)."""
    for _ in range(5):
        fn(*args)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn(*args)
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / repeats
