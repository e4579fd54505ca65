"""Sequence-parallel benchmark: one GPU against N GPUs, Pro then Lite, in one torchrun run.

    torchrun --nproc-per-node 2 benchmarks/sp_bench.py --json $OUT/sp.json          # Pro, then Lite
    torchrun --nproc-per-node 2 benchmarks/sp_bench.py --model pro --json $OUT/sp.json
    torchrun --nproc-per-node 2 benchmarks/sp_bench.py --model pro --head-groups 3 --json $OUT/sp_g3.json

For each model (random-init full-size weights, official config, identical on every rank):
- "parts" (first): the DiT forward, the VAE decode and (Wan) the motion-frame encode alone, 1 GPU against split
  (ms, synchronised; the split DiT with the chosen head groups and with one group, i.e. no all-to-all overlap),
  the split decode's PSNR against the 1-GPU decode of the same latent, the split encode's largest difference
  from the 1-GPU encode, and a profile of one DiT forward either way (GPU busy time against wall time, the top
  kernels / ops): where the split's time goes.
- per speed configuration (Pro: plain, compiled; Lite: plain): rank 0 alone streams the speech through the
  engine (the other ranks wait), then all ranks stream it again split (forced for Lite, whose policy is not
  to split). Reported: steady FPS, time to first frame, per-stage ms per chunk (rank 0, synchronised), peak
  GPU memory of every rank, the speed-up, and the PSNR of the split frames against the 1-GPU frames. The split
  entries say which head groups the Ulysses all-to-alls were pipelined over and whether the motion re-encode
  was split (Wan; its stage is vae_encode_motion, as on one GPU).
- Lite "replicas": what its policy does with N GPUs instead: every rank streams on its own GPU at once;
  per-rank and total FPS.
The JSON is rewritten after every part and a part that fails is reported and skipped, so a run cut short
still leaves its numbers. Writes no video.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from trace_stages import load_trace, stage_breakdown  # noqa: E402 (benchmarks/, the script's folder)

from flashhead.benchmark import (  # noqa: E402
    BenchSettings,
    _speech,
    _sync,
    build_pipeline,
    environment,
    median_parts,
    run_stream,
    timed_ms,
    timed_stream,
)
from flashhead.parallel import init_sequence_parallel  # noqa: E402
from flashhead.parallel.attention import METHODS, ULYSSES  # noqa: E402
from flashhead.parallel.group import SequenceParallelGroup, nccl_options  # noqa: E402
from flashhead.pipeline.speed import SpeedConfig, apply_process_settings  # noqa: E402
from flashhead.pipeline.stream import StreamEngine  # noqa: E402
from flashhead.pipeline.timing import StageTimer  # noqa: E402

logger = logging.getLogger("sp_bench")

# Splitting a model that the policy keeps on one GPU (Lite) is still measured, to watch its overhead.
FORCE_SPLIT = True

SPEEDS = {
    "plain": "",
    "fast": "rope_table,cond_cache,attention=cudnn,cudnn_benchmark,pinned_memory",
    "compiled": "rope_table,cond_cache,attention=cudnn,cudnn_benchmark,pinned_memory,compile_dit,compile_vae",
    # SpeedConfig.optimized() (`--optimized`): also CUDA graphs of the chunk loop (with the all-to-alls inside on
    # N GPUs), the Wan VAE's conv layout switches, compiled colour correction and side-stream audio.
    "optimized": SpeedConfig.optimized().to_text(),
}
SPEEDS["optimized_ahead"] = SPEEDS["optimized"] + ",launch_ahead"  # the engine queues the next round before waiting


def psnr(a: np.ndarray, b: np.ndarray) -> float | str | None:
    """PSNR in dB of uint8 frames; "inf" when identical (strict JSON has no infinity)."""
    if a.shape != b.shape or a.size == 0:
        return None
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return "inf" if mse == 0 else round(float(10 * np.log10(255**2 / mse)), 2)


def same_weights(pipe) -> None:
    """Random init is seeded, but copy rank 0's weights anyway: the ranks must run one model."""
    for module in (pipe.dit, pipe.vae):
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src=0)


