"""The `flashhead` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from flashhead import __version__
from flashhead.errors import ConfigError, friendly_errors

app = typer.Typer(
    name="flashhead",
    help="Real-time, infinite-length, audio-driven talking-head video.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not verbose:
        quiet_third_party_logs()


def quiet_third_party_logs() -> None:
    """Keep the terminal for our own progress bar and messages: libraries' load bars and C++ logs off."""
    os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe / TFLite
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


@app.command()
def version() -> None:
    """Print the flashhead version."""
    print(__version__)


def _model_config(model: str) -> tuple[str, dict]:
    from flashhead.models.dit import official_config
    from flashhead.models.loading import read_json

    if model in ("lite", "pro"):
        return f"official {model.capitalize()} configuration", official_config(model)
    path = Path(model)
    if not path.exists():
        raise ConfigError(f"{model}: not 'lite', 'pro', or an existing checkpoint folder / config.json")
    config_path = path / "config.json" if path.is_dir() else path
    return str(config_path), read_json(config_path)


@app.command()
@friendly_errors
def info(
    model: Annotated[
        str, typer.Option("--model", "-m", help="lite, pro, or a checkpoint folder / config.json.")
    ] = "lite",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Describe a model: parameter counts by component and the token geometry of one 512x512 chunk."""
    import torch

    from flashhead.models import FlashHeadDiT

    source, config = _model_config(model)
    with torch.device("meta"):  # sizes only: nothing is allocated
        dit = FlashHeadDiT.from_config(config)
    cfg = dit.config

    def count(prefix: str = "") -> int:
        return sum(p.numel() for n, p in dit.named_parameters() if n.startswith(prefix))

    st, sh, sw = cfg.vae_stride
    pt, ph, pw = cfg.patch_size
    latent_frames = (33 - 1) // st + 1
    grid = (latent_frames // pt, 512 // sh // ph, 512 // sw // pw)
    report = {
        "source": source,
        "parameters": count(),
        "parameters_by_component": {
            "blocks": count("blocks."),
            "audio_proj": count("audio_proj."),
            "patch_embedding": count("patch_embedding."),
            "time_embedding+projection": count("time_embedding.") + count("time_projection."),
            "head": count("head."),
            "unused_in_forward (text_embedding, audio_emb)": count("text_embedding.") + count("audio_emb."),
        },
        "state_dict_keys": len(dit.state_dict()),
        "fp32_bytes": 4 * count(),
        "layers": cfg.num_layers,
        "width": cfg.dim,
        "heads": cfg.num_heads,
        "latent_channels": cfg.out_dim,
        "vae_stride": list(cfg.vae_stride),
        "patch_size": list(cfg.patch_size),
        "tokens_per_chunk_512": grid[0] * grid[1] * grid[2],
        "token_grid_512": list(grid),
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title=f"FlashHeadDiT — {source}", show_header=False)
    for key, value in report.items():
        if isinstance(value, dict):
            for k, v in value.items():
                table.add_row(f"  {k}", f"{v:,}")
        else:
            table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)


@app.command()
@friendly_errors
def kernels(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:
    """Which fast kernels this machine can use, and the switches `--optimized` turns on here."""
    import importlib.util

    import torch

    from flashhead.models.vae import cutlass_conv
    from flashhead.pipeline.speed import SpeedConfig

    gpu = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        gpu = {"name": torch.cuda.get_device_name(), "capability": f"sm_{major}{minor}"}
    optimized, plain = SpeedConfig.optimized().to_dict(), SpeedConfig().to_dict()
    report = {
        "gpu": gpu,
        "torch": torch.__version__,
        "flash_attention_3": {
            "installed": importlib.util.find_spec("flash_attn_interface") is not None,
            "used": optimized["attention"] == "fa3",
            "needs": "the flash_attn_interface package (benchmarks/build_fa3.py) and a Hopper GPU",
        },
        "cutlass_conv3d": {**cutlass_conv.library_status(), "used": optimized["vae_cutlass_conv"]},
        "optimized_switches": {k: v for k, v in optimized.items() if v != plain[k]},
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table(title="flashhead kernels", show_header=False)
    table.add_row("GPU", "none (CPU)" if gpu is None else f"{gpu['name']} ({gpu['capability']})")
    fa3 = report["flash_attention_3"]
    table.add_row("FlashAttention-3", f"{'installed' if fa3['installed'] else 'not installed'}; "
                  f"{'used by --optimized' if fa3['used'] else 'not used (needs ' + fa3['needs'] + ')'}")  # fmt: skip
    conv = report["cutlass_conv3d"]
    detail = f"{len(conv['tiles'])} tiles" if conv["state"] == "built" else conv["reason"]
    table.add_row("CUTLASS 3-D convolutions", f"{conv['state']} at {conv['path']} ({detail}); "
                  f"{'used' if conv['used'] else 'not used'} by --optimized")  # fmt: skip
    on = ", ".join(f"{k}={v}" if not isinstance(v, bool) else k for k, v in report["optimized_switches"].items())
    table.add_row("--optimized here", on)
    console.print(table)


DTYPES = {"auto": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@app.command()
@friendly_errors
def generate(
    image: Annotated[Path, typer.Option("--image", "-i", help="Portrait: PNG, JPEG, WebP; any size.")],
    audio: Annotated[Path, typer.Option("--audio", "-a", help="Speech: wav/mp3/m4a/flac/ogg or a video file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the MP4.")],
    model: Annotated[str, typer.Option("--model", "-m", help="auto, lite, pro, tiny, or a pipeline folder.")] = "auto",
    weights: Annotated[
        Path | None, typer.Option("--weights", help="Folder of the official release (SoulX-FlashHead-1_3B).")
    ] = None,
    wav2vec: Annotated[Path | None, typer.Option("--wav2vec", help="wav2vec2-base-960h folder.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Noise seed; the same seed gives the same video.")] = 42,
    steps: Annotated[int | None, typer.Option("--steps", help="Sampling steps (4 distilled; 20 teacher).")] = None,
    guidance: Annotated[
        float | None, typer.Option("--guidance", help="Audio classifier-free guidance (3.0 for a Stage-1 teacher).")
    ] = None,
    sampler: Annotated[str | None, typer.Option("--sampler", help="auto, distilled or euler.")] = None,
    audio_mode: Annotated[str | None, typer.Option("--audio-mode", help="stream (default) or once.")] = None,
    crop: Annotated[bool, typer.Option("--crop/--no-crop", help="Detect and crop the face (default on).")] = True,
    config: Annotated[Path | None, typer.Option("--config", help="YAML/JSON generation settings.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: best).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16.")] = "auto",
    crf: Annotated[int, typer.Option("--crf", help="H.264 quality (lower is better).")] = 18,
    video_encoder: Annotated[
        str,
        typer.Option(
            "--video-encoder", help="libx264 (CPU), h264_nvenc (the GPU's video encoder), auto (NVENC where it opens)."
        ),
    ] = "libx264",
    sp: Annotated[
        int | None,
        typer.Option("--sp", help="Sequence parallel over N GPUs (starts torchrun; under torchrun: its size)."),
    ] = None,
) -> None:
    """Generate a lip-synced talking-head MP4 from a portrait and speech."""
    import torch

    from flashhead.parallel import launch

    if sp is not None and sp > 1 and not launch.under_torchrun():
        raise typer.Exit(launch.relaunch(sp, device))
    group = launch.join(sp, device)  # under torchrun: fails fast on a size mismatch

    from flashhead.pipeline.config import GenerationConfig
    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline
    from flashhead.pipeline.registry import resolve_model_name

    if output.suffix.lower() != ".mp4":
        raise ConfigError(f"{output}: the output must be an .mp4 file")
    if not output.parent.is_dir():
        raise ConfigError(f"{output.parent}: output folder does not exist")
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}")
    from flashhead.media.video_io import resolve_encoder

    resolve_encoder(video_encoder)  # a missing or unknown encoder fails now, not after the generation
    settings = GenerationConfig.from_file(config) if config else None
    changes = dict(num_inference_steps=steps, guidance_scale=guidance, sampler=sampler, audio_mode=audio_mode)
    if any(v is not None for v in changes.values()):
        settings = (settings or GenerationConfig()).replace(**changes)

    # Check the inputs before spending time on loading models.
    from flashhead.media.audio_io import check_not_silent, load_audio
    from flashhead.media.face import prepare_portrait
    from flashhead.media.image import resize_and_center_crop

    waveform, _ = load_audio(audio)
    check_not_silent(waveform, 16000, source=audio)
    portrait = prepare_portrait(image, crop=crop, size=512)
    chosen = resolve_model_name(model, weights)
    if os.environ.get("RANK", "0") == "0":
        console.print(f"model: [bold]{chosen}[/bold]" + (" (auto)" if model == "auto" else ""), highlight=False)
    torch_dtype = getattr(torch, DTYPES[dtype]) if DTYPES[dtype] else None
    if group is not None:
        device = str(group.device)  # one GPU per rank
    pipe = FlashHeadPipeline.from_pretrained(
        chosen, weights=weights, wav2vec=wav2vec, device=device, torch_dtype=torch_dtype, config=settings
    )
    size = (pipe.config.height, pipe.config.width)
    if portrait.shape[:2] != size:  # a model with its own output size
        portrait = resize_and_center_crop(portrait, size)
    if group is not None:
        pipe.parallelize(group)
        if not group.is_leader:
            pipe.follow()  # the leader reads, writes and prints
            return
    try:
        result = pipe(portrait, waveform, sample_rate=pipe.config.sample_rate, seed=seed)
    finally:
        pipe.release_followers()
    result.metadata["source_image"] = image.name
    result.metadata["source_audio"] = audio.name
    result.save(output, crf=crf, encoder=video_encoder)
    console.print(
        f"wrote {output} ({len(result.frames)} frames, {result.duration:.2f} s, {pipe.name}, seed {seed})",
        highlight=False,
    )


@app.command()
@friendly_errors
def bench(
    model: Annotated[
        str, typer.Option("--model", "-m", help="lite or pro (full size), or tiny (the shipped small model).")
    ] = "lite",
    weights: Annotated[
        Path | None, typer.Option("--weights", help="Official release folder (else random weights).")
    ] = None,
    streams: Annotated[
        int, typer.Option("--streams", help="Also measure N batched streams; -1 searches the maximum.")
    ] = 0,
    seconds: Annotated[float, typer.Option("--seconds", help="Seconds of speech per stream.")] = 10.0,
    audio: Annotated[Path | None, typer.Option("--audio", help="16 kHz mono speech WAV.")] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="bfloat16 or float32 (default: bfloat16 on a GPU, else float32).")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="Device to measure (default: cuda where there is one, else cpu).")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the JSON report here.")] = None,
    switches: Annotated[
        str, typer.Option("--switches", help="Speed switches, e.g. compile_dit=on,attention=cudnn.")
    ] = "",
    optimized: Annotated[
        bool, typer.Option("--optimized", help="Start from every output-preserving switch on (--switches adjusts).")
    ] = False,
    trace: Annotated[
        Path | None, typer.Option("--trace", help="Also profile a 4-chunk stream; gzip'd Chrome trace here "
                                              "(with --streams N also one batched round: .streamsN.json.gz beside it).")
    ] = None,
) -> None:
    """Measure FPS, time to first frame, per-stage ms and streams per GPU; prints JSON."""
    from flashhead.benchmark import BenchSettings, main
    from flashhead.pipeline.registry import default_device_and_dtype
    from flashhead.pipeline.speed import SpeedConfig

    if model not in ("lite", "pro", "tiny"):
        raise ConfigError("--model must be lite, pro or tiny")
    resolved_device, default_dtype = default_device_and_dtype(device, None)  # the pipelines' own defaults
    device = device or resolved_device.type
    dtype = dtype or str(default_dtype).removeprefix("torch.")
    if not 0 < seconds <= 3600:
        raise ConfigError(f"--seconds must be more than 0 and at most 3600, got {seconds:g}")
    if streams < -1:
        raise ConfigError(f"--streams must be a number of streams, or -1 to search the most, got {streams}")
    for option, path in (("--json", json_path), ("--trace", trace)):  # before minutes of measuring, not after
        if path is not None and not path.absolute().parent.is_dir():
            raise ConfigError(f"{option}: the folder {path.parent} does not exist")
        if path is not None and path.is_dir():
            raise ConfigError(f"{option} {path}: a folder; give a file path, e.g. {path / 'bench.json'}")
    speed = SpeedConfig.parse(switches, base=SpeedConfig.optimized() if optimized else None)
    settings = BenchSettings(
        model=model, weights=str(weights) if weights else None, seconds=seconds, streams=streams,
        dtype=dtype, device=device, audio=str(audio) if audio else None, switches=speed.to_dict(),
        trace=str(trace) if trace else None,
    )  # fmt: skip
    main(settings, json_path)


@app.command()
@friendly_errors
def demo(
    host: Annotated[str, typer.Option("--host", help="Address to bind (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port.")] = 7860,
    weights: Annotated[Path | None, typer.Option("--weights", help="Official release folder.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda ...")] = None,
) -> None:
    r"""Open the Gradio page for offline generation (needs the `demo` extra: pip install 'flashhead\[demo]')."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ConfigError("the demo needs Gradio: pip install 'flashhead[demo]'") from None
    from flashhead.demo import launch

    launch(host=host, port=port, weights=str(weights) if weights else None, device=device)


@app.command()
def detect(
    video: Annotated[Path, typer.Argument(help="An MP4 (or any video) to check.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Say whether a video carries the flashhead watermark (exit 0 if it does, 1 if not)."""
    from flashhead.media.detect_cli import detect_command

    raise typer.Exit(detect_command(video, as_json))


def _missing_extra(extra: str, error: ImportError):
    """A stand-in command for one whose optional dependencies are not installed."""

    def command() -> None:
        print(f"error: this command needs the '{extra}' extra: pip install 'flashhead[{extra}]' "
              f"(missing: {error.name or error})", file=sys.stderr)  # fmt: skip
        raise typer.Exit(2)

    command.__doc__ = f"(not installed: pip install 'flashhead\\[{extra}]')"  # \\[: not a rich markup tag
    return command


def _register_subcommands() -> None:
    """Commands whose modules live with their subsystem (imported lazily only for their own options)."""
    from flashhead.data.cli import data_app
    from flashhead.eval.cli import eval_command
    from flashhead.train.cli import train_app

    try:
        from flashhead.serve.cli import serve_command
    except ImportError as e:  # the serve extra is optional: every other command must still work without it
        serve_command = _missing_extra("serve", e)

    app.command("eval", help="Score generated videos against ground truth (FID, FVD, Sync-C/D, CSIM, LMD, drift).")(
        friendly_errors(eval_command)
    )
    app.add_typer(data_app, name="data", help="Training data: synthetic talking heads, shards.")
    app.add_typer(train_app, name="train", help="Train: Stage 1 (pre-training), Stage 2 (distillation), export.")
    app.command("serve", help="Serve live avatars: WebRTC + WebSocket + HTTP jobs, and the browser page at /.")(
        friendly_errors(serve_command)
    )


_register_subcommands()

if __name__ == "__main__":
    app()
