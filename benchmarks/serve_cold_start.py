"""Serving cold start, end to end (issue 10): a fresh `flashhead serve` process -> /healthz OK -> the first video
frame at a real WebSocket client; then a second fresh process given the first one's compile artefacts.

Each start gets a fresh Inductor and Triton cache folder (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR), so the
first start compiles everything and anything the second start does not compile came from the `--compile-cache`
file the first one saved (what a new machine of the same GPU type would get). The client streams a real portrait
(face crop on, unless --no-crop) and a few seconds of real speech over /v1/stream, as fast as it can: the times
measure the server, not the pace of a speaker. Per start it records seconds from spawn to the server's "warmed up"
line (with the warm-up seconds, compile-cache state and Inductor graphs cached / compiled it prints), to /healthz
200, and to the first frame; then it stops the server with SIGTERM (drained) and times the exit. The process group
is killed in any case: no orphan compile workers. Progress on stderr; one JSON object on stdout (and --out).

Usage (GPU):  PYTHONPATH=src python benchmarks/serve_cold_start.py --model pro --optimized --device cuda
CPU check:    PYTHONPATH=src python benchmarks/serve_cold_start.py --model tiny --switches compile_color --max-batch 1
Every option this script does not know is passed to `flashhead serve` (--optimized, --switches, --device,
--max-batch, --weights, ...); the port, host and --compile-cache are the script's own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the WebSocket client the serve tests use (tests/serve/_serving.py)

TARGET_SECONDS = 60.0  # issue 10: a fresh server process serves its first frame within this
OWN_OPTIONS = ("--port", "-p", "--host", "--compile-cache")
# flashhead serve's warm-up line; on a GPU it also gives the memory held after the warm-up
WARMED = re.compile(
    r"warmed up batch sizes \S+ in ([\d.]+) s(?:, ([\d.]+) GiB of GPU memory held)? "
    r"\((?:sessions opened in ([\d.]+) s; )?compile cache: (\w+)"
)
GRAPHS = re.compile(r"Inductor graphs: (\d+) cached, (\d+) compiled")
# ... and its line once the model is loaded and its switches applied, and the compile cache's reading time
LOADED = re.compile(r"loaded in ([\d.]+) s, speed switches applied in ([\d.]+) s")
CACHE_READ = re.compile(r"compile cache: loaded \S+ in ([\d.]+) s")
CACHE_SAVE = re.compile(r"saved \d+ B in ([\d.]+) s")  # the file written after the warm-up (absent: unchanged)


class ServerLog:
    """Reads the server's output in a thread; every line with its time since spawn (for the phase marks)."""

    def __init__(self, process: subprocess.Popen, spawned: float, echo: bool):
        self.lines: list[tuple[float, str]] = []
        self.echo = echo
        self._thread = threading.Thread(target=self._read, args=(process, spawned), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen, spawned: float) -> None:
        for line in process.stdout:
            self.lines.append((time.monotonic() - spawned, line.rstrip("\n")))
            if self.echo or line.startswith("flashhead serve:"):
                print(f"    server | {line.rstrip()}", file=sys.stderr, flush=True)

    def first(self, pattern: re.Pattern) -> tuple[float, re.Match] | None:
        for t, line in list(self.lines):
            if match := pattern.search(line):
                return t, match
        return None

    def tail(self, n: int = 15) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def wait_for_health(process: subprocess.Popen, url: str, log: ServerLog, deadline: float) -> None:
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before /healthz answered:\n{log.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"server did not answer /healthz within --timeout:\n{log.tail()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # not listening yet, or 503 while it is not ready
        time.sleep(0.1)


def stop(process: subprocess.Popen, grace: float) -> tuple[float, int | None]:
    """SIGTERM to the server's process group (it drains, then exits); SIGKILL what is left after `grace`.
    Returns seconds to exit and the server's exit code (None: it had to be killed)."""
    began = time.monotonic()
    code = process.poll()
    if code is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            code = process.wait(grace)
        except subprocess.TimeoutExpired:
            code = None
    with contextlib.suppress(ProcessLookupError):  # compile workers die with the group, whatever the server did
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return round(time.monotonic() - began, 2), code


def one_start(label: str, cmd: list[str], env: dict, portrait: bytes, audio, args) -> dict:
    """Spawn the server, wait for /healthz, stream until the first frame (and the rest), stop it."""
    from serve._serving import free_port, stream_audio

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*cmd, "--port", str(port)]
    print(f"[{label}] spawning: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    spawned = time.monotonic()
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=REPO, start_new_session=True)  # fmt: skip
    log = ServerLog(process, spawned, args.verbose)
    record: dict = {"run": label, "pid": process.pid}  # also the process group, gone when this returns
    try:
        wait_for_health(process, url, log, spawned + args.timeout)
        record["spawn_to_health_s"] = round(time.monotonic() - spawned, 2)
        print(f"[{label}] /healthz OK after {record['spawn_to_health_s']:.1f} s; streaming", file=sys.stderr)
        start = {"portrait": base64.b64encode(portrait).decode(), "crop": not args.no_crop, "seed": 0,
                 "encoding": "jpeg"}  # fmt: skip
        sent = time.monotonic()
        left = max(spawned + args.timeout - sent, 1.0)
        result = asyncio.run(stream_audio(url.replace("http", "ws"), audio, start=start, realtime_factor=None,
                                          timeout=left))  # fmt: skip
        if result.errors or not result.frames or result.first_chunk is None:
            raise RuntimeError(f"stream failed: errors {result.errors}, {result.frames} frames:\n{log.tail()}")
        record["spawn_to_first_frame_s"] = round(result.first_chunk - spawned, 2)
        record["start_to_first_frame_s"] = round(result.first_chunk - sent, 2)  # face crop (unless off) + first chunk
        # ... in two: the session's opening (portrait decoded, cropped, encoded by the VAE) until the server's
        # `ready`, then the first chunk from the first audio sent (all of it at once: no speaker's pace)
        record["start_to_ready_s"] = round(result.first_send - sent, 3)
        record["audio_to_first_frame_s"] = round(result.first_chunk - result.first_send, 3)
        # ... of which the server's own account: its first chunk with frames from ready (its audio complete) to
        # handed to the socket; the rest is the audio's way in and the chunk's way out
        first = next((c for c in result.chunks if c["num_frames"]), None)
        record["server_first_chunk_latency_ms"] = first["latency_ms"] if first else None
        record["frames"] = result.frames
        record["stream_done"] = result.done is not None
        print(f"[{label}] first frame after {record['spawn_to_first_frame_s']:.1f} s ({result.frames} frames in "
              "all); stopping the server", file=sys.stderr, flush=True)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - reported in the JSON; the server is stopped below either way
        record["error"] = f"{type(e).__name__}: {e}"
        print(f"[{label}] failed: {record['error']}", file=sys.stderr, flush=True)
    finally:
        record["shutdown_s"], record["exit_code"] = stop(process, args.grace)
        log.join(10)
        if args.log_dir:
            (Path(args.log_dir) / f"server-{label}.log").write_text("\n".join(f"{t:8.2f} {s}" for t, s in log.lines))
    # The server's own account of its warm-up (absent with --no-warmup or without a speed switch).
    warmed, graphs, loaded, read = log.first(WARMED), log.first(GRAPHS), log.first(LOADED), log.first(CACHE_READ)
    save = log.first(CACHE_SAVE)
    record |= {
        # spawn -> the model in memory with its switches applied: the imports are what precedes the load
        "spawn_to_loaded_s": round(loaded[0], 2) if loaded else None,
        "model_load_s": float(loaded[1][1]) if loaded else None,
        "switches_s": float(loaded[1][2]) if loaded else None,
        "compile_cache_read_s": float(read[1][1]) if read else None,
        "spawn_to_warmed_s": round(warmed[0], 2) if warmed else None,
        "server_warmup_s": float(warmed[1][1]) if warmed else None,
        "gpu_memory_held_gib": float(warmed[1][2]) if warmed and warmed[1][2] else None,
        "warmup_sessions_open_s": float(warmed[1][3]) if warmed and warmed[1][3] else None,  # part of the warm-up
        "compile_cache_save_s": float(save[1][1]) if save else None,
        "compile_cache": warmed[1][4] if warmed else None,  # off, new or loaded
        "inductor_graphs_cached": int(graphs[1][1]) if graphs else None,
        "inductor_graphs_compiled": int(graphs[1][2]) if graphs else None,
    }
    return record