class _Skipped(Exception):
    """A measurement left out on purpose (--no-one-gpu)."""


def measure(pipe, image, audio, chunk_samples: int) -> dict:
    """Rank 0: a warm-up stream, first-frame latency, a timed stream, a stage-timed stream; frames kept."""
    engine = StreamEngine(pipe, max_sessions=4, max_batch=1)
    reset_peak_memory()
    start = time.perf_counter()
    run_stream(engine, image, audio[: 2 * chunk_samples])
    warmup = time.perf_counter() - start
    parts: list[dict] = []
    first = [run_stream(engine, image, audio[:chunk_samples], first_frame_parts=parts)[0] for _ in range(2)]
    frames, total, steady = timed_stream(engine, image, audio, seed=0)
    pipe.timer = StageTimer()
    run_stream(engine, image, audio, seed=0)
    stages = {k: round(v["mean_ms"], 1) for k, v in pipe.timer.summary().items()}
    pipe.timer = StageTimer(sync=False)
    _sync()
    # Steady: a chunk per period from the first hand-out to the last (benchmark.steady_fps); the stream figures
    # (before session 11 the only ones) also hold the first chunk and the last, partly emitted one.
    stream_chunk_ms = 1000 * total / math.ceil(len(audio) / chunk_samples)
    chunk_ms = 1000 * pipe.new_frames / steady
    return {
        "steady_fps": round(steady, 2),
        "chunk_ms": round(chunk_ms, 1),
        "stream_fps": round(len(frames) / total, 2),
        "stream_chunk_ms": round(stream_chunk_ms, 1),
        "time_to_first_frame_ms": round(1000 * float(np.median(first)), 1),
        "first_frame_parts_ms": median_parts(parts),
        "stage_ms_per_chunk": stages,
        "outside_stages_ms_per_chunk": round(chunk_ms - sum(stages.values()), 1),
        "warmup_seconds": round(warmup, 1),
        "frames": frames,
    }


def floor_psnr(pipe, image: np.ndarray, audio: np.ndarray, frames: np.ndarray) -> float | str | None:
    """How far plain bf16 moves on its own: the 1-GPU stream again with one input pixel one grey level
    brighter, against `frames`. Rounding differences grow through the autoregressive chunks of a
    random-weight model; a split that differs only in rounding lands near this figure, not at 40 dB."""
    nudged = image.copy()
    y, x = image.shape[0] // 2, image.shape[1] // 2
    nudged[y, x, 0] = nudged[y, x, 0] + 1 if nudged[y, x, 0] < 255 else 254
    engine = StreamEngine(pipe, max_sessions=4, max_batch=1)
    _, _, other = run_stream(engine, nudged, audio, seed=0)
    return psnr(other, frames)


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_all_ranks(side_group) -> list[float | None]:
    """Every rank's peak GPU memory (GiB); also where the waiting ranks wait (gloo, long timeout)."""
    mine = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine, group=side_group)
    return every


