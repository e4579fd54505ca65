"""Where a Stage-1 step of flashhead-tiny spends its time: the trainer's own loop, timed and profiled.

    PYTHONPATH=src python benchmarks/stage1_step_profile.py --run runs/tiny --data data/tiny/procedural \
        --steps 20 --warmup 5 --profile-steps 3 --out runs/s1-profile.json

`--run` is a `flashhead train tiny` run folder that holds at least the VAE and the latent cache (`--until
cache`). The recipe's Stage-1 settings (model, batch 32, workers, losses; `--set` overrides them, e.g.
stage1.data.num_workers=12) are trained twice by `flashhead.train.trainer.train` itself:

    timing     warmup + steps optimizer steps; the clock (after a device sync) runs over the last `steps`
    profiling  warmup + profile_steps steps under torch.profiler; the trainer marks its phases as
               `stage1.data`, `stage1.noise` (inside forward), `stage1.forward`, `stage1.backward`,
               `stage1.optimizer` (clipping, AdamW, schedule) and `stage1.ema`; the rest of a step is
               `other` (loss sums, logging, the budget check)

and prints JSON: `step_ms` (wall, unprofiled), and per profiled step the host milliseconds of each phase,
`outside_model_ms` (everything but the DiT's forward and backward) against `model_ms`, `ops` (aten
operators through the dispatcher) and on CUDA `launches` (kernel launches and copies) and `device_ms`
(kernel time), each per phase too. The host numbers include the profiler's own cost per operator.
`last_loss` (the timed run's last step) tells two versions of the trainer computed the same thing.
`--budget-minutes` is set by default as `benchmarks/tiny_run.sh` sets it on the device (a budget check
runs every step); `--budget-minutes 0` trains without one.
"""

from __future__ import annotations

import argparse
import bisect
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

PHASES = ("data", "noise", "forward", "backward", "optimizer", "ema")
MODEL = ("forward", "backward")  # the DiT's own compute (forward without the noise drawing)
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaMemcpyAsync")


def recipe_config(args: argparse.Namespace, out: Path, steps: int):
    from flashhead.config_files import apply_override
    from flashhead.train.config import Stage1Config
    from flashhead.train.tiny import load_recipe, stage1_config

    cfg = stage1_config(load_recipe(overrides=args.set), args.data, args.run).to_dict()
    budget = args.budget_minutes or None
    for item in (
        f"optim.total_steps={steps}", f"optim.max_minutes={json.dumps(budget)}", "log.tensorboard=false",
        "log.checkpoint_interval=0", "export_at_end=false", f"output_dir={out}",
    ):  # fmt: skip
        apply_override(cfg, item)
    return Stage1Config.from_dict(cfg)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(args: argparse.Namespace, out: Path) -> tuple[float, float]:
    """(wall milliseconds per optimizer step over the last `args.steps` steps, the last step's loss)."""
    from flashhead.train.trainer import train

    clock: dict[int, float] = {}

    def on_step(step: int) -> None:
        if step in (args.warmup, args.warmup + args.steps):
            sync()
            clock[step] = time.perf_counter()

    result = train(recipe_config(args, out, args.warmup + args.steps), on_step=on_step)
    return 1000 * (clock[args.warmup + args.steps] - clock[args.warmup]) / args.steps, result.history[-1]["loss"]


def profile_steps(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile, schedule

    from flashhead.train.trainer import train

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    plan = schedule(wait=0, warmup=args.warmup, active=args.profile_steps, repeat=1)
    with profile(activities=activities, schedule=plan) as prof:
        train(recipe_config(args, out, args.warmup + args.profile_steps), on_step=lambda _: prof.step())
    return summarize(list(prof.events()), args.profile_steps)


def summarize(events: list[Any], n: int) -> dict[str, Any]:
    """Per-step means of host time, operators, launches and kernel time, by phase (the innermost phase
    range open when an operator starts, on any thread: backward runs in autograd's own threads on CUDA)."""
    steps = [e for e in events if e.name.startswith("ProfilerStep")]
    regions = sorted((e for e in events if e.name.startswith("stage1.")), key=lambda e: e.time_range.start)
    starts = [r.time_range.start for r in regions]
    host, ops, launches, device = Counter(), Counter(), Counter(), Counter()
    for r in regions:
        host[r.name.removeprefix("stage1.")] += r.time_range.elapsed_us()
    host["forward"] -= host["noise"]  # noise is drawn inside compute_losses

    def phase_of(t: float) -> str:
        i = bisect.bisect_right(starts, t) - 1
        while i >= 0:  # the latest-opened range that still contains t (ranges nest, never overlap otherwise)
            if regions[i].time_range.end >= t:
                return regions[i].name.removeprefix("stage1.")
            i -= 1
        return "other"

    for e in events:
        if e.name.startswith("aten::"):
            ops[phase_of(e.time_range.start)] += 1
        elif e.name in LAUNCHES:
            launches[phase_of(e.time_range.start)] += 1
        elif e.device_type == torch.autograd.DeviceType.CUDA:
            device["total"] += e.time_range.elapsed_us()
    step_us = sum(s.time_range.elapsed_us() for s in steps)
    host["other"] = step_us - sum(host[p] for p in PHASES)
    model_us = sum(host[p] for p in MODEL)
    result = {
        "host_ms": round(step_us / n / 1000, 3),
        "outside_model_ms": round((step_us - model_us) / n / 1000, 3),
        "model_ms": round(model_us / n / 1000, 3),
        "phases_ms": {p: round(host[p] / n / 1000, 3) for p in (*PHASES, "other")},
        "ops": round(sum(ops.values()) / n),
        "phases_ops": {p: round(ops[p] / n) for p in (*PHASES, "other")},
    }
    if launches:
        result |= {
            "launches": round(sum(launches.values()) / n),
            "phases_launches": {p: round(launches[p] / n) for p in (*PHASES, "other")},
            "device_ms": round(device["total"] / n / 1000, 3),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a tiny-recipe run folder with vae/ and cache/")
    parser.add_argument("--data", action="append", required=True, help="the run's clip shard folders (repeatable)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps before the clock or the profiler starts")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps (0: no profile)")
    parser.add_argument("--budget-minutes", type=float, default=6.0, help="stage1.optim.max_minutes (0: none)")
    parser.add_argument("--set", action="append", default=[], help="a recipe override, e.g. stage1.data.num_workers=1")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    args.set = [s if s.startswith("stage1.") else f"stage1.{s}" for s in args.set]
    if min(args.steps, args.warmup) < 1 or args.profile_steps < 0:
        parser.error("--steps and --warmup must be >= 1, --profile-steps >= 0")

    from flashhead.train.tiny import load_recipe

    s1 = load_recipe(overrides=args.set)["stage1"]
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "batch": s1["data"]["micro_batch_size"], "workers": s1["data"]["num_workers"],
        "budget_minutes": args.budget_minutes or None, "overrides": args.set,
    }  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="s1-profile-"))
    try:
        step_ms, result["last_loss"] = time_steps(args, work / "timing")
        result["step_ms"], result["steps_per_s"] = round(step_ms, 2), round(1000 / step_ms, 2)
        if args.profile_steps:
            result["profile"] = profile_steps(args, work / "profile")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
