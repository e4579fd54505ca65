"""How far each speed switch moves the frames, and how far the frames move anyway (run on the device).

For each model it streams the same two chunks (same portrait, speech and seed) through the plain eager bf16
path and through each switch, and prints PSNR of the uint8 frames against the plain path, per chunk. Two
references put those numbers in scale:

    fp32          the plain path in float32: how far bf16 itself is from the exact computation
    input+1       the plain bf16 path with one pixel of the portrait changed by one grey level: how much a
                  perturbation far below bf16 precision moves this network's output

Randomly initialised full-size networks amplify any rounding difference (no training made them smooth), so
on them every non-bit-exact switch lands near the input+1 figure; the shipped flashhead-tiny has trained
weights and shows what a trained network does.

Usage (device):  PYTHONPATH=src python benchmarks/output_equivalence.py --models lite,pro,tiny --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

SWITCHES = [
    ("rope_table", "rope_table=on"),
    ("cond_cache", "cond_cache=on"),
    ("attention_cudnn", "attention=cudnn"),
    ("attention_flash", "attention=flash"),
    ("cuda_graphs", "cuda_graphs=on"),
    ("compile_color", "compile_color=on"),
    ("compile_dit", "compile_dit=on,rope_table=on"),
    ("compile_vae", "compile_vae=on"),
    ("optimized", "optimized"),
    # the same, with inductor told to round intermediates to bf16 where eager does
    ("compile_dit+emulate", "compile_dit=on,rope_table=on"),
    ("compile_color+emulate", "compile_color=on"),
    ("optimized+emulate", "optimized"),
]


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else round(10 * math.log10(255**2 / mse), 2)


def build(model: str, dtype, device: str):
    from flashhead.benchmark import BenchSettings, build_pipeline

    return build_pipeline(BenchSettings(model=model, device=device, dtype=str(dtype).removeprefix("torch.")))[0]


def stream(pipe, image: np.ndarray, audio: np.ndarray, switches: str, emulate: bool = False) -> list[np.ndarray]:
    """Frames of each chunk (a first chunk and a later one) with `switches` on."""
    import torch
    import torch._inductor.config

    from flashhead.pipeline import fast_path
    from flashhead.pipeline.speed import SpeedConfig

    torch._dynamo.reset()
    fast_path._compiled_color.clear()
    torch._inductor.config.emulate_precision_casts = emulate
    from flashhead.pipeline.stream import StreamEngine

    pipe.optimize(SpeedConfig.optimized() if switches == "optimized" else SpeedConfig.parse(switches))
    engine = StreamEngine(pipe)
    session = engine.open_session(image, seed=0)
    session.push_audio(audio)
    session.end()
    chunks = [c.frames for c in engine.run_until_idle()]
    pipe.optimize(None)
    return chunks


def per_chunk(chunks: list[np.ndarray], reference: list[np.ndarray]) -> list[float | None]:
    return [psnr(a, b) for a, b in zip(chunks, reference, strict=True)]


def main() -> None:
    import torch

    from flashhead.benchmark import _speech

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lite,pro,tiny")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--switches", default=",".join(name for name, _ in SWITCHES))
    args = parser.parse_args()
    wanted = set(args.switches.split(","))
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    for model in args.models.split(","):
        began = time.perf_counter()
        try:
            pipe = build(model, torch.bfloat16, args.device)
            cfg = pipe.config
            image = np.random.default_rng(0).integers(0, 256, (cfg.height, cfg.width, 3), dtype=np.uint8)
            audio = _speech(os.environ.get("FLASHHEAD_BENCH_AUDIO"), 2 * pipe.new_frames / cfg.fps)
            reference = stream(pipe, image, audio, "")
            again = stream(pipe, image, audio, "")
            emit({"model": model, "case": "plain again", "psnr_db": per_chunk(again, reference)})
            nudged = image.copy()
            nudged[0, 0, 0] = nudged[0, 0, 0] + 1 if nudged[0, 0, 0] < 255 else 254
            emit({"model": model, "case": "input+1", "psnr_db": per_chunk(stream(pipe, nudged, audio, ""), reference)})
            for name, text in SWITCHES:
                if name not in wanted:
                    continue
                try:
                    chunks = stream(pipe, image, audio, text, emulate=name.endswith("+emulate"))
                    emit({"model": model, "case": name, "psnr_db": per_chunk(chunks, reference)})
                except Exception as e:  # noqa: BLE001 - one failing switch must not hide the others
                    emit({"model": model, "case": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            del pipe
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            full = build(model, torch.float32, args.device)
            emit({"model": model, "case": "fp32", "psnr_db": per_chunk(stream(full, image, audio, ""), reference)})
            del full
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            emit({"model": model, "case": "model", "error": f"{type(e).__name__}: {str(e)[:300]}"})
        emit({"model": model, "case": "seconds", "value": round(time.perf_counter() - began, 1)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "output_equivalence.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