def _profile(fn, top: int = 12, trace: Path | None = None) -> dict:
    """One call under torch.profiler: wall ms, GPU busy ms (sum of kernel time), the top ops by device time.

    With `trace`, the Chrome trace (timeline: where the GPU idles and what the host does meanwhile) is written
    there, gzip-compressed."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    _sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        _sync()
        wall = 1000 * (time.perf_counter() - start)
    # The Chrome trace, always: trace_stages charges its GPU work to the stages that launched it.
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        by_stage = stage_breakdown(load_trace(raw))
        if trace is not None:
            with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
    events = prof.key_averages()

    def device_ms(e, total: bool = False) -> float:
        name = ("device_time_total" if total else "self_device_time_total")
        return getattr(e, name, 0.0) / 1000

    on_gpu = torch.cuda.is_available()
    ranked = sorted(events, key=lambda e: device_ms(e, True) if on_gpu else e.cpu_time_total, reverse=True)[:top]
    return {
        "wall_ms": round(wall, 1),
        "gpu_busy_ms": round(sum(device_ms(e) for e in events), 1),
        "ops": sum(e.count for e in events),
        "gpu_ms_by_launching_stage": by_stage,
        "top": [[e.key[:60], e.count, round(device_ms(e, total=True), 2), round(e.cpu_time_total / 1000, 2)]
                for e in ranked],  # fmt: skip
    }


def profile_stream(pipe, image, audio, chunk_samples: int, trace: Path | None = None) -> dict:
    """A 4-chunk stream under the profiler: is the GPU busy for the whole chunk loop, and with what."""
    engine = StreamEngine(pipe, max_sessions=4, max_batch=1)
    run_stream(engine, image, audio[: 2 * chunk_samples], seed=0)  # the profiler's own first-call costs
    report = _profile(lambda: run_stream(engine, image, audio[: 4 * chunk_samples], seed=0), top=25, trace=trace)
    report["chunks"] = 4
    return report


def high_priority_group(group: SequenceParallelGroup) -> SequenceParallelGroup:
    """The same ranks on a second NCCL group whose collectives use high-priority streams (--compare-priority)."""
    high = dist.new_group(backend="nccl", pg_options=nccl_options(high_priority=True))
    return SequenceParallelGroup(group.rank, group.world_size, group.device, group=high, control=group.control)


def nccl_env_group(group: SequenceParallelGroup, settings: str) -> SequenceParallelGroup:
    """The same ranks on a second NCCL group whose communicator is made under extra NCCL settings, e.g.
    "NCCL_PROTO=LL128" (--compare-nccl-env); the process environment is restored afterwards."""
    extra = dict(item.split("=", 1) for item in settings.split())
    saved = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        other = dist.new_group(backend="nccl")
        dist.barrier(group=other, device_ids=[group.device.index])  # NCCL reads the settings as it makes the comm
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return SequenceParallelGroup(group.rank, group.world_size, group.device, group=other, control=group.control)


def split_settings(pipe, group, args, attention: str | None = None) -> dict:
    """How the split runs: Ulysses head groups (as the library chooses them) and whether the encode is split."""
    from flashhead.parallel.attention import default_head_groups
    from flashhead.parallel.vae import splits_encode

    heads = pipe.dit.config.num_heads
    groups = default_head_groups(heads, group.world_size) if args.head_groups is None else args.head_groups
    attention = attention or args.attention
    split = getattr(getattr(pipe, "_sp", None), "model", None)  # the split in use (None: the library's choice)
    attention = split.attention.method if split is not None and split.attention is not None else attention
    return {"attention": attention or ("ulysses" if heads % group.world_size == 0 else "ring"),
            "head_groups": groups if heads % group.world_size == 0 and attention in (None, *ULYSSES)
            else None,
            "split_encode": splits_encode(pipe.vae)}  # fmt: skip


def measure_parts(pipe, group, args) -> dict:
    """DiT forward, VAE decode and encode alone: 1 GPU (rank 0, the others wait) against split; PSNR; profiles."""
    from flashhead.parallel.dit import SequenceParallelDiT
    from flashhead.parallel.vae import split_decode, split_encode, splits_encode

    cfg, d = pipe.config, pipe.dit.config
    C, T, H, W = pipe.vae.latent_shape(cfg.frame_num, cfg.height, cfg.width)
    g = torch.Generator().manual_seed(0)  # the same inputs on every rank
    dev, dt = group.device, pipe.dtype
    x, y = (torch.randn(1, C, T, H, W, generator=g).to(dev, dt) for _ in range(2))
    context = torch.randn(1, cfg.frame_num, d.audio_window, d.audio_layers, d.audio_channels, generator=g).to(dev, dt)
    t = torch.tensor([500.0], device=dev)
    motion = (torch.rand(1, 3, pipe.motion_frames, cfg.height, cfg.width, generator=g) * 2 - 1).to(dev, dt)
    out: dict = {"latent": [C, T, H, W], **split_settings(pipe, group, args)}
    pipe.parallelize(None)
    pipe.optimize(None)
    with torch.no_grad():
        full = None
        if group.is_leader:
            out["dit_ms_1_gpu"], full_v = timed_ms(lambda: pipe.dit(x, t, context, y), 3)
            out["decode_ms_1_gpu"], full = timed_ms(lambda: pipe.vae.decode(x), 2)
            out["encode_ms_1_gpu"], full_enc = timed_ms(lambda: pipe.vae.encode(motion), 2)
            out["profile_dit_1_gpu"] = _profile(lambda: pipe.dit(x, t, context, y))
        peak_memory_all_ranks(args.side_group)  # the others wait here
        one_group = SequenceParallelDiT(pipe.dit, group, head_groups=1)
        out["dit_ms_split_1_head_group"], _ = timed_ms(lambda: one_group(x, t, context, y), 3)
        sp = SequenceParallelDiT(pipe.dit, group, head_groups=args.head_groups, method=args.attention)
        out["dit_ms_split"], split_v = timed_ms(lambda: sp(x, t, context, y), 3)
        others = {}
        chosen = args.attention or sp.attention.method
        for method in ("ulysses", "kv_gather", "x_gather"):  # the other splits of self-attention, for comparison
            if method != chosen and not (method != "kv_gather" and d.num_heads % group.world_size):
                other = SequenceParallelDiT(pipe.dit, group, method=method)
                out[f"dit_ms_split_{method}"], others[method] = timed_ms(lambda: other(x, t, context, y), 3)  # noqa: B023
                other.uninstall()
        sp.install()  # the last one built swapped the blocks' self-attention
        out["decode_ms_split"], split = timed_ms(lambda: split_decode(pipe.vae, x, group), 2)
        if splits_encode(pipe.vae):
            out["encode_ms_split"], split_enc = timed_ms(lambda: split_encode(pipe.vae, motion, group), 2)
        profile = _profile(lambda: sp(x, t, context, y))
        if group.is_leader:
            out["profile_dit_split"] = profile
            out["dit_speedup"] = round(out["dit_ms_1_gpu"] / out["dit_ms_split"], 3)
            out["decode_speedup"] = round(out["decode_ms_1_gpu"] / out["decode_ms_split"], 3)
            # One DiT forward, split against whole: the core models' bf16 tolerance is rel-L2 <= 2e-2 (docs/models.md)
            out["dit_split_rel_l2"] = float((split_v.float() - full_v.float()).norm() / full_v.float().norm())
            for method, v in others.items():
                out[f"dit_{method}_rel_l2"] = float((v.float() - full_v.float()).norm() / full_v.float().norm())
            if "encode_ms_split" in out:
                out["encode_speedup"] = round(out["encode_ms_1_gpu"] / out["encode_ms_split"], 3)
                out["encode_split_max_abs"] = float((split_enc.float() - full_enc.float()).abs().max())
            mse = float((split.float() - full.float()).pow(2).mean())
            out["decode_split_psnr_db"] = "inf" if mse == 0 else round(10 * np.log10(4 / mse), 2)  # range [-1, 1]
            out["decode_split_max_abs"] = float((split.float() - full.float()).abs().max())
            to8 = lambda v: ((v.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()  # noqa: E731
            out["decode_split_psnr_uint8_db"] = psnr(to8(split), to8(full))
    sp.uninstall()  # the split DiTs swapped the blocks' self-attention (X gather: its class too): restore them
    pipe.parallelize(None)
    return out


def measure_replicas(pipe, group, args, image, audio, chunk_samples: int) -> dict:
    """Every rank streams on its own GPU at the same time (one replica per GPU): per-rank and total FPS."""
    pipe.parallelize(None)
    pipe.optimize(None)
    engine = StreamEngine(pipe, max_sessions=4, max_batch=1)
    run_stream(engine, image, audio[: 2 * chunk_samples])  # warm-up
    dist.barrier(group=args.side_group)
    _, total, frames = run_stream(engine, image, audio, seed=group.rank)
    fps = [None] * group.world_size
    dist.all_gather_object(fps, round(len(frames) / total, 2), group=args.side_group)
    return {"fps_per_rank": fps, "total_fps": round(sum(fps), 2)}


def bench_model(model: str, group, args, report: dict, save) -> None:
    leader = group.is_leader
    if model == "tiny":  # the packaged small model: a CPU smoke run of this script (gloo)
        from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline

        pipe = FlashHeadPipeline.from_pretrained("tiny", device=group.device)
    else:
        settings = BenchSettings(model=model, seconds=args.seconds, device=str(group.device), audio=args.audio)
        pipe, _ = build_pipeline(settings)
    same_weights(pipe)
    audio = _speech(args.audio, args.seconds)
    image = np.random.default_rng(0).integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)
    chunk_samples = pipe.new_frames * pipe.config.sample_rate // pipe.config.fps
    out = report.setdefault(model, {})
    if (model != "lite" or args.lite_parts) and not args.no_parts:
        try:
            out["parts"] = measure_parts(pipe, group, args)
        except Exception as e:  # noqa: BLE001 - reported, the run goes on
            out["parts"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        save()
    for name in args.lite_speeds if model == "lite" else args.speeds:
        if time.perf_counter() > args.deadline:
            out[name] = {"skipped": "time budget spent"}
            continue
        part = out.setdefault(name, {"switches": SPEEDS[name]})
        speed = SpeedConfig.parse(SPEEDS[name])
        # 1 GPU: rank 0 alone (pipeline not parallelized), the other ranks wait.
        single = None
        try:
            if args.no_one_gpu:
                raise _Skipped
            pipe.parallelize(None)
            pipe.optimize(speed)
            if leader:
                single = measure(pipe, image, audio, chunk_samples)
                part["gpus_1"] = {k: v for k, v in single.items() if k != "frames"}
                if args.profile_stream:
                    trace = args.trace / f"{model}-{name}-1gpu.json.gz" if args.trace else None
                    part["gpus_1"]["profile_stream"] = profile_stream(pipe, image, audio, chunk_samples, trace)
                part["gpus_1"]["bf16_floor_psnr_db"] = floor_psnr(pipe, image, audio, single["frames"])
        except _Skipped:
            part["gpus_1"] = {"skipped": "--no-one-gpu"}
        except Exception as e:  # noqa: BLE001 - reported, the run goes on
            part["gpus_1"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        part.setdefault("gpus_1", {})["peak_gpu_memory_gib"] = peak_memory_all_ranks(args.side_group)[0]
        save()
        # N GPUs: the same stream, sequence parallel (then with --compare-attention's split, against the same 1 GPU).
        variants = [(args.attention, group, "")]
        if args.compare_attention:
            variants.append((args.compare_attention, group, f"_{args.compare_attention}"))
        if args.compare_priority and group.device.type == "cuda":
            variants.append((args.attention, high_priority_group(group), "_high_priority"))
        if args.compare_nccl_env and group.device.type == "cuda":
            suffix = "_" + args.compare_nccl_env.replace("NCCL_", "").replace("=", "_").replace(" ", "_").lower()
            variants.append((args.attention, nccl_env_group(group, args.compare_nccl_env), suffix))
        for attention, sp_group, suffix in variants:
            key = f"gpus_{group.world_size}{suffix}"
            try:
                reset_peak_memory()
                pipe.parallelize(sp_group, force=FORCE_SPLIT, head_groups=args.head_groups, attention=attention)
                pipe.optimize(speed)
                if leader:
                    try:
                        sp = measure(pipe, image, audio, chunk_samples)
                        if args.profile_stream:
                            label = f"{group.world_size}gpu" + suffix.replace("_", "-", 1)
                            trace = args.trace / f"{model}-{name}-{label}.json.gz" if args.trace else None
                            sp["profile_stream"] = profile_stream(pipe, image, audio, chunk_samples, trace)
                    finally:
                        pipe.release_followers()
                    entry = {**split_settings(pipe, group, args, attention),
                             **{k: v for k, v in sp.items() if k != "frames"}}  # fmt: skip
                    if single is not None:
                        entry["speedup_vs_1_gpu"] = round(sp["steady_fps"] / single["steady_fps"], 3)
                        entry["psnr_vs_1_gpu_db"] = psnr(sp["frames"], single["frames"])
                        entry["frames_compared"] = int(len(sp["frames"]))
                    part[key] = entry
                else:
                    pipe.follow()
            except Exception as e:  # noqa: BLE001
                part[key] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
            memory = peak_memory_all_ranks(args.side_group)
            part.setdefault(key, {})["peak_gpu_memory_gib_per_rank"] = memory
            save()
    if model in ("lite", "tiny") and time.perf_counter() < args.deadline:
        try:
            out["replicas"] = measure_replicas(pipe, group, args, image, audio, chunk_samples)
        except Exception as e:  # noqa: BLE001
            out["replicas"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        save()
    del pipe
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pro,lite", help="pro, lite, pro,lite (or tiny: a CPU smoke run)")
    parser.add_argument("--speeds", default="plain,compiled", help=f"Pro (and tiny): comma list of {', '.join(SPEEDS)}")
    parser.add_argument("--lite-speeds", default="plain", help="the same for Lite")
    parser.add_argument("--lite-parts", action="store_true", help="also measure Lite's DiT / decode parts")
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds of speech per timed stream")
    parser.add_argument("--audio", default=None, help="16 kHz mono WAV (default: the shared speech file)")
    parser.add_argument("--head-groups", type=int, default=None,
                        help="Ulysses all-to-alls pipelined over this many head groups (default: the library's "
                        "choice, 2 for Pro on 2 GPUs; 1: no overlap)")  # fmt: skip
    parser.add_argument("--attention", choices=[m for m in METHODS if m], default=None,
                        help="how self-attention is split (default: the library's choice, Ulysses for Pro)")
    parser.add_argument("--compare-attention", choices=[m for m in METHODS if m], default=None,
                        help="also stream with this split of self-attention (entry gpus_N_<split>), same 1-GPU run")
    parser.add_argument("--compare-priority", action="store_true",
                        help="also stream on an NCCL group with high-priority streams (gpus_N_high_priority)")
    parser.add_argument("--compare-nccl-env", default=None, metavar="SETTINGS",
                        help='also stream on an NCCL group made under these settings, e.g. "NCCL_PROTO=LL128" '
                        "(entry gpus_N_proto_ll128)")  # fmt: skip
    parser.add_argument("--no-parts", action="store_true", help="skip the parts (DiT / decode / encode alone)")
    parser.add_argument("--no-one-gpu", action="store_true",
                        help="skip the 1-GPU stream (no speed-up, no PSNR against it): splits against each other only")
    parser.add_argument("--profile-stream", action="store_true", help="profile a 4-chunk stream on 1 and N GPUs")
    parser.add_argument("--trace", type=Path, default=None, help="with --profile-stream: write Chrome traces here")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which remaining parts are skipped")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.speeds = [s for s in args.speeds.split(",") if s]
    args.lite_speeds = [s for s in args.lite_speeds.split(",") if s]
    for name in args.speeds + args.lite_speeds:  # process-wide settings (cublaslt_no_workspace) before any GEMM
        apply_process_settings(SpeedConfig.parse(SPEEDS[name]))
    if args.trace:
        args.profile_stream = True
        args.trace.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    args.deadline = start + args.budget
    if not dist.is_initialized():  # a stuck collective should fail the part, not eat the whole run
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=300))
    group = init_sequence_parallel()
    # The idle ranks wait out rank 0's single-GPU runs (compilation included) on a CPU group.
    args.side_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=1200))
    report: dict = {"world_size": group.world_size, "head_groups_arg": args.head_groups, "environment": environment(),
                    "models": {}}  # fmt: skip
    if torch.cuda.device_count() > 1:  # without peer access NCCL goes through host memory: slow all-to-alls
        report["environment"]["gpu_peer_access"] = torch.cuda.can_device_access_peer(0, 1)
        report["environment"]["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))

    def save() -> None:
        if not group.is_leader:
            return
        report["elapsed_seconds"] = round(time.perf_counter() - start, 1)
        text = json.dumps(report, indent=2, default=str)
        print(text, flush=True)
        if args.json:
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(args.json)

    for model in args.model.split(","):
        try:
            bench_model(model, group, args, report["models"], save)
        except Exception as e:  # noqa: BLE001
            report["models"].setdefault(model, {})["error"] = f"{type(e).__name__}: {e}"
            save()
    save()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
