"""Hopper 3-D convolutions from CUTLASS for the Wan2.1 decoder (the `vae_cutlass_conv` switch).

The Wan2.1 (Pro) decode is convolution-bound: ~74 TFLOP of 3x3x3 convolutions per chunk, which cuDNN's fastest
kernels run at ~410 TFLOP/s on an H100 / H200 (docs/performance-log.md, session 21). At full resolution the layers have
96 output channels, and cuDNN's best kernel for them tiles the output 128 channels wide: a quarter of each tensor-core
product is padding. CUTLASS 3 builds Hopper implicit-GEMM convolutions (TMA im2col loads, WGMMA) for any tile
width the tensor cores take, 96 included.

Nothing here is compiled at install time. `build_library` compiles `csrc/conv3d_sm90.cu` once per tile shape
(`TILES`) with nvcc and the CUTLASS headers (a CUTLASS checkout, or the `nvidia-cutlass` wheel's copy) into one
shared library with a C interface (no torch headers, the CUDA runtime linked statically), which `load_library`
opens with ctypes:

    pip install nvidia-cutlass                                       # the headers; or --cutlass PATH
    python -m flashhead.models.vae.cutlass_conv build                # ~5 min on 2 cores; FLASHHEAD_CONV3D_LIB
                                                                     # or ~/.cache/flashhead/kernels by default

`conv3d_ndhwc` (the custom op `flashhead::conv3d_ndhwc`, opaque to torch.compile) runs one stride-1 convolution
of channels-last bf16 tensors. Callers add the bias outside it (`CutlassCausalConv3d`): compiled, Inductor fuses that
add into the next kernel, as it does for cuDNN's convolutions, so the tuning compares the convolutions alone (a
first measurement that timed cuDNN with its separate bias pass overstated CUTLASS's lead by ~0.1 ms a call). The op
asks Inductor for its inputs in the strides they were traced with (channels-last), so the kernels that produce them
write that layout instead of a copy being made here. The first time it meets a shape it times every tile that can
run it against cuDNN's call and keeps the fastest (cuDNN included), so the switch is never slower per shape than
without it, up to the timing's noise; a shape first met inside CUDA-graph capture, where nothing may be timed, goes
to cuDNN. A tile whose result disagrees with cuDNN's beyond rounding (`agrees`) is never chosen. The choices are kept
in a JSON file next to the library (`TunedChoices`; FLASHHEAD_CONV3D_CHOICES names another file, or `off`), per GPU,
library build and cuDNN version, so a new process neither times them again (its cold start) nor depends on one
timing's noise, and a shape first met inside a CUDA-graph capture takes its kept choice.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flashhead.atomic import atomic_path

log = logging.getLogger(__name__)

LIBRARY_ENV = "FLASHHEAD_CONV3D_LIB"
CHOICES_ENV = "FLASHHEAD_CONV3D_CHOICES"
LIBRARY_NAME = "libflashhead_conv3d_sm90.so"
SOURCE = Path(__file__).parent / "csrc" / "conv3d_sm90.cu"
CL3D = torch.channels_last_3d


@dataclass(frozen=True)
class Tile:
    """One compiled kernel: the output tile (m pixels x n channels), the reduction step k, the pipeline stages
    (0: as many as shared memory holds; fewer leave room for a second tile per SM), and the thread-block cluster
    (cluster_m x cluster_n tiles that load the filter / activation tiles they share once, by TMA multicast)."""

    m: int
    n: int
    k: int
    stages: int = 0
    cluster_m: int = 1
    cluster_n: int = 1

    @property
    def name(self) -> str:
        name = f"m{self.m}n{self.n}k{self.k}" + (f"s{self.stages}" if self.stages else "")
        cluster = (self.cluster_m, self.cluster_n)
        return name + (f"c{cluster[0]}x{cluster[1]}" if cluster != (1, 1) else "")

    @classmethod
    def parse(cls, name: str) -> Tile:
        """The tile a `name` describes (m128n96k32s4c2x1: m, n, k, then optional stages and cluster)."""
        match = re.fullmatch(r"m(\d+)n(\d+)k(\d+)(?:s(\d+))?(?:c(\d+)x(\d+))?", name)
        if match is None:
            raise ValueError(f"not a tile name: {name!r} (e.g. m128n96k32s4c2x1)")
        m, n, k, stages, cm, cn = (int(g) if g else None for g in match.groups())
        tile = cls(m, n, k, stages or 0, cm or 1, cn or 1)
        # what one consumer warp group's WGMMA tile and a portable cluster allow (nvcc would say it later, and worse)
        fits = m in (64, 128) and n % 8 == 0 and 8 <= n <= 256 and k in (16, 32, 64, 128)
        if not fits or tile.cluster_m * tile.cluster_n > 8:
            raise ValueError(f"not a tile name: {name!r} (m 64 or 128, n a multiple of 8 up to 256, k 16-128)")
        return tile


# 96-wide tiles for the full-resolution layers (96 channels), 192 and 128 for the 192 / 384-channel ones, 64 for
# whatever divides by 64 only; a few with two tiles per SM, and clusters of two (session 29, H200: the 96-channel
# 512x512 layers 0.94 ms a call in m128n96k32s4c2x1 against 1.09 in m128n96k32s4).
TILES = (
    Tile(128, 96, 64), Tile(128, 96, 32), Tile(128, 96, 64, 3), Tile(128, 96, 32, 4),
    Tile(128, 192, 64), Tile(128, 128, 64), Tile(128, 128, 64, 3), Tile(128, 64, 64, 4),
    # clusters of two: pairs along the pixels share the filter tiles, pairs along the channels the activations
    Tile(128, 96, 32, 4, cluster_m=2), Tile(128, 96, 64, cluster_m=2), Tile(128, 192, 64, cluster_m=2),
    Tile(128, 96, 64, cluster_n=2), Tile(128, 192, 64, cluster_n=2),
    # four along the pixels: the 96-channel layers at 512 x 512 (session 30: 0.926 -> 0.902 ms a call against c2x1)
    Tile(128, 96, 32, 4, cluster_m=4),
)  # fmt: skip


# -- building -------------------------------------------------------------------------------------------


def cutlass_include_dirs(cutlass: Path | str | None = None) -> list[Path]:
    """CUTLASS's `include` and `tools/util/include`: from a checkout (`cutlass`), else the nvidia-cutlass wheel."""
    if cutlass is None:
        import importlib.util

        spec = importlib.util.find_spec("cutlass_library")  # not imported: its package needs CUDA Python
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("CUTLASS headers not found: pip install nvidia-cutlass, or pass a CUTLASS checkout")
        cutlass = Path(list(spec.submodule_search_locations)[0]) / "source"
    root = Path(cutlass)
    dirs = [root / "include", root / "tools" / "util" / "include"]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"not a CUTLASS source tree (missing {', '.join(missing)})")
    return dirs


