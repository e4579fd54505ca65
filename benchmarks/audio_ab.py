"""A / B in one process: where the next chunk's audio is encoded, on one GPU (session-10 experiment).

    python3 benchmarks/audio_ab.py --model pro --json ab.json

Steady chunk time of one --optimized stream (6 s of speech, fed at once), alternating the variants so that clock
and thermal drift fall on all of them alike:
- "optimized": as shipped (the next chunk's audio encoded on a side stream, queued before the current chunk);
- "native_pos_conv": wav2vec2's grouped positional conv on PyTorch's own CUDA kernels instead of cuDNN's (cuDNN
  runs it on internal streams that wait for everything queued before it on the default stream);
- "no_audio_stream": audio_stream off (the next chunk's audio encoded on the main stream before its DiT).
Session 10 on one H100 (docs/results/audio_ab_h100.json, from a build where "optimized" had the native conv): no
variant was measurably faster, so the shipped encoder keeps cuDNN.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import numpy as np
import torch

from flashhead.benchmark import BenchSettings, _speech, build_pipeline, environment, run_stream
from flashhead.pipeline.speed import SpeedConfig
from flashhead.pipeline.stream import StreamEngine


def _cudnn_off(module, args) -> None:
    module._cudnn_was_enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False


def _cudnn_back(module, args, output) -> None:
    torch.backends.cudnn.enabled = module.__dict__.pop("_cudnn_was_enabled", True)


def native_pos_conv(pipe, on: bool) -> None:
    """Grouped conv1d layers of the audio encoder with cuDNN switched off for their call (on) or as usual.

    Only the hooks added here are removed: an old-style weight norm is a forward pre-hook of the same layer."""
    for module in pipe.audio_encoder.model.modules():
        if isinstance(module, torch.nn.Conv1d) and module.groups > 1:
            for handle in module.__dict__.pop("_ab_hooks", ()):
                handle.remove()
            if on:
                module._ab_hooks = (module.register_forward_pre_hook(_cudnn_off),
                                    module.register_forward_hook(_cudnn_back, always_call=True))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pro")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a smoke run of this script only
    pipe = build_pipeline(BenchSettings(model=args.model, dtype="bfloat16", device=device))[0]
    audio = _speech(None, 6.0)
    image = np.random.default_rng(0).integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)
    chunks = math.ceil(len(audio) / pipe.audio_config().slice_samples(pipe.new_frames))
    variants = {
        "optimized": (SpeedConfig.optimized(), False),
        "native_pos_conv": (SpeedConfig.optimized(), True),
        "no_audio_stream": (SpeedConfig.optimized().replace(audio_stream=False), False),
    }
    pipe.optimize(SpeedConfig.optimized())
    engine = StreamEngine(pipe, max_sessions=4, max_batch=1)
    run_stream(engine, image, audio)  # compile and capture once
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (speed, hooks) in variants.items():
            pipe.speed = speed  # only stream-engine switches differ: the compiled graphs stay
            native_pos_conv(pipe, hooks)
            engine = StreamEngine(pipe, max_sessions=4, max_batch=1)
            run_stream(engine, image, audio[: 2 * len(audio) // chunks])  # warm this variant
            _, total, _ = run_stream(engine, image, audio, seed=0)
            times[name].append(1000 * total / chunks)
    report = {"model": args.model, "chunks": chunks, **environment(),
              "chunk_ms": {k: [round(t, 1) for t in v] for k, v in times.items()},
              "median_chunk_ms": {k: round(statistics.median(v), 1) for k, v in times.items()}}  # fmt: skip
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
