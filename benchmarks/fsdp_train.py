"""Full-size FSDP2 training on the GPUs of one host, measured: the trainer's own code on synthetic inputs.

    torchrun --nproc-per-node 2 benchmarks/fsdp_train.py --stage 1 --steps 200 --json $OUT/stage1.json
    torchrun --nproc-per-node 2 benchmarks/fsdp_train.py --stage 2 --steps 10 --json $OUT/stage2.json
    python3 benchmarks/plot_fsdp.py $OUT/stage1.json $OUT/stage2.json --out fsdp.png   # loss and step-time curves
    torchrun --nproc-per-node 2 benchmarks/fsdp_train.py --tiny --size 128 --stage 1 --steps 30 --json s1.json  # CPU

Any number of processes (one per GPU; NCCL on CUDA, gloo on CPU), or none (plain `python`, one process).

Stage 1 runs `flashhead.train.trainer.train` itself, with configs/stage1_lite.yaml: the official Lite DiT with
random weights (no Wan2.1 weights on the device), FSDP2 (`fully_shard` per block, bf16 all-gathered weights,
fp32 gradient reduction and AdamW/EMA shards), bf16 autocast, activation checkpointing per block. Its inputs
are flashhead.train.synthetic's talking blobs (latents whose mouth and head follow audio-like features),
made by DataLoader workers: there is no dataset, VAE or audio encoder on the device. The trainer logs every
step (step time, tokens/s, MFU, peak memory of every GPU) and writes metrics.jsonl and summary.json.

Stage 2 runs the trainer's `assemble` and `iteration` (flashhead.train.stage2) on the full-size student,
fake score and frozen teacher, all three sharded with FSDP2, with the LTX VAE of the release's architecture
(random weights, bf16), on synthetic K-chunk rollouts. It reports every iteration's time, DiT passes, MFU
and peak memory per GPU, the resident state after sharding, and the memory plan of docs/distillation.md.

The JSON file is rewritten after every part (and after every Stage-2 iteration), with any failure's
message in `errors`, so one run always leaves its results. Needs torch and diffusers (FlashHeadDiT is a
diffusers model); no av, no dataset.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

try:
    import diffusers  # noqa: F401  (FlashHeadDiT is a diffusers ModelMixin)
except ImportError:
    sys.exit("fsdp_train.py: diffusers is not installed; carry its wheel (docs/performance.md, Distributed training)")

from flashhead.models.dit import FlashHeadDiT, official_config  # noqa: E402
from flashhead.train.config import Stage1Config, Stage2Config  # noqa: E402
from flashhead.train.rollout_data import RolloutSpec  # noqa: E402
from flashhead.train.stage2 import assemble, chunk_spec, iteration, iteration_passes, trainable_copy  # noqa: E402
from flashhead.train.synthetic import TalkingBlobs, stage1_batches  # noqa: E402
from flashhead.train.throughput import (  # noqa: E402
    MFU_CONVENTION,
    GiB,
    ThroughputMeter,
    gather_memory,
    loss_trend,
    sample_cost,
    summarize,
    write_json,
)
from flashhead.train.trainer import init_distributed, resolve_dit_config, sample_spec, train  # noqa: E402

logger = logging.getLogger("fsdp_train")
CONFIGS = REPO / "configs"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, choices=[1, 2], required=True)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps / iterations (default 200 / 10)")
    ap.add_argument("--json", default=None, help="write the results here (rank 0)")
    ap.add_argument("--micro-batch", type=int, default=None, help="samples per GPU per step (default 8 / 1)")
    ap.add_argument("--size", type=int, default=512, help="frame size (the latent grid is size / 32 for Lite)")
    ap.add_argument("--tiny", action="store_true", help="the tiny networks of configs/stage1_tiny_cpu.yaml")
    ap.add_argument("--no-checkpointing", action="store_true", help="turn activation checkpointing off")
    ap.add_argument("--workers", type=int, default=2, help="Stage 1 synthetic-data worker processes per GPU")
    ap.add_argument("--run-dir", default=None, help="Stage 1 run folder (default: next to --json, or a temp dir)")
    ap.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    return ap.parse_args(argv)


class Report:
    """The result JSON of rank 0, rewritten after every part; a failure is recorded and the next part runs.
    With several processes a failed process exits at once instead (after the JSON is written): its peers may
    be waiting in a collective it will never join, and torchrun stops them when one process exits."""

    def __init__(self, path: str | None, main: bool, data: dict[str, Any], distributed: bool = False):
        self.path, self.main, self.data, self.distributed = path, main, data, distributed
        self.data.setdefault("errors", [])

    def save(self) -> None:
        if self.main and self.path:
            write_json(self.path, self.data)

    def part(self, name: str):
        report = self

        class _Part:
            def __enter__(self):
                report.data.setdefault("parts", {})[name] = "running"
                report.save()

            def __exit__(self, kind, error, tb):
                ok = error is None
                report.data["parts"][name] = "ok" if ok else "failed"
                if not ok:
                    report.data["errors"].append(f"{name}: {kind.__name__}: {error}")
                    logger.error("%s failed:\n%s", name, "".join(traceback.format_exception(kind, error, tb))[-4000:])
                report.save()
                if not ok and report.distributed:
                    logging.shutdown()
                    os._exit(1)
                return not ok or None  # swallow: the next part (and the JSON) still happen

        return _Part()


def environment(info: Any) -> dict[str, Any]:
    cuda = info.device.type == "cuda"
    return {
        "torch": torch.__version__, "python": platform.python_version(), "world_size": info.world_size,
        "backend": dist.get_backend() if info.distributed else None,
        "device": torch.cuda.get_device_name(info.device) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None, "command": " ".join(sys.argv),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Stage 1: the trainer's loop


def stage1_config(args: argparse.Namespace, run_dir: Path, steps: int, micro: int) -> Stage1Config:
    base = CONFIGS / ("stage1_tiny_cpu.yaml" if args.tiny else "stage1_lite.yaml")
    overrides = [
        "parallel=fsdp", "model.init_from_wan=null", f"model.gradient_checkpointing={not args.no_checkpointing}",
        f"data.height={args.size}", f"data.width={args.size}", f"data.micro_batch_size={micro}",
        f"optim.total_steps={steps}", "optim.grad_accum_steps=1", f"optim.warmup_steps={max(1, min(20, steps // 10))}",
        "optim.schedule=constant", "val.interval=0", "export_at_end=false", "log.interval=1",
        "log.checkpoint_interval=0", "log.tensorboard=false", f"output_dir={run_dir}",
    ]  # fmt: skip
    return Stage1Config.from_file(base, overrides + args.set)


def run_stage1(args: argparse.Namespace, info: Any, report: Report) -> None:
    steps, micro = args.steps or 200, args.micro_batch or 8
    run_dir = Path(args.run_dir or (Path(args.json).with_suffix("").as_posix() + "-run" if args.json else
                                    tempfile.mkdtemp(prefix="flashhead-fsdp-")))  # fmt: skip
    for old in ("metrics.jsonl", "summary.json"):  # of an earlier run here: metrics.jsonl is appended to
        if info.is_main and (run_dir / old).exists():
            (run_dir / old).unlink()
    cfg = stage1_config(args, run_dir, steps, micro)
    dit_config = resolve_dit_config(cfg)
    blobs = TalkingBlobs(sample_spec(cfg, dit_config), dit_config, seed=cfg.seed)
    report.data |= {"run_dir": str(run_dir), "config": cfg.to_dict()}
    t0 = time.perf_counter()
    with report.part("stage1_train"):
        inputs = stage1_batches(blobs, micro, info.rank, info.device, workers=args.workers)
        result = train(cfg, inputs=inputs)
        if info.is_main:
            losses = [h["loss"] for h in result.history]
            summary = json.loads((run_dir / "summary.json").read_text())
            report.data |= {
                "summary": summary, "loss_trend": loss_trend(losses, 20), "losses": losses,
                "step_times_s": [h["step_time_s"] for h in result.history],
                "mfu_per_step": [h["mfu"] for h in result.history],
            }  # fmt: skip
    report.data["wall_s"] = time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------
# Stage 2: assemble + iteration of flashhead.train.stage2


def run_stage2(args: argparse.Namespace, info: Any, report: Report) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from stage2_memory import memory_plan, random_vae

    steps, micro = args.steps or 10, args.micro_batch or 1
    base = CONFIGS / ("stage2_tiny_cpu.yaml" if args.tiny else "stage2_lite.yaml")
    overrides = [
        "parallel=fsdp", f"teacher.gradient_checkpointing={not args.no_checkpointing}", f"data.height={args.size}",
        f"data.width={args.size}", f"data.micro_batch_size={micro}", f"distill.total_steps={steps}",
    ]  # fmt: skip
    cfg = Stage2Config.from_file(base, overrides + args.set)
    if args.tiny:
        tiny = Stage1Config.from_file(CONFIGS / "stage1_tiny_cpu.yaml")
        dit_config, vae_config = dict(tiny.model.config), tiny.vae.config
    else:
        dit_config, vae_config = official_config("lite"), None
    report.data["config"] = cfg.to_dict()
    cuda = info.device.type == "cuda"
    t0 = time.perf_counter()

    with report.part("stage2_build"):
        torch.manual_seed(cfg.seed)  # the same seed on every rank: the same random networks before sharding
        # Initialised on the device: made on the host, three 1.5B-parameter float32 networks took the build to 61.9 s
        # (2 x H200, run 41); here 6.9 s (run 45), time that 200 iterations need inside one device call.
        with torch.device(info.device):
            teacher = FlashHeadDiT.from_config(dit_config)
            student, critic = trainable_copy(teacher), trainable_copy(teacher)
        params = sum(p.numel() for p in teacher.parameters())
        vae = random_vae("ltx", vae_config)
        vae.requires_grad_(False).to(info.device, torch.bfloat16 if cuda and cfg.precision != "fp32" else torch.float32)
        spec = RolloutSpec(chunk_spec(cfg, teacher, vae), cfg.distill.num_chunks)
        parts = assemble(cfg, info, teacher, student, critic, vae, spec)
        del teacher, student, critic  # the sharded modules live on in `parts`
        resident = _all_gather_float(torch.cuda.memory_allocated(info.device) / GiB, info) if cuda else None
        report.data |= {
            "parameters_per_network": params, "vae_parameters": sum(p.numel() for p in vae.parameters()),
            "build_s": time.perf_counter() - t0, "resident_after_sharding_gib": resident,
            "peak_during_build": gather_memory(info.device, info.world_size),
            "plan": memory_plan(params, info.world_size, fsdp=info.world_size > 1),
            "mfu_convention": MFU_CONVENTION,
        }  # fmt: skip
    if "stage2_build" in report.data.get("parts", {}) and report.data["parts"]["stage2_build"] != "ok":
        return

    blobs = TalkingBlobs(spec.chunk, dit_config, seed=cfg.seed)
    meter = ThroughputMeter.for_device(info.device, info.world_size)
    recompute = 1.0 if cfg.teacher.gradient_checkpointing else 0.0
    rows: list[dict[str, Any]] = []
    report.data["iterations"] = rows
    with report.part("stage2_iterations"):
        for step in range(steps):
            inputs = blobs.rollout_inputs([blobs.sample_seed(step, info.rank, b) for b in range(micro)], spec, vae,
                                          info.device)  # fmt: skip
            cost = sample_cost(dit_config, inputs.y.shape[2:])
            meter.restart()  # time the iteration alone, not the making of its inputs
            out = iteration(parts, inputs, step, cfg)
            forwards, backwards = iteration_passes(out["k"], out["exit_step"], "dmd" in out, cfg.distill)
            meter.add(cost, micro * forwards, micro * backwards, micro * backwards * recompute)
            rates = meter.report()  # collective: peak memory of every GPU during this iteration
            resident = _all_gather_float(torch.cuda.memory_allocated(info.device) / GiB, info) if cuda else None
            row = {
                "step": step, "generator_step": "dmd" in out, "k": out["k"], "exit_step": out["exit_step"],
                "dit_forwards": forwards, "dit_backwards": backwards, "resident_allocated_gib": resident,
                **{key: float(out[key]) for key in ("critic", "dmd", "regression") if key in out}, **rates,
            }  # fmt: skip
            rows.append(row)
            if info.is_main:
                logger.info("stage 2 iteration %d: %s", step, {k: v for k, v in row.items() if k != "memory"})
            if len(rows) > 1:  # after every iteration, so a run stopped by a time limit keeps its summary
                report.data["summary"] = stage2_summary(rows, report.data)
            report.save()
    report.data["wall_s"] = time.perf_counter() - t0


def _all_gather_float(value: float, info: Any) -> list[float]:
    if not info.distributed:
        return [value]
    every = [None] * info.world_size
    dist.all_gather_object(every, value)
    return every


def stage2_summary(rows: list[dict[str, Any]], data: dict[str, Any]) -> dict[str, Any]:
    """Steady state (the first iteration excluded: Adam states and allocator warm-up) and the plan check."""
    out = summarize(rows, skip=1)
    gen = [r for r in rows[1:] if r["generator_step"]]
    out["generator_step_time_s"] = summarize(gen, skip=0)["step_time_s"] if gen else None
    out["critic_step_time_s"] = summarize([r for r in rows[1:] if not r["generator_step"]], skip=0)["step_time_s"]
    # The fake score's denoising loss (every iteration) and the student's regression loss (generator steps): each
    # draws its K, exit step and noise level at random, so the trend is a mean over windows of iterations.
    out["loss_trend"] = {key: loss_trend([r[key] for r in rows if key in r], 20) for key in ("critic", "regression")}
    resident = [r["resident_allocated_gib"] for r in rows if r["resident_allocated_gib"]]
    if resident:  # after a generator step every Adam state exists: the resident training state (+ VAE)
        measured = [max(values) for values in zip(*resident, strict=True)]
        plan = data["plan"]["total state"]
        vae_gib = data["vae_parameters"] * 2 / GiB
        out["memory_plan_check"] = {
            "plan_state_gib_per_gpu": plan, "vae_bf16_gib": vae_gib,
            "measured_resident_gib_per_gpu": measured,
            "resident_over_plan": [m / (plan + vae_gib) for m in measured],
        }  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = init_distributed()
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    setup = {"stage": args.stage, "tiny": args.tiny, **environment(info)}
    report = Report(args.json, info.is_main, setup, distributed=info.distributed)
    report.save()
    (run_stage1 if args.stage == 1 else run_stage2)(args, info, report)
    report.save()
    if info.is_main:
        shown = {k: v for k, v in report.data.items() if k in ("summary", "loss_trend", "errors", "wall_s")}
        print(json.dumps(shown, indent=2, default=str), flush=True)
    failed = bool(report.data["errors"])
    if info.distributed:
        dist.barrier()
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    from flashhead.errors import FlashHeadError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        sys.exit(main())
    except FlashHeadError as e:  # a bad setting: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