def registry_source(tiles: tuple[Tile, ...]) -> str:
    """The C file that lists the compiled tiles: their names and one entry point taking a tile's index."""
    decls = "".join(f"extern \"C\" int fh_conv3d_fprop_{t.name}({ARGS_C});\n" for t in tiles)
    names = ", ".join(f'"{t.name}"' for t in tiles)
    calls = "".join(f"    case {i}: return fh_conv3d_fprop_{t.name}({ARGS_CALL});\n" for i, t in enumerate(tiles))
    return (
        "// Generated by flashhead.models.vae.cutlass_conv.registry_source.\n"
        f"{decls}"
        f"static const char* kNames[] = {{{names}}};\n"
        f'extern "C" int fh_conv3d_abi() {{ return {ABI}; }}\n'
        f'extern "C" int fh_conv3d_count() {{ return {len(tiles)}; }}\n'
        f'extern "C" const char* fh_conv3d_name(int i) {{ return i >= 0 && i < {len(tiles)} ? kNames[i] : 0; }}\n'
        f'extern "C" int fh_conv3d_run(int tile, {ARGS_C}) {{\n  switch (tile) {{\n{calls}'
        "    default: return 1;\n  }\n}\n"
    )


BUILD_COMMAND = "python -m flashhead.models.vae.cutlass_conv build"
# The C interface's version: 2 has the time padding per side (1, before session 31: one symmetric pad_d).
ABI = 2
ARGS_C = (
    "const void* act, const void* flt, const void* bias, void* out, int n, int d, int h, int w, int c, int k, "
    "int t, int r, int s, int pad_front, int pad_back, int pad_h, int pad_w, int sm_count, void* stream"
)
ARGS_CALL = "act, flt, bias, out, n, d, h, w, c, k, t, r, s, pad_front, pad_back, pad_h, pad_w, sm_count, stream"


