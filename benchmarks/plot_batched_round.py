"""Where a batched round's GPU time goes per stream, and how many real-time streams its kernels allow.

    python benchmarks/plot_batched_round.py lite.streams20.json.gz --model lite --streams 20 \
        --out docs/img/lite-batched-round.png --json round.json

Reads the round's Chrome trace (`flashhead bench --trace T --streams N` writes it beside T) or trace_stages.py's
JSON of it. Per stage and stream: the GPU milliseconds, the part in tensor-core kernels (GEMMs, implicit-GEMM
convolutions, attention: trace_stages.is_tensor_core_kernel), the stage's FLOPs (the DiT's from the architecture,
the VAE's counted on a meta-device copy: flashhead.pipeline.flops) and the rate its tensor-core kernels reach. Then
two bounds on the streams one GPU keeps real time: at the measured time per stream, and if everything but the
tensor-core kernels took no time at all. Prints JSON; the PNG shows the per-stream bar against the chunk period's
share of 20 and 24 streams.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import trace_stages  # noqa: E402

STAGES = ("dit", "vae_decode", "vae_encode_motion", "color_correction", "audio_features", trace_stages.OUTSIDE)


def stage_flops(model: str) -> dict[str, float]:
    """FLOPs of one stream's chunk per stage at 512 x 512: the DiT's four steps, the VAE's decode and re-encode."""
    from flashhead.benchmark import BenchSettings, build_pipeline
    from flashhead.pipeline.flops import dit_forward_flops, vae_flops

    pipe, _ = build_pipeline(BenchSettings(model=model, device="meta", dtype="bfloat16"))
    cfg = pipe.config
    latent = pipe.vae.latent_shape(cfg.frame_num, cfg.height, cfg.width)
    dit = cfg.num_inference_steps * dit_forward_flops(pipe.dit.config, latent[1:])
    return {"dit": dit, **vae_flops(pipe.vae, latent, pipe.motion_frames, cfg.height, cfg.width)}


def analyse(stages: dict, streams: int, chunk_ms: float, flops: dict[str, float], peak: float) -> dict:
    gpu, tensor = stages["gpu_ms_by_stage"], stages["tensor_core_ms_by_stage"]
    rows = {}
    for name in STAGES:
        if name not in gpu:
            continue
        row = {"ms_per_stream": round(gpu[name] / streams, 2),
               "tensor_core_ms_per_stream": round(tensor.get(name, 0.0) / streams, 2)}  # fmt: skip
        if name in flops:
            row["tflop_per_stream"] = round(flops[name] / 1e12, 3)
            if tensor.get(name):
                row["tensor_core_tflops"] = round(flops[name] * streams / (tensor[name] / 1000) / 1e12, 1)
                row["tensor_core_fraction_of_peak"] = round(row["tensor_core_tflops"] * 1e12 / peak, 3)
        rows[name] = row
    per_stream = sum(r["ms_per_stream"] for r in rows.values())
    tensor_per_stream = sum(r["tensor_core_ms_per_stream"] for r in rows.values())
    total_flops = sum(flops.values())
    return {
        "streams": streams, "chunk_ms": chunk_ms, "stages": rows,
        "gpu_ms_per_stream": round(per_stream, 2), "tensor_core_ms_per_stream": round(tensor_per_stream, 2),
        "tflop_per_stream": round(total_flops / 1e12, 3),
        # Real-time streams if the GPU were busy the whole period at this round's time per stream ...
        "streams_at_measured_gpu_time": round(chunk_ms / per_stream, 1),
        # ... and if only the tensor-core kernels took time (every other kernel free): a ceiling.
        "streams_if_only_tensor_core_kernels": round(chunk_ms / tensor_per_stream, 1),
        # The whole round's rate that 24 streams need, as a fraction of the GPU's dense bf16 peak.
        "peak_fraction_needed_for_24": round(24 * total_flops / (chunk_ms / 1000) / peak, 3),
    }  # fmt: skip


def plot(result: dict, model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flashhead.atomic import atomic_path

    colours = {"dit": "#4c72b0", "vae_decode": "#dd8452", "vae_encode_motion": "#55a868",
               "color_correction": "#c44e52", "audio_features": "#8172b3", trace_stages.OUTSIDE: "#8c8c8c"}  # fmt: skip
    fig, ax = plt.subplots(figsize=(11, 2.6))
    left = 0.0
    for name, row in result["stages"].items():
        tensor, rest = row["tensor_core_ms_per_stream"], row["ms_per_stream"] - row["tensor_core_ms_per_stream"]
        ax.barh(0, tensor, left=left, color=colours[name], label=f"{name}: tensor-core kernels" if tensor else None)
        ax.barh(0, rest, left=left + tensor, color=colours[name], alpha=0.45, hatch="//", label=f"{name}: other")
        left += row["ms_per_stream"]
    ax.text(left, 0, f" {left:.1f} ms", va="center")
    for n, style in ((20, ":"), (24, "--")):
        ax.axvline(result["chunk_ms"] / n, color="black", linestyle=style,
                   label=f"{result['chunk_ms'] / n:.1f} ms: {n} streams in real time")  # fmt: skip
    ax.set_yticks([])
    ax.set_xlabel(f"GPU ms per stream in a round of {result['streams']} batched {model} streams")
    ax.set_title(f"{model}: {result['tflop_per_stream']:.2f} TFLOP per stream and chunk; 24 real-time streams "
                 f"need {100 * result['peak_fraction_needed_for_24']:.0f} % of the bf16 peak\nfor the whole round "
                 f"(tensor-core kernels alone: {result['streams_if_only_tensor_core_kernels']} streams)",
                 fontsize=10)  # fmt: skip
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.15), fontsize=7)
    ax.set_xlim(0, max(left, result["chunk_ms"] / 20) * 1.15)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path, help="the batched round's trace (.json.gz) or trace_stages.py's JSON")
    parser.add_argument("--model", choices=["lite", "pro"], required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--chunk-ms", type=float, default=None, help="default: the model's chunk period")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200)")
    parser.add_argument("--out", type=Path, default=None, help="PNG")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    data = trace_stages.load_trace(args.trace)
    stages = data if "gpu_ms_by_stage" in data else trace_stages.stage_breakdown(data)
    if "tensor_core_ms_by_stage" not in stages:
        sys.exit(f"error: {args.trace} has no tensor_core_ms_by_stage: pass the trace itself")
    chunk_ms = args.chunk_ms or {"lite": 24, "pro": 28}[args.model] / 25 * 1000
    result = analyse(stages, args.streams, chunk_ms, stage_flops(args.model), args.peak_tflops * 1e12)
    result["model"] = args.model
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    if args.out:
        plot(result, args.model, args.out)
    return result


if __name__ == "__main__":
    main()
