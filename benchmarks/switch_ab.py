"""A / B of speed switches in one process on one GPU: steady chunk time and the synchronised stage times.

    python3 benchmarks/switch_ab.py --model pro --variant "fused_gelu=off" --json ab.json

Every variant is `--optimized` with its own changes on top ("" is `--optimized` itself). The variants take turns
for `--rounds` rounds, so that clock and thermal drift fall on all of them alike. Per variant and round: the steady
chunk time of one stream (`timed_stream`: a chunk per period from the first hand-out to the last) and, from a
second stream with a synchronising stage timer, the mean milliseconds of each stage per chunk. On a machine
without CUDA it runs the shipped tiny model on the CPU (a smoke run of this script only).
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch

from flashhead.benchmark import BenchSettings, _speech, build_pipeline, environment, run_stream, timed_stream
from flashhead.pipeline.speed import SpeedConfig
from flashhead.pipeline.stream import StreamEngine
from flashhead.pipeline.timing import StageTimer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pro")
    parser.add_argument("--variant", action="append", default=[], help="switch changes over --optimized (repeat)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--audio", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    model = args.model if cuda else "tiny"
    pipe = build_pipeline(BenchSettings(model=model, dtype="bfloat16", device="cuda" if cuda else "cpu"))[0]
    audio = _speech(args.audio, args.seconds)
    image = np.random.default_rng(0).integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)
    warm = audio[: 2 * pipe.new_frames * pipe.config.sample_rate // pipe.config.fps]
    names = ["optimized", *args.variant]
    base = SpeedConfig.optimized()
    speeds = {name: SpeedConfig.parse("" if name == "optimized" else name, base=base) for name in names}
    if not cuda:  # the fused attention kernels of the preset are CUDA's
        speeds = {name: speed.replace(attention="sdpa") for name, speed in speeds.items()}
    steady: dict[str, list[float]] = {name: [] for name in names}
    stages: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    frames: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for name in names:
            pipe.optimize(speeds[name])
            engine = StreamEngine(pipe, max_sessions=4, max_batch=1)
            run_stream(engine, image, warm)  # compile (first round) and capture this variant's graphs
            frames[name], _, fps = timed_stream(engine, image, audio)
            steady[name].append(1000 * pipe.new_frames / fps)
            pipe.timer = StageTimer()
            run_stream(engine, image, audio)
            stages[name].append({k: v["mean_ms"] for k, v in pipe.timer.summary().items()})
            pipe.timer = StageTimer(sync=False)
    reference = frames["optimized"].astype(np.float64)

    def psnr(a: np.ndarray) -> float | str:
        mse = float(np.mean((a.astype(np.float64) - reference) ** 2))
        return "inf" if mse == 0 else round(10 * np.log10(255**2 / mse), 2)

    report = {
        "model": model, "rounds": args.rounds, "seconds": args.seconds, **environment(),
        "switches": {name: speeds[name].to_dict() for name in names},
        "steady_chunk_ms": {k: [round(t, 1) for t in v] for k, v in steady.items()},
        "median_steady_chunk_ms": {k: round(statistics.median(v), 1) for k, v in steady.items()},
        "median_stage_ms": {k: {s: round(statistics.median(r[s] for r in v), 2) for s in v[0]}
                            for k, v in stages.items()},
        "psnr_vs_optimized_db": {k: psnr(v) for k, v in frames.items()},
    }  # fmt: skip
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