def time_padded(padding: list[int] | tuple[int, ...]) -> tuple[int, int, int, int]:
    """Padding as (time front, time back, height, width): [d, h, w] pads both ends of time alike; a causal
    convolution gives [front, 0, h, w]."""
    if len(padding) == 3:
        d, h, w = padding
        return (d, d, h, w)
    if len(padding) == 4:
        return tuple(padding)  # type: ignore[return-value]
    raise ValueError(f"padding must be [d, h, w] or [time front, time back, h, w], got {list(padding)}")


def nvcc_command(tile: Tile, includes: list[Path], output: Path, nvcc: str = "nvcc") -> list[str]:
    return [
        nvcc, "-O3", "-std=c++17", "-arch=sm_90a", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
        "-DNDEBUG", "-DCUTLASS_DEBUG_TRACE_LEVEL=0",
        f"-DFH_TILE_M={tile.m}", f"-DFH_TILE_N={tile.n}", f"-DFH_TILE_K={tile.k}", f"-DFH_STAGES={tile.stages}",
        f"-DFH_CLUSTER_M={tile.cluster_m}", f"-DFH_CLUSTER_N={tile.cluster_n}",
        f"-DFH_NAME={tile.name}", *(f"-I{d}" for d in includes), "-c", str(SOURCE), "-o", str(output),
    ]  # fmt: skip


def build_library(
    dest: Path | str | None = None,
    cutlass: Path | str | None = None,
    tiles: tuple[Tile, ...] = TILES,
    jobs: int | None = None,
    nvcc: str = "nvcc",
) -> Path:
    """Compile the tiles and link them into one shared library at `dest` (written whole, then renamed)."""
    dest = Path(dest) if dest is not None else default_library_path()
    includes = cutlass_include_dirs(cutlass)
    dest.parent.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    with tempfile.TemporaryDirectory(prefix="fh-conv3d-") as tmp:
        work = Path(tmp)
        objects = [work / f"{t.name}.o" for t in tiles]

        def compile_one(tile: Tile, obj: Path) -> None:
            done = subprocess.run(nvcc_command(tile, includes, obj, nvcc), capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"nvcc failed for tile {tile.name}:\n{done.stderr[-4000:]}")

        with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
            for _ in tqdm(pool.map(compile_one, tiles, objects), total=len(tiles), desc="compiling conv tiles"):
                pass
        registry = work / "registry.cu"
        registry.write_text(registry_source(tiles))
        with atomic_path(dest) as partial:
            link = [nvcc, "-shared", "-arch=sm_90a", "-Xcompiler", "-fPIC", "-o", str(partial), str(registry)]
            done = subprocess.run(link + [str(o) for o in objects], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"linking {dest.name} failed:\n{done.stderr[-4000:]}")
    return dest


