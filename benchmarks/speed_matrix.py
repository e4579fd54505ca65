"""Speed matrix on one GPU: the plain eager bf16 path, then each optimisation added on top, then extras.

One process per model (compile state and CUDA graphs never leak between models), then a fresh process per
model for the cold start (process start to first frame, compile caches warm). Prints one JSON line per
configuration as it finishes and writes, under --out (default $OUT or ./speed_matrix_out):

    speed_matrix.json   every row: FPS, time to first frame, per-stage ms, DiT MFU, peak memory, warm-up
                        (compile + capture) seconds, PSNR of the frames against the plain path (same seed)
    speed_stages.png    per-stage breakdown per configuration (matplotlib; skipped if not installed)

Usage (device):  PYTHONPATH=src python benchmarks/speed_matrix.py            # Lite + Pro, ~7 min on an H100
Plot again:      python benchmarks/speed_matrix.py --plot-only speed_matrix.json
Cold starts:     python benchmarks/speed_matrix.py --models pro --cold-only   # fresh caches, then warm ones
Each model gets a time budget; configurations that would start after it are recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (row name, changes applied on top of the previous row of the ladder); rows marked "sibling" are measured
# but not kept for the rows after them. cublaslt_no_workspace is process-wide and read at the first GEMM, so a
# model's process applies it before its plain row: every row runs with it (its own row changes nothing; its effect
# is measured across processes, docs/performance-log.md).
LADDER: list[tuple[str, dict, bool]] = [
    ("plain", {}, False),
    ("+rope_table", {"rope_table": True}, False),
    ("+cond_cache", {"cond_cache": True}, False),
    ("+attention=flash", {"attention": "flash"}, True),
    ("+attention=fa3", {"attention": "fa3"}, True),
    ("+attention=cudnn", {"attention": "cudnn"}, False),  # the preset's attention: see ladder()
    ("+cudnn_benchmark", {"cudnn_benchmark": True}, False),
    ("+cudnn_search_limit=32", {"cudnn_search_limit": 32}, False),
    ("+vae_channels_last", {"vae_channels_last": True}, False),
    ("+vae_conv_pad", {"vae_conv_pad": True}, False),
    ("+vae_subpixel_upsample", {"vae_subpixel_upsample": True}, False),
    ("+pinned_memory", {"pinned_memory": True}, False),
    ("+copy_stream", {"copy_stream": True}, False),
    ("+audio_stream", {"audio_stream": True}, False),
    ("+audio_tf32", {"audio_tf32": True}, False),
    ("+launch_ahead", {"launch_ahead": True}, True),
    ("+compile_color", {"compile_color": True}, False),
    ("+fused_gelu", {"fused_gelu": True}, False),
    ("+compile_dit", {"compile_dit": True}, False),
    ("+persistent_norms", {"persistent_norms": True}, False),
    ("+rope_fp32", {"rope_fp32": True}, False),
    ("+fused_qk_rope", {"fused_qk_rope": True}, False),
    ("+cuda_graphs", {"cuda_graphs": True}, False),
    ("+compile_vae", {"compile_vae": True}, False),
    ("+vae_conv_out_gemm", {"vae_conv_out_gemm": True}, False),  # after compile_vae: eager it is slower than cuDNN
    ("+vae_cutlass_conv", {"vae_cutlass_conv": True}, False),  # only where the preset takes it: see ladder()
    ("+vae_whole_chunk", {"vae_whole_chunk": True}, False),  # with vae_cutlass_conv only: see ladder()
    ("+vae_call_frames=3", {"vae_call_frames": 3}, False),  # bounds vae_whole_chunk's calls: with it only, see ladder()
    ("+vae_attention_gemm", {"vae_attention_gemm": True}, False),
    ("+vae_static_shapes", {"vae_static_shapes": True}, False),
    ("+vae_cuda_graphs", {"vae_cuda_graphs": True}, False),
    ("+early_first_frames", {"early_first_frames": True}, False),
    ("+video_encoder=auto", {"video_encoder": "auto"}, False),
    ("+cublaslt_no_workspace (all)", {"cublaslt_no_workspace": True}, False),
    ("all +cross_attn_fold", {"cross_attn_fold": True}, True),  # not yet in the preset: measured beside it
    ("all +decode_new_only", {"decode_new_only": True}, True),
    ("all +fp8", {"fp8": True}, True),  # last: quantisation cannot be undone
]


def ladder() -> list[tuple[str, dict, bool]]:
    """LADDER with its kept attention row set to the `optimized` preset's choice (fa3 where FlashAttention-3 runs,
    which then needs no sibling row of its own), and the CUTLASS convolutions only where the preset takes them (their
    library built, a Hopper GPU), so the "(all)" row is what --optimized runs."""
    from flashhead.pipeline.speed import SpeedConfig

    optimized = SpeedConfig.optimized()
    cutlass_rows = ("+vae_cutlass_conv", "+vae_whole_chunk", "+vae_call_frames=3")
    rows = [row for row in LADDER if optimized.vae_cutlass_conv or row[0] not in cutlass_rows]
    preset = optimized.attention
    if preset == "cudnn":
        return rows
    rows = [row for row in rows if row[0] != f"+attention={preset}"]
    return [(f"+attention={preset}", {"attention": preset}, False) if name == "+attention=cudnn" else (name, c, s)
            for name, c, s in rows]  # fmt: skip


# The preset's switches in themed steps (`--ladder groups`): ten rows instead of ~35, so that each model's whole
# ladder fits one device call. Each group takes the preset's value of its fields; the last row takes what is left,
# so it is exactly --optimized. Groups with nothing to add here (no CUTLASS library) are left out.
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("+exact host-side work", ("rope_table", "cond_cache", "pinned_memory", "copy_stream", "audio_stream")),
    ("+attention kernel, cuDNN search", ("attention", "cudnn_benchmark", "cudnn_search_limit", "audio_tf32")),
    ("+VAE layout", ("vae_channels_last", "vae_conv_pad", "vae_subpixel_upsample")),
    ("+compiled DiT, fused kernels", ("compile_dit", "fused_gelu", "persistent_norms", "rope_fp32", "fused_qk_rope",
                                      "compile_color")),
    ("+CUDA graphs (DiT)", ("cuda_graphs",)),
    ("+compiled VAE", ("compile_vae", "vae_conv_out_gemm", "vae_attention_gemm", "vae_static_shapes")),
    ("+CUTLASS convolutions, whole chunks", ("vae_cutlass_conv", "vae_whole_chunk", "vae_call_frames")),
    ("+CUDA graphs (VAE)", ("vae_cuda_graphs",)),
    ("+early first frames, the rest (all)", ()),
]  # fmt: skip


def grouped_ladder() -> list[tuple[str, dict, bool]]:
    """GROUPS as ladder rows, then the two approximate switches as side rows on top of everything."""
    from flashhead.pipeline.speed import SpeedConfig

    preset, plain = SpeedConfig.optimized().to_dict(), SpeedConfig().to_dict()
    left = {k: v for k, v in preset.items() if v != plain[k]}
    rows: list[tuple[str, dict, bool]] = [("plain", {}, False)]
    for i, (name, fields) in enumerate(GROUPS):
        group = {k: v for k, v in left.items() if k in fields or i == len(GROUPS) - 1}
        if group:
            rows.append((name, group, False))
            left = {k: v for k, v in left.items() if k not in group}
    return rows + [("all +decode_new_only", {"decode_new_only": True}, True), ("all +fp8", {"fp8": True}, True)]


STAGES = ("audio_features", "dit", "vae_decode", "color_correction", "vae_encode_motion")
PSNR_REQUIRED = 40.0


def psnr(a, b) -> float:
    import numpy as np

    n = min(len(a), len(b))
    mse = float(np.mean((a[:n].astype(np.float64) - b[:n].astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def emit(row: dict, sink: Path | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if sink is not None:
        with sink.open("a") as f:
            f.write(line + "\n")


def matmul_tflops() -> float:
    """Measured bf16 matrix-product rate (8192^3, random data, median of 10): the practical ceiling."""
    import torch

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12


def run_model(model: str, budget: float, seconds: float, sink: Path | None, streams: bool,
              rows_of: str = "switches") -> None:  # fmt: skip
    """The ladder for one model in this process (`rows_of`: "switches", a row per switch, or "groups")."""
    import numpy as np
    import torch

    from flashhead.benchmark import (
        BenchSettings,
        _speech,
        build_pipeline,
        dit_utilisation,
        environment,
        run_stream,
        timed_stream,
    )  # fmt: skip
    from flashhead.errors import ConfigError
    from flashhead.pipeline.speed import SpeedConfig, apply_process_settings
    from flashhead.pipeline.stream import StreamEngine
    from flashhead.pipeline.timing import NullTimer, StageTimer

    apply_process_settings(SpeedConfig.optimized())  # before any GEMM (see LADDER)
    began = time.perf_counter()
    cuda = torch.cuda.is_available()
    if os.environ.get("FLASHHEAD_MATRIX_SMOKE"):  # CPU smoke test of this script: the tiny fixture models
        from _tiny import tiny_pipeline

        pipe, weights = tiny_pipeline(model)[0], "tiny fixture"
    else:
        pipe, weights = build_pipeline(BenchSettings(model=model))
    built = round(time.perf_counter() - began, 1)
    emit({"model": model, "row": "environment", "weights": weights, "build_seconds": built,
          "matmul_tflops_measured": round(matmul_tflops(), 1) if cuda else None, **environment()}, sink)  # fmt: skip
    audio = _speech(os.environ.get("FLASHHEAD_BENCH_AUDIO"), seconds)  # default: ../shared/media speech WAV
    image = np.random.default_rng(0).integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)
    chunk = pipe.new_frames * pipe.config.sample_rate // pipe.config.fps
    speed = SpeedConfig()
    plain_frames = None
    for name, changes, sibling in grouped_ladder() if rows_of == "groups" else ladder():
        elapsed = time.perf_counter() - began
        # Compiling the Wan2.1 decoder (per-frame feature caches) can take minutes: only with time to spare.
        need = 120 if (model == "pro" and changes.get("compile_vae")) else 0
        if elapsed + need > budget:
            emit({"model": model, "row": name, "skipped": f"time budget: {elapsed:.0f} of {budget:.0f} s spent"
                  + (f", this row needs {need} s" if need else "")}, sink)  # fmt: skip
            continue
        try:
            config = speed.replace(**changes)
            if config.attention == "fa3":
                from flashhead.pipeline.fast_path import fa3_kernel

                fa3_kernel()  # ConfigError when FlashAttention-3 is not installed
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            pipe.optimize(config)
            engine = StreamEngine(pipe, max_sessions=64, max_batch=64)
            run_stream(engine, image, audio[: 2 * chunk])  # warm-up: first and later chunk shapes
            warmup = time.perf_counter() - t0
            first = min(run_stream(engine, image, audio[:chunk])[0] for _ in range(2 if model == "lite" else 1))
            frames, total, steady = timed_stream(engine, image, audio)
            pipe.timer = StageTimer()
            run_stream(engine, image, audio[: 2 * chunk])
            stages = {k: v["mean_ms"] for k, v in pipe.timer.summary().items()}
            pipe.timer = NullTimer()
            if plain_frames is None:
                plain_frames = frames
            quality = psnr(frames, plain_frames)
            dit_ms = stages.get("dit", 0.0) / pipe.config.num_inference_steps
            row = {
                "model": model, "row": name, "switches": config.to_dict(),
                # A chunk per period after the first (benchmark.steady_fps); stream: the whole stream's average.
                "steady_fps": round(steady, 2),
                "chunk_ms": round(1000 * pipe.new_frames / steady, 1),
                "stream_fps": round(len(frames) / total, 2),
                "time_to_first_frame_ms": round(1000 * first, 1),
                "stage_ms_per_chunk": stages, "dit_ms_per_step": round(dit_ms, 2),
                **dit_utilisation(pipe, dit_ms),
                "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                "warmup_seconds": round(warmup, 1),
                "psnr_vs_plain_db": None if math.isinf(quality) else round(quality, 2),
                "frames_identical_to_plain": bool(math.isinf(quality)),
                "output_kept": quality >= PSNR_REQUIRED,
                "frames": len(frames),
            }  # fmt: skip
            if name.endswith("(all)") and streams:
                from flashhead.benchmark import measure_streams

                row["streams"] = measure_streams(pipe, image, audio, chunk, -1, deadline=began + budget)
            emit(row, sink)
            if not sibling:
                speed = config
        except Exception as e:  # noqa: BLE001 - one broken switch must not cost the other rows
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            emit({"model": model, "row": name, "error": f"{type(e).__name__}: {first_line[:300]}"}, sink)
            pipe.timer = NullTimer()
            try:
                pipe.optimize(speed)
            except ConfigError as again:  # fp8 applied before failing: the rest of the ladder is moot
                emit({"model": model, "row": "abort", "error": str(again)}, sink)
                return


def cold_start(model: str, switches: dict) -> None:
    """In a fresh process: build, optimise (compile caches warm), first chunk; prints the wall clock at each step."""
    marks = {"python_started": time.time()}
    import numpy as np

    from flashhead.benchmark import BenchSettings, _speech, build_pipeline
    from flashhead.pipeline.speed import SpeedConfig
    from flashhead.pipeline.stream import StreamEngine

    marks["imports_done"] = time.time()

    if os.environ.get("FLASHHEAD_MATRIX_SMOKE"):
        from _tiny import tiny_pipeline

        pipe = tiny_pipeline(model)[0]
    else:
        pipe, _ = build_pipeline(BenchSettings(model=model))
    marks["model_built"] = time.time()
    profile_path = os.environ.get("FLASHHEAD_COLD_PROFILE")  # where this process writes its cProfile stats
    if profile_path:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    pipe.optimize(SpeedConfig.from_dict(switches))
    marks["optimized"] = time.time()
    engine = StreamEngine(pipe)
    image = np.random.default_rng(0).integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)
    session = engine.open_session(image, seed=0)
    session.push_audio(_speech(None, pipe.new_frames / pipe.config.fps))
    marks["session_opened"] = time.time()
    while not engine.step():
        pass
    marks["first_frame"] = time.time()
    print("COLD " + json.dumps(marks), flush=True)
    if profile_path:
        profiler.disable()
        profiler.dump_stats(profile_path)
        import torch._dynamo.utils

        print(torch._dynamo.utils.compile_times(repr="str"), file=sys.stderr)


def plot(rows: list[dict], path: Path, title: str | None = None) -> bool:
    """Stacked per-stage bars, a panel per model; `title` replaces the speed matrix's (benchmarks/plot_bench.py)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (run --plot-only on the JSON elsewhere)", file=sys.stderr)
        return False
    models = [m for m in ("lite", "pro") if any(r.get("model") == m and "stage_ms_per_chunk" in r for r in rows)]
    if not models:
        return False
    fig, axes = plt.subplots(1, len(models), figsize=(8 * len(models), 6), squeeze=False)
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#bbbbbb"]
    for ax, model in zip(axes[0], models, strict=True):
        measured = [r for r in rows if r.get("model") == model and "stage_ms_per_chunk" in r]
        names = [f"{r['row']}  ({r['steady_fps']:.0f} FPS)" for r in measured]
        left = [0.0] * len(measured)
        for stage, colour in zip((*STAGES, "other"), colours, strict=True):
            if stage == "other":
                values = [max(r["chunk_ms"] - sum(r["stage_ms_per_chunk"].values()), 0.0) for r in measured]
            else:
                values = [r["stage_ms_per_chunk"].get(stage, 0.0) for r in measured]
            ax.barh(names, values, left=left, color=colour, label=stage)
            left = [a + b for a, b in zip(left, values, strict=True)]
        ax.invert_yaxis()
        ax.set_xlabel("ms per chunk (stages timed with synchronisation;\n'other' from the steady run)")
        gpus = {r.get("gpu") for r in measured if r.get("gpu")}
        ax.set_title(f"{model}: {gpus.pop()}" if len(gpus) == 1 else model)
        ax.legend(loc="lower right", fontsize=8)
    gpu = next((r.get("gpu") for r in rows if r.get("row") == "environment"), "")
    fig.suptitle(title or f"flashhead speed matrix, one stream, 512x512, {gpu}")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return True


