"""Training throughput: step time, DiT tokens per second, MFU and peak GPU memory, per log interval.

Conventions (docs/performance.md, "Distributed training"):

    model FLOPs     the DiT's matrix products only (flashhead.pipeline.flops): a forward counts F, a backward
                    2 F; a Stage-1 micro-step of B samples is 3 F B per process
    MFU             model FLOPs per second per GPU / the GPU's dense bf16 peak (flops.peak_flops); the forward
                    that activation checkpointing recomputes in the backward is NOT model work
    HFU             the same with the recomputed forward counted (4 F B with checkpointing)
    tokens          DiT tokens: every latent patch of a chunk, motion frames included (F x H' x W' per sample),
                    summed over all processes; in Stage 2 every forward pass counts its tokens

On CPU the peak is unknown, so MFU and HFU are None; memory is reported for CUDA devices only.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from flashhead.pipeline.flops import dit_forward_flops, peak_flops

GiB = 2**30
MFU_CONVENTION = (
    "model FLOPs = matrix products of the DiT (flashhead.pipeline.flops): forward F, backward 2F; "
    "the forward recomputed by activation checkpointing counts in HFU only; MFU = model FLOP/s per GPU / dense "
    "bf16 peak of the GPU"
)


@dataclass(frozen=True)
class SampleCost:
    """What one sample (one chunk) costs the DiT in one forward pass."""

    tokens: int
    forward_flops: float


def sample_cost(dit_config: Mapping, latent_shape: Sequence[int]) -> SampleCost:
    """Tokens and forward FLOPs of one chunk whose latents are (F, H, W) before patching."""
    f, h, w = (int(v) for v in latent_shape)
    pt, ph, pw = dit_config["patch_size"]
    return SampleCost((f // pt) * (h // ph) * (w // pw), float(dit_forward_flops(dit_config, (f, h, w))))


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a CUDA device by its name; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device))


def gather_memory(device: torch.device, world_size: int, reset: bool = True) -> dict[str, list[float]] | None:
    """Peak allocated and reserved GiB of every process's GPU since the last reset (a collective when
    world_size > 1: every process must call it); None on CPU."""
    if device.type != "cuda":
        return None
    mine = torch.tensor(
        [torch.cuda.max_memory_allocated(device) / GiB, torch.cuda.max_memory_reserved(device) / GiB], device=device
    )
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    if world_size > 1:
        every = [torch.zeros_like(mine) for _ in range(world_size)]
        dist.all_gather(every, mine)
        mine = torch.stack(every)
    rows = mine.reshape(-1, 2).tolist()
    return {"allocated_gib": [r[0] for r in rows], "reserved_gib": [r[1] for r in rows]}


@dataclass
class ThroughputMeter:
    """Counts the DiT work of the steps since the last report and turns it into rates.

    `add` after every optimizer step (per-process work); `report` at a log step returns the interval's
    step time, tokens/s (all processes), model and hardware TFLOP/s per GPU, MFU, HFU and peak memory.
    `report` is a collective in distributed runs (memory gathering): every process must call it.
    """

    device: torch.device
    world_size: int = 1
    peak: float | None = None  # dense bf16 FLOP/s of one GPU (None: unknown, no MFU)
    _steps: int = 0
    _tokens: float = 0.0
    _model_flops: float = 0.0
    _hardware_flops: float = 0.0
    _t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def for_device(cls, device: torch.device, world_size: int = 1) -> ThroughputMeter:
        return cls(device, world_size, device_peak_flops(device))

    def restart(self) -> None:
        """Forget the work counted so far and restart the clock (e.g. after a warm-up step)."""
        self._steps, self._tokens, self._model_flops, self._hardware_flops = 0, 0.0, 0.0, 0.0
        self._t0 = time.perf_counter()

    def add(self, cost: SampleCost, forwards: float, backwards: float = 0.0, recomputed: float = 0.0,
            steps: int = 1) -> None:  # fmt: skip
        """One process's work: `forwards` and `backwards` sample-passes (a batch of B counts B), `recomputed`
        forwards replayed by activation checkpointing; `steps` optimizer steps (or iterations) done."""
        self._steps += steps
        self._tokens += cost.tokens * forwards
        model = cost.forward_flops * (forwards + 2 * backwards)
        self._model_flops += model
        self._hardware_flops += model + cost.forward_flops * recomputed

    def report(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        model_rate, hardware_rate = self._model_flops / elapsed, self._hardware_flops / elapsed
        point = {
            "step_time_s": elapsed / max(self._steps, 1),
            "tokens_per_s": self._tokens * self.world_size / elapsed,
            "model_tflops_per_gpu": model_rate / 1e12,
            "mfu": model_rate / self.peak if self.peak else None,
            "hfu": hardware_rate / self.peak if self.peak else None,
            "memory": gather_memory(self.device, self.world_size),
        }
        self.restart()
        return point


def summarize(points: Sequence[Mapping[str, Any]], skip: int = 1) -> dict[str, Any]:
    """Steady-state figures of a run's logged points: medians over all but the first `skip` (warm-up:
    allocation, cuDNN/cuBLAS autotuning) when there are more, and the peak memory of every GPU."""
    steady = list(points[skip:]) if len(points) > skip else list(points)

    def median(key: str) -> float | None:
        values = [p[key] for p in steady if p.get(key) is not None]
        return statistics.median(values) if values else None

    memory = [p["memory"] for p in points if p.get("memory")]
    out: dict[str, Any] = {
        "step_time_s": median("step_time_s"),
        "tokens_per_s": median("tokens_per_s"),
        "model_tflops_per_gpu": median("model_tflops_per_gpu"),
        "mfu": median("mfu"),
        "hfu": median("hfu"),
        "steady_points": len(steady),
    }
    if memory:
        gpus = len(memory[0]["allocated_gib"])
        out["peak_allocated_gib_per_gpu"] = [max(m["allocated_gib"][g] for m in memory) for g in range(gpus)]
        out["peak_reserved_gib_per_gpu"] = [max(m["reserved_gib"][g] for m in memory) for g in range(gpus)]
    else:
        out["peak_allocated_gib_per_gpu"] = out["peak_reserved_gib_per_gpu"] = None
    return out


def loss_trend(losses: Sequence[float], window: int = 20) -> dict[str, Any]:
    """Mean of the first and last `window` losses (fewer when the run is short) and whether it fell."""
    values = [float(v) for v in losses]
    n = max(1, min(window, len(values) // 2))
    if not values:
        return {"first_mean": None, "last_mean": None, "fell": None, "window": n}
    first, last = math.fsum(values[:n]) / n, math.fsum(values[-n:]) / n
    return {"first_mean": first, "last_mean": last, "fell": bool(last < first), "window": n,
            "finite": all(math.isfinite(v) for v in values)}  # fmt: skip


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)
    return path


def format_rates(point: Mapping[str, Any]) -> str:
    """The console part of a log line: step time, tokens/s, MFU (HFU), the largest peak memory of any GPU."""
    text = f"{point['step_time_s']:.3f} s/step  {point['tokens_per_s']:,.0f} tok/s"
    if point.get("mfu") is not None:
        text += f"  MFU {100 * point['mfu']:.1f}% (HFU {100 * point['hfu']:.1f}%)"
    if point.get("memory"):
        m = point["memory"]
        text += f"  peak {max(m['allocated_gib']):.1f}/{max(m['reserved_gib']):.1f} GiB alloc/reserved"
    return text


def log_rates(writer: Any, point: Mapping[str, Any], step: int) -> None:
    """TensorBoard scalars under perf/: rates, MFU, HFU and the peak memory of every GPU."""
    for key in ("step_time_s", "tokens_per_s", "model_tflops_per_gpu", "mfu", "hfu"):
        if point.get(key) is not None:
            writer.add_scalar(f"perf/{key}", point[key], step)
    for kind, values in (point.get("memory") or {}).items():
        for gpu, value in enumerate(values):
            writer.add_scalar(f"perf/gpu{gpu}_peak_{kind}", value, step)