def default_library_path() -> Path:
    if os.environ.get(LIBRARY_ENV):
        return Path(os.environ[LIBRARY_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "flashhead" / "kernels" / LIBRARY_NAME


# -- loading ---------------------------------------------------------------------------------------------


class Conv3dLibrary:
    """The built shared library: its tile names and one launch function."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lib = ctypes.CDLL(str(self.path))
        abi = getattr(self._lib, "fh_conv3d_abi", None)
        if abi is None or abi() != ABI:
            raise OSError(f"built by another flashhead version (interface {abi() if abi else 1}, need {ABI}): "
                          f"rebuild it with `{BUILD_COMMAND}`")  # fmt: skip
        try:
            self._lib.fh_conv3d_count.restype = ctypes.c_int
            self._lib.fh_conv3d_name.restype = ctypes.c_char_p
            run = self._lib.fh_conv3d_run
        except AttributeError as err:  # not a library this module built
            message = f"not a flashhead convolution library ({err}): rebuild it with `{BUILD_COMMAND}`"
            raise OSError(message) from None
        self._lib.fh_conv3d_name.argtypes = [ctypes.c_int]
        run.restype = ctypes.c_int
        run.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int] * 14 + [ctypes.c_void_p]
        self.tiles = [self._lib.fh_conv3d_name(i).decode() for i in range(self._lib.fh_conv3d_count())]

    def run(self, tile: int, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor,
            padding: tuple[int, ...]) -> int:  # fmt: skip
        """Launch tile `tile` on the current stream (`padding` as `time_padded` takes it). 0: launched; 1: the tile
        cannot run this problem; 2, 3: errors."""
        n, c, d, h, w = x.shape
        k, _, t, r, s = weight.shape
        stream = torch.cuda.current_stream(x.device).cuda_stream
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return self._lib.fh_conv3d_run(
            tile, x.data_ptr(), weight.data_ptr(), bias.data_ptr(), out.data_ptr(),
            n, d, h, w, c, k, t, r, s, *time_padded(padding), sms, stream,
        )  # fmt: skip


def open_library(path: Path) -> Conv3dLibrary | str:
    """The library at `path`, or why it cannot be used (missing, built by another flashhead, not loadable here)."""
    if not path.is_file():
        return f"not built: {BUILD_COMMAND}"
    try:
        return Conv3dLibrary(path)
    except OSError as err:  # built for another platform or flashhead version, or a CUDA driver too old for it
        return str(err)


@functools.cache
def load_library() -> Conv3dLibrary | None:
    """The library at FLASHHEAD_CONV3D_LIB or the default cache path; None where it is missing or does not load."""
    path = default_library_path()
    lib = open_library(path)
    if isinstance(lib, str):
        if path.is_file():  # there, but unusable: said once (functools.cache)
            log.warning("cannot load %s: %s", path, lib)
        return None
    return lib


def library_status() -> dict:
    """Where the library is expected and whether it loads: {"path", "state": "built" | "not built" | "unusable",
    and "tiles" and "kept_choices" (the choices file, how many problems it keeps) or "reason"}, for `flashhead
    kernels`."""
    path = default_library_path()
    lib = open_library(path)
    if isinstance(lib, str):
        return {"path": str(path), "state": "unusable" if path.is_file() else "not built", "reason": lib}
    kept = tuned_choices()
    kept_report = {"path": str(kept.path), "problems": kept.count()} if kept is not None else None
    return {"path": str(path), "state": "built", "tiles": lib.tiles, "kept_choices": kept_report}


def available(device: torch.device | int | None = None) -> bool:
    """Whether the library is built and `device` (default: the current GPU) is a Hopper GPU (sm_90) to run it."""
    return (
        torch.cuda.is_available()
        and torch.cuda.get_device_capability(device) == (9, 0)
        and load_library() is not None
    )


# -- the operator ----------------------------------------------------------------------------------------

_choices: dict[tuple, int | None] = {}  # problem -> tile index, or None for cuDNN
_tuning = threading.Lock()
layout_copies = 0  # inputs not in channels-last layout (on the CUTLASS path: copied); compiled, it should stay 0


def _label(key: tuple) -> str:
    n, c, d, h, w, t, r, s, front, back, ph, pw, k, _ = key
    return f"{n}x{c}x{d}x{h}x{w} -> {k}, kernel {t}x{r}x{s}, pad time {front}+{back}, space ({ph}, {pw})"


def choices() -> dict[str, str]:
    """What the tuning picked so far, per problem (for the benchmark's report)."""
    lib = load_library()
    return {_label(key): "cudnn" if tile is None or lib is None else lib.tiles[tile] for key, tile in _choices.items()}


class TunedChoices:
    """The tuning's choices kept across processes in one JSON file: {scope: {problem: tile name or "cudnn"}}, the
    scope naming the GPU, the library build (its content hash) and cuDNN's version, which the timings depend on.
    Each write merges with what other processes wrote since and replaces the file whole (a temporary, renamed)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._data: dict[str, dict[str, str]] | None = None
        self._writable = True

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("ignoring the conv3d choices in %s: %s", self.path, err)
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, scope: str, problem: str) -> str | None:
        if self._data is None:
            self._data = self._read()
        choice = self._data.get(scope, {}).get(problem)
        return choice if isinstance(choice, str) else None

    def count(self) -> int:
        """How many problems the file keeps choices for, over every scope."""
        return sum(len(v) for v in self._read().values() if isinstance(v, dict))

    def put(self, scope: str, problem: str, choice: str) -> None:
        data = self._read() if self._writable else (self._data or {})
        data.setdefault(scope, {})[problem] = choice
        self._data = data
        if not self._writable:
            return
        tmp = None  # a temporary of its own (not atomic_path's one name): processes may write at once
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            tmp = None
        except OSError as err:  # a read-only cache: kept in this process only, said once
            log.warning("cannot keep the conv3d choices in %s: %s", self.path, err)
            self._writable = False
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)


@functools.cache
def tuned_choices() -> TunedChoices | None:
    """The kept choices: FLASHHEAD_CONV3D_CHOICES, else conv3d_choices.json beside the library; None with `off`."""
    path = os.environ.get(CHOICES_ENV) or str(default_library_path().with_name("conv3d_choices.json"))
    return None if path.lower() in ("off", "0", "none") else TunedChoices(path)


@functools.cache
def _scope(lib: Conv3dLibrary, device: int | None) -> str:
    digest = hashlib.sha256(lib.path.read_bytes()).hexdigest()[:16]
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return f"{torch.cuda.get_device_name(device)}|library {digest}|cudnn {cudnn}"


def _cudnn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: list[int]) -> torch.Tensor:
    front, back, h, w = time_padded(padding)
    if front != back:  # torch's convolutions pad both ends alike: the time padding as a copy
        x, front = F.pad(x, (0, 0, 0, 0, front, back)), 0
    return F.conv3d(x, weight, bias, 1, [front, h, w]).contiguous(memory_format=CL3D)


def _eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.is_cuda and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
        and (bias is None or bias.dtype == torch.bfloat16)
        and x.shape[1] % 8 == 0 and weight.shape[0] % 8 == 0 and available(x.device)
    )  # fmt: skip


def _time(fn, reps: int = 5) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()  # warm (and cuDNN's own algorithm search, for its candidate)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / reps)
    return best


def _choose(lib: Conv3dLibrary, x, weight, bias, padding: list[int]) -> int | None:
    key = (*x.shape, *weight.shape[2:], *time_padded(padding), weight.shape[0], x.device.index)
    if key in _choices:
        return _choices[key]
    kept = tuned_choices()
    if kept is not None:
        scope, problem = _scope(lib, x.device.index), _label(key)
        name = kept.get(scope, problem)
        if name == "cudnn" or name in lib.tiles:  # another process's choice (a tile no longer built: tune again)
            _choices[key] = None if name == "cudnn" else lib.tiles.index(name)
            return _choices[key]
    if torch.cuda.is_current_stream_capturing():
        return None  # nothing may be timed (or synchronised) inside a capture: cuDNN, chosen again next time
    with _tuning:
        if key in _choices:
            return _choices[key]
        out = torch.empty(_out_shape(x, weight, padding), dtype=x.dtype, device=x.device, memory_format=CL3D)
        reference = _cudnn(x, weight, bias, padding)
        timings: dict[int | None, float] = {None: _time(lambda: _cudnn(x, weight, bias, padding))}
        pads = tuple(padding)
        for i in range(len(lib.tiles)):
            status = lib.run(i, x, weight, bias, out, pads)
            if status == 1:
                continue  # this tile cannot run the problem
            if status != 0:  # it could not start (e.g. a cluster the GPU cannot schedule): never chosen
                log.warning("conv3d %s: tile %s failed to run (status %d); not used", key, lib.tiles[i], status)
                continue
            if not agrees(out, reference):
                log.warning("conv3d %s: tile %s disagrees with cuDNN; not used", key, lib.tiles[i])
                continue
            timings[i] = _time(lambda i=i: lib.run(i, x, weight, bias, out, pads))
        best = min(timings, key=timings.__getitem__)
        log.info("conv3d %s: %s (%.3f ms; cuDNN %.3f ms)", key, "cudnn" if best is None else lib.tiles[best],
                 timings[best], timings[None])  # fmt: skip
        _choices[key] = best
        if kept is not None:
            kept.put(scope, problem, "cudnn" if best is None else lib.tiles[best])
        return best


# Two bf16 convolutions of the same data differ by their rounding: ~0.3-0.6 % of the output's range at most for the
# Wan layers (session 28, against float32). A tile that computes something else is far beyond this.
AGREEMENT = 0.02


def agrees(out: torch.Tensor, reference: torch.Tensor, tolerance: float = AGREEMENT) -> bool:
    """Whether `out` is `reference` up to rounding: max |difference| within `tolerance` of the reference's range
    (and finite). The tuning checks every tile this way once per shape before it may be chosen."""
    scale = reference.float().abs().amax().clamp_min(1e-6)
    err = (out.float() - reference.float()).abs().amax()
    return bool(torch.isfinite(err) and err <= tolerance * scale)


@functools.cache
def _zero_bias(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The kernels always add a bias: zeros for bias-free calls, made once per size (not a fill per call)."""
    return torch.zeros(channels, dtype=dtype, device=device)


def _out_shape(x: torch.Tensor, weight: torch.Tensor, padding: list[int]) -> tuple[int, ...]:
    n, _, d, h, w = x.shape
    k, _, t, r, s = weight.shape
    front, back, ph, pw = time_padded(padding)
    return (n, k, d + front + back - t + 1, h + 2 * ph - r + 1, w + 2 * pw - s + 1)


# Inputs in the strides they were traced with (older torch without the tag: Inductor's default constraint).
_EXACT_STRIDES = tuple(t for t in [getattr(torch.Tag, "needs_exact_strides", None)] if t is not None)


@torch.library.custom_op("flashhead::conv3d_ndhwc", mutates_args=(), tags=_EXACT_STRIDES)
def conv3d_ndhwc(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: list[int]) -> torch.Tensor:
    """A stride-1, undilated 3-D convolution (zero `padding` per side in d, h, w, or [time front, time back, h, w])
    with a channels-last 3-D result:
    the fastest of CUTLASS's tiles and cuDNN for this shape on a Hopper GPU with the library built; else cuDNN /
    torch's CPU convolution."""
    global layout_copies
    if not x.is_contiguous(memory_format=CL3D):
        layout_copies += 1
    lib = load_library()
    if not _eligible(x, weight, bias) or lib is None:
        return _cudnn(x, weight, bias, padding)
    x = x.contiguous(memory_format=CL3D)
    weight = weight.contiguous(memory_format=CL3D)
    if bias is None:
        bias = _zero_bias(weight.shape[0], x.dtype, x.device)
    tile = _choose(lib, x, weight, bias, padding)
    if tile is None:
        return _cudnn(x, weight, bias, padding)
    out = torch.empty(_out_shape(x, weight, padding), dtype=x.dtype, device=x.device, memory_format=CL3D)
    status = lib.run(tile, x, weight, bias.contiguous(), out, tuple(padding))
    if status != 0:
        raise RuntimeError(f"CUTLASS convolution tile {lib.tiles[tile]} failed (status {status})")
    return out


@conv3d_ndhwc.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: list[int]) -> torch.Tensor:
    return torch.empty(_out_shape(x, weight, padding), dtype=x.dtype, device=x.device, memory_format=CL3D)


# -- command line ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashhead.models.vae.cutlass_conv", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="compile the CUTLASS convolutions (nvcc, CUDA >= 12.3)")
    build.add_argument("--dest", type=Path, default=None, help=f"the library (default: {default_library_path()})")
    build.add_argument("--cutlass", type=Path, default=None, help="a CUTLASS checkout (default: nvidia-cutlass's)")
    build.add_argument("--tiles", default=None,
                       help="comma-separated tile names (default: TILES), e.g. m128n96k64,m128n96k32s4c4x1")
    build.add_argument("--jobs", type=int, default=None)
    build.add_argument("--nvcc", default="nvcc")
    args = parser.parse_args(argv)
    tiles = TILES
    if args.tiles:  # any tile by name, the default set's or others (experiments: a build of its own)
        try:
            tiles = tuple(Tile.parse(n.strip()) for n in args.tiles.split(","))
        except ValueError as err:
            print(f"error: {err}; the default tiles: {', '.join(t.name for t in TILES)}", file=sys.stderr)
            return 2
    started = time.perf_counter()
    try:
        path = build_library(args.dest, args.cutlass, tiles, args.jobs, args.nvcc)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"built {path} ({len(tiles)} tiles) in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
