"""Sequence-parallel benchmark: one GPU against N GPUs, Pro and Lite, in one torchrun run.

    torchrun --nproc-per-node 2 benchmarks/sp_bench.py --json $OUT/sp.json          # Pro and Lite
    torchrun --nproc-per-node 2 benchmarks/sp_bench.py --model pro --json $OUT/sp.json

For each model (random-init full-size weights, official config, identical on every rank) and each speed
configuration: rank 0 alone streams the speech through the engine (the other ranks wait), then all ranks
stream it again sequence-parallel. Reported per part: steady FPS, time to first frame, per-stage ms per
chunk (rank 0, synchronised), peak GPU memory of every rank, the SP/1-GPU speed-up, and the PSNR of the
SP frames against the 1-GPU frames of the same seed (bf16). The JSON is rewritten after every part and a
part that fails is reported and skipped, so a run cut short still leaves its numbers. Writes no video.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from flashhead.benchmark import BenchSettings, _speech, _sync, build_pipeline, environment, run_stream  # noqa: E402
from flashhead.parallel import init_sequence_parallel  # noqa: E402
from flashhead.pipeline.speed import SpeedConfig  # noqa: E402
from flashhead.pipeline.stream import StreamEngine  # noqa: E402
from flashhead.pipeline.timing import StageTimer  # noqa: E402

logger = logging.getLogger("sp_bench")

SPEEDS = {
    "plain": "",
    "fast": "rope_table,cond_cache,attention=cudnn,cudnn_benchmark,pinned_memory",
    "compiled": "rope_table,cond_cache,attention=cudnn,cudnn_benchmark,pinned_memory,compile_dit,compile_vae",
}


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


def measure(pipe, image, audio, chunk_samples: int) -> dict:
    """Rank 0: a warm-up stream, first-frame latency, a timed stream, a stage-timed stream; frames kept."""
    engine = StreamEngine(pipe, max_sessions=4, max_batch=1)
    reset_peak_memory()
    start = time.perf_counter()
    run_stream(engine, image, audio[: 2 * chunk_samples])
    warmup = time.perf_counter() - start
    first = [run_stream(engine, image, audio[:chunk_samples])[0] for _ in range(2)]
    _, total, frames = run_stream(engine, image, audio, seed=0)
    pipe.timer = StageTimer()
    run_stream(engine, image, audio, seed=0)
    stages = {k: round(v["mean_ms"], 1) for k, v in pipe.timer.summary().items()}
    pipe.timer = StageTimer(sync=False)
    _sync()
    return {
        "steady_fps": round(len(frames) / total, 2),
        "time_to_first_frame_ms": round(1000 * float(np.median(first)), 1),
        "stage_ms_per_chunk": stages,
        "warmup_seconds": round(warmup, 1),
        "frames": frames,
    }


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_all_ranks(side_group) -> list[float | None]:
    """Every rank's peak GPU memory (GiB); also where the waiting ranks wait (gloo, long timeout)."""
    mine = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine, group=side_group)
    return every


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
    for name in args.speeds:
        if time.perf_counter() > args.deadline:
            out[name] = {"skipped": "time budget spent"}
            continue
        part = out.setdefault(name, {"switches": SPEEDS[name]})
        speed = SpeedConfig.parse(SPEEDS[name])
        # 1 GPU: rank 0 alone (pipeline not parallelized), the other ranks wait.
        single = None
        try:
            pipe.parallelize(None)
            pipe.optimize(speed)
            if leader:
                single = measure(pipe, image, audio, chunk_samples)
                part["gpus_1"] = {k: v for k, v in single.items() if k != "frames"}
        except Exception as e:  # noqa: BLE001 - reported, the run goes on
            part["gpus_1"] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        part.setdefault("gpus_1", {})["peak_gpu_memory_gib"] = peak_memory_all_ranks(args.side_group)[0]
        save()
        # N GPUs: the same stream, sequence parallel.
        try:
            reset_peak_memory()
            pipe.parallelize(group)
            pipe.optimize(speed)
            if leader:
                try:
                    sp = measure(pipe, image, audio, chunk_samples)
                finally:
                    pipe.release_followers()
                entry = {k: v for k, v in sp.items() if k != "frames"}
                if single is not None:
                    entry["speedup_vs_1_gpu"] = round(sp["steady_fps"] / single["steady_fps"], 3)
                    entry["psnr_vs_1_gpu_db"] = psnr(sp["frames"], single["frames"])
                    entry["frames_compared"] = int(len(sp["frames"]))
                part[f"gpus_{group.world_size}"] = entry
            else:
                pipe.follow()
        except Exception as e:  # noqa: BLE001
            error = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
            part[f"gpus_{group.world_size}"] = error
        memory = peak_memory_all_ranks(args.side_group)
        part.setdefault(f"gpus_{group.world_size}", {})["peak_gpu_memory_gib_per_rank"] = memory
        save()
    del pipe
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="pro,lite", help="pro, lite, pro,lite (or tiny: a CPU smoke run)")
    parser.add_argument("--speeds", default="plain,fast,compiled", help=f"comma list of {', '.join(SPEEDS)}")
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds of speech per timed stream")
    parser.add_argument("--audio", default=None, help="16 kHz mono WAV (default: the shared speech file)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds after which remaining parts are skipped")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.speeds = [s for s in args.speeds.split(",") if s]
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
    report: dict = {"world_size": group.world_size, "environment": environment(), "models": {}}

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