def environment() -> dict:
    gpus = []
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())
    return {"gpus": gpus, "cpu": cpu, "cpu_count": os.cpu_count(), "torch": importlib.metadata.version("torch"),
            "python": platform.python_version()}  # fmt: skip


def megabytes(path: Path) -> float:
    if path.is_file():
        return round(path.stat().st_size / 2**20, 3)
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 3) if path.is_dir() else 0.0


def plot(result: dict, path: Path) -> None:
    """One bar per start: imports, model load, speed switches, compile cache read, the warm-up (its sessions'
    opening apart), the compile cache's save, what else preceded the warmed line, until /healthz, until the first
    frame (a server without the load line: start + model load as one part)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flashhead.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.7 * len(result["runs"])))
    colours = {"start + model load": "#8172b3", "imports": "#937860", "model load": "#8172b3",
               "speed switches": "#64b5cd", "cache read": "#da8bc3", "warm-up: sessions opened": "#f0b27a",
               "warm-up: rounds": "#dd8452", "cache save": "#c44e52", "other": "#8c8c8c", "until /healthz": "#bbbbbb",
               "until first frame": "#55a868"}  # fmt: skip
    labelled: set[str] = set()
    for i, run in enumerate(result["runs"]):
        warmed = run["spawn_to_warmed_s"] or 0.0
        warmup = run["server_warmup_s"] or 0.0
        opened = run.get("warmup_sessions_open_s") or 0.0
        if run.get("spawn_to_loaded_s") is not None:
            loaded, load, switches = run["spawn_to_loaded_s"], run["model_load_s"], run["switches_s"]
            read, save = run.get("compile_cache_read_s") or 0.0, run.get("compile_cache_save_s") or 0.0
            parts = {"imports": loaded - load - switches, "model load": load, "speed switches": switches,
                     "cache read": read, "warm-up: sessions opened": opened, "warm-up: rounds": warmup - opened,
                     "cache save": save,
                     "other": max(warmed - loaded - read - warmup - save, 0.0) if warmed else 0.0}  # fmt: skip
        else:
            parts = {"start + model load": warmed - warmup, "warm-up: sessions opened": opened,
                     "warm-up: rounds": warmup - opened}  # fmt: skip
        parts |= {"until /healthz": run["spawn_to_health_s"] - sum(parts.values()),
                  "until first frame": run["spawn_to_first_frame_s"] - run["spawn_to_health_s"]}  # fmt: skip
        left = 0.0
        for name, seconds in parts.items():
            ax.barh(i, seconds, left=left, color=colours[name], label=None if name in labelled else name)
            labelled.add(name)
            left += seconds
        ax.text(left, i, f" {left:.1f} s", va="center")
    longest = max(r["spawn_to_first_frame_s"] for r in result["runs"])
    ax.set_xlim(0, max(longest, TARGET_SECONDS) * 1.12)  # room for the labels beside the bars
    ax.axvline(TARGET_SECONDS, color="#c44e52", linestyle="--", label=f"target {TARGET_SECONDS:.0f} s")
    ax.set_yticks(range(len(result["runs"])), [f"{r['run']} ({r['compile_cache']})" for r in result["runs"]])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the server process was spawned")
    device = ", ".join(result["environment"]["gpus"]) or "CPU"
    ax.set_title(f"flashhead serve cold start: {result['model']} {' '.join(result['serve_args'])} on {device}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def random_weights_folder(model: str, work: Path) -> Path:
    """The official `model` configuration with random weights, written once as a pipeline folder (bf16 files)."""
    import torch

    from flashhead.benchmark import BenchSettings, build_pipeline

    if model not in ("lite", "pro"):
        raise SystemExit(f"error: --random-weights is for lite or pro, not {model!r}")
    folder = work / f"random-{model}"
    if not (folder / "model_index.json").is_file():
        print(f"[cold-start] writing a random-weights {model} pipeline to {folder} (not timed)", file=sys.stderr)
        gpu = torch.cuda.is_available()  # built where it is quick; the server loads it afresh anyway
        settings = BenchSettings(model=model, device="cuda" if gpu else "cpu", dtype="bfloat16" if gpu else "float32")
        pipe, _ = build_pipeline(settings)
        pipe.save_pretrained(folder, weights_dtype=torch.bfloat16)
        del pipe
        if gpu:
            torch.cuda.empty_cache()
    return folder


def main(argv: list[str] | None = None) -> dict:
    # No abbreviations: `--port` must not be taken for `--portrait`, and every unknown option goes to the server.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="Other options are passed to `flashhead serve`.")  # fmt: skip
    parser.add_argument("--model", default="tiny", help="tiny, lite, pro (or a pipeline folder)")
    parser.add_argument("--portrait", type=Path, help="portrait image (default: a shared-media portrait)")
    parser.add_argument("--audio", type=Path, help="speech file (default: the shared 16 kHz speech)")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of speech streamed per start")
    parser.add_argument("--starts", type=int, default=2, help="fresh processes in a row sharing one compile cache")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per start, spawn to first frame")
    parser.add_argument("--grace", type=float, default=60, help="seconds the server gets to exit after SIGTERM")
    parser.add_argument("--work-dir", type=Path, help="compile cache + Inductor folders (default: a temp folder)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--plot", type=Path, help="PNG of the phases of each start")
    parser.add_argument("--log-dir", type=Path, help="write each server's output here")
    parser.add_argument("--verbose", action="store_true", help="echo every server line, not just its own")
    parser.add_argument("--no-crop", action="store_true",
                        help="send the portrait uncropped (the server resizes it): no face detector needed, e.g. on a "
                        "machine without MediaPipe")  # fmt: skip
    parser.add_argument("--random-weights", action="store_true",
                        help="lite / pro without the official release: save the official configuration with random "
                        "weights (bf16) as a pipeline folder first (not timed) and serve that folder")  # fmt: skip
    args, serve_args = parser.parse_known_args(argv)
    if clash := [a for a in serve_args if a.split("=")[0] in OWN_OPTIONS]:
        raise SystemExit(f"error: {clash[0]} is set by this script (a free port, a fresh compile cache)")
    if args.starts < 1 or args.seconds <= 0:
        raise SystemExit("error: --starts must be at least 1 and --seconds positive")

    from _util import MEDIA
    from serve._serving import speech

    portrait_path = args.portrait or MEDIA / "portraits" / "cc0_woman_dark_skin_frontal.jpg"
    if not portrait_path.is_file():
        raise SystemExit(f"error: no portrait at {portrait_path} (set FLASHHEAD_SHARED or pass --portrait)")
    if args.audio:
        from flashhead.errors import AudioError
        from flashhead.media.audio_io import load_audio

        try:
            audio = load_audio(args.audio)[0][: int(args.seconds * 16000)]
        except AudioError as e:
            raise SystemExit(f"error: {e}") from None
    elif not (MEDIA / "audio").is_dir():
        raise SystemExit(f"error: no shared media at {MEDIA} (set FLASHHEAD_SHARED or pass --audio)")
    else:
        audio = speech(args.seconds)
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="cold-start-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cache = work / "compile-cache.bin"
        cache.unlink(missing_ok=True)  # cold means cold, also in a --work-dir used before
        model = random_weights_folder(args.model, work) if args.random_weights else args.model
        cmd = [sys.executable, "-m", "flashhead.cli", "serve", "--model", str(model), "--compile-cache", str(cache),
               *serve_args]  # fmt: skip
        python_path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
        result = {"benchmark": "serve_cold_start", "model": args.model, "serve_args": serve_args,
                  "portrait": portrait_path.name, "crop": not args.no_crop,
                  "audio": args.audio.name if args.audio else "shared speech",
                  "audio_seconds": round(len(audio) / 16000, 2), "environment": environment(),
                  "target_s": TARGET_SECONDS, "runs": []}  # fmt: skip
        for i in range(args.starts):
            label = "first" if i == 0 else f"start{i + 1}" if args.starts > 2 else "second"
            run_dir = work / f"run{i + 1}"
            shutil.rmtree(run_dir, ignore_errors=True)
            env = {**os.environ, "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1",
                   "TORCHINDUCTOR_CACHE_DIR": str(run_dir / "inductor"),
                   "TRITON_CACHE_DIR": str(run_dir / "triton")}  # fmt: skip
            record = one_start(label, cmd, env, portrait_path.read_bytes(), audio, args)
            record["compile_cache_mb"] = megabytes(cache)
            record["inductor_cache_mb"] = megabytes(run_dir / "inductor") + megabytes(run_dir / "triton")
            result["runs"].append(record)
            if "error" in record:
                break  # a later start would measure the same failure
            record["within_target"] = record["spawn_to_first_frame_s"] <= TARGET_SECONDS
        result["compile_cache_mb"] = megabytes(cache)
    if args.plot and not any("error" in run for run in result["runs"]):
        plot(result, args.plot)
    if args.out:
        from flashhead.atomic import atomic_path

        with atomic_path(args.out) as tmp_out:
            tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    # SIGTERM (a job runner's stop) unwinds like Ctrl-C, through the finally that stops the server's process group.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    report = main()
    print(json.dumps(report), flush=True)
    sys.exit(1 if any("error" in run for run in report["runs"]) else 0)