def spawn_cold_start(model: str, switches: dict, env: dict, left: float, label: str,
                     profile: Path | None = None) -> dict:  # fmt: skip
    """One cold start in a fresh process (`cold_start` above), given `left` seconds: its row, or why there is none.
    With `profile`, the process also writes its cProfile stats there and its import times (`-X importtime`) and
    Dynamo's compile times next to it (.stderr.txt): the profiler slows Python, so such a row is not a timing."""
    if left < 30:
        return {"model": model, "row": label, "skipped": f"{left:.0f} s of the run left"}
    spawn = time.time()
    cmd = [sys.executable, __file__, "--cold", model, "--cold-switches", json.dumps(switches)]
    if profile is not None:
        cmd[1:1] = ["-X", "importtime"]
        env = {**env, "FLASHHEAD_COLD_PROFILE": str(profile)}
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        return {"model": model, "row": label, "error": f"no first frame within {left:.0f} s"}
    if profile is not None:
        profile.with_suffix(".stderr.txt").write_text(proc.stderr)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("COLD ")), None)
    if line is None:
        return {"model": model, "row": label, "error": proc.stderr.strip().splitlines()[-1:]}
    marks = json.loads(line[5:])
    row = {"model": model, "row": label, "switches": switches,
           **{f"{k}_s": round(v - spawn, 1) for k, v in marks.items()}}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lite,pro")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "speed_matrix_out")))
    parser.add_argument("--budget", default="lite=170,pro=170", help="seconds per model before rows are skipped")
    parser.add_argument("--seconds", default="lite=5.76,pro=3.36", help="speech per measured stream (6 / 3 chunks)")
    parser.add_argument("--deadline", type=float, default=470, help="seconds for the whole run; cold starts fit in")
    parser.add_argument("--no-streams", action="store_true", help="skip the batched-streams search")
    parser.add_argument("--audio", help="16 kHz mono speech WAV (default: ../shared/media; else a synthetic voice)")
    parser.add_argument("--ladder", choices=["switches", "groups"], default="switches",
                        help="a row per switch, or the preset in ~10 themed steps (GROUPS; fits one device call)")
    parser.add_argument("--no-cold-start", action="store_true")
    parser.add_argument("--cold-only", action="store_true",
                        help="only the cold starts of --optimized: empty compile caches, then the caches it left")
    parser.add_argument("--cold-variants", nargs="*", default=[], metavar="SWITCHES",
                        help="with --cold-only, more warm-cache cold starts with these switches changed, e.g. "
                             "'cudnn_search_limit=0'; 'profile' for one under cProfile (stats in --out)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cold", help=argparse.SUPPRESS)
    parser.add_argument("--cold-switches", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--plot-only", type=Path, help="re-draw the PNG from a speed_matrix.json")
    args = parser.parse_args()
    budget = {k: float(v) for k, v in (p.split("=") for p in args.budget.split(","))}
    seconds = {k: float(v) for k, v in (p.split("=") for p in args.seconds.split(","))}

    if args.plot_only:
        rows = json.loads(args.plot_only.read_text())["rows"]
        plot(rows, args.plot_only.with_name("speed_stages.png"))
        return
    if args.cold:
        cold_start(args.cold, json.loads(args.cold_switches))
        return
    if args.child:
        run_model(args.child, budget[args.child], seconds[args.child], args.out / f"rows_{args.child}.jsonl",
                  not args.no_streams, args.ladder)  # fmt: skip
        return

    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/flashhead_inductor")  # kept between the processes
    env.setdefault("PYTHONUNBUFFERED", "1")
    if args.audio:
        env["FLASHHEAD_BENCH_AUDIO"] = str(Path(args.audio).resolve())
    root = Path(__file__).resolve().parents[1]
    paths = [str(root / "src"), str(root / "tests"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    started = time.time()
    rows: list[dict] = []
    for model in [] if args.cold_only else args.models.split(","):
        sink = args.out / f"rows_{model}.jsonl"
        sink.unlink(missing_ok=True)
        # The model's own budget, cut so that what is left of the run still fits (cold starts: ~40 s each).
        reserve = 0 if args.no_cold_start else 40 * len(args.models.split(","))
        own = min(budget[model], args.deadline - reserve - (time.time() - started))
        cmd = [sys.executable, __file__, "--child", model, "--out", str(args.out), "--budget", f"{model}={own:.0f}",
               "--seconds", args.seconds, "--ladder", args.ladder]  # fmt: skip
        cmd += ["--no-streams"] if args.no_streams else []
        try:  # a row that overruns (a long compile) is cut; the rows written so far are kept
            code = subprocess.run(cmd, env=env, timeout=max(own, 0) + 150).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        rows += [json.loads(line) for line in sink.read_text().splitlines()] if sink.exists() else []
        if code:
            rows.append({"model": model, "row": "process", "error": f"exit code {code}"})
    if args.cold_only:  # a fresh process with empty compile caches, then one with the caches the first left
        from flashhead.pipeline.speed import SpeedConfig

        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="flashhead_inductor_")
        env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="flashhead_triton_")
        # The CUTLASS convolutions' kept tile choices start empty too (the first process times them, the next reads).
        env["FLASHHEAD_CONV3D_CHOICES"] = os.path.join(tempfile.mkdtemp(prefix="flashhead_conv3d_"), "choices.json")
        switches = SpeedConfig.optimized().to_dict()
        for model in args.models.split(","):
            for label in ("cold_start (empty compile cache)", "cold_start"):
                rows.append(spawn_cold_start(model, switches, env, args.deadline - (time.time() - started), label))
            for variant in args.cold_variants:
                left = args.deadline - (time.time() - started)
                if variant == "profile":
                    profile = args.out / f"cold_{model}.pstats"
                    rows.append(spawn_cold_start(model, switches, env, left, "cold_start (profiled)", profile))
                else:
                    changed = SpeedConfig.parse(variant, base=SpeedConfig.from_dict(switches)).to_dict()
                    rows.append(spawn_cold_start(model, changed, env, left, f"cold_start {variant}"))
    elif not args.no_cold_start:
        for model in args.models.split(","):
            # The fastest configuration the ladder reached for this model (its compile artefacts are cached).
            kept = [r for r in rows if r.get("model") == model and "steady_fps" in r and "+" in r["row"][:1]]
            kept = [r for r in kept if not r["row"].startswith(("+attention=flash", "+attention=fa3"))]
            switches = kept[-1]["switches"] if kept else {}
            left = min(args.deadline - (time.time() - started), 150)
            rows.append(spawn_cold_start(model, switches, env, left, "cold_start"))
    result = {"total_seconds": round(time.time() - started, 1), "psnr_required_db": PSNR_REQUIRED, "rows": rows}
    tmp = args.out / "speed_matrix.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out / "speed_matrix.json")
    plot(rows, args.out / "speed_stages.png")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':5} {'row':24} {'FPS':>7} {'TTFF ms':>8} {'DiT ms/st':>9} {'MFU':>6} {'GiB':>6} "
          f"{'warm s':>7} {'PSNR':>6}")  # fmt: skip
    for r in rows:
        if "steady_fps" not in r:
            note = r.get("error") or r.get("skipped") or {k: v for k, v in r.items() if k.endswith("_s")}
            print(f"{r.get('model', ''):5} {r.get('row', ''):24} {note}")
            continue
        mfu = r.get("dit_mfu")
        print(f"{r['model']:5} {r['row']:24} {r['steady_fps']:7.1f} {r['time_to_first_frame_ms']:8.0f} "
              f"{r['dit_ms_per_step']:9.1f} {(mfu or 0) * 100:5.1f}% {r['peak_gpu_memory_gib'] or 0:6.1f} "
              f"{r['warmup_seconds']:7.1f} {r['psnr_vs_plain_db'] or 'same':>6}")  # fmt: skip


if __name__ == "__main__":
    main()
