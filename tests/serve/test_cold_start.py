"""benchmarks/serve_cold_start.py end to end on the CPU: fresh `flashhead serve` processes of the tiny model, a real
WebSocket client, and a second start that is given the first one's compile artefacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from _util import REPO

SCRIPT = REPO / "benchmarks" / "serve_cold_start.py"


def run_benchmark(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def process_group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow  # two server processes that each compile (or load) on the CPU: ~90 s on 2 cores
def test_two_starts_reach_a_first_frame_and_the_second_uses_the_artefacts(tmp_path):
    out, png, work = tmp_path / "cold.json", tmp_path / "cold.png", tmp_path / "work"
    proc = run_benchmark("--model", "tiny", "--switches", "compile_color", "--max-batch", "1", "--seconds", 2,
                         "--work-dir", work, "--out", out, "--plot", png)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result == json.loads(out.read_text())
    assert result["serve_args"] == ["--switches", "compile_color", "--max-batch", "1"]
    assert result["environment"]["torch"] == torch.__version__ and result["environment"]["gpus"] == []
    first, second = result["runs"]
    for run in (first, second):
        assert run["frames"] == 2 * 25 and run["stream_done"], run  # all the speech came back as video
        assert 0 < run["server_warmup_s"] < run["spawn_to_warmed_s"] <= run["spawn_to_health_s"]
        assert run["spawn_to_health_s"] < run["spawn_to_first_frame_s"]
        # the server's load line: imports, then the model's load and its switches, before the warm-up
        assert run["model_load_s"] >= 0 and run["switches_s"] >= 0
        assert run["model_load_s"] + run["switches_s"] < run["spawn_to_loaded_s"] < run["spawn_to_warmed_s"]
        # the client's side in two parts: the session's opening, then the first chunk after the first audio
        assert run["start_to_ready_s"] > 0 and run["audio_to_first_frame_s"] > 0
        assert run["start_to_ready_s"] + run["audio_to_first_frame_s"] == pytest.approx(run["start_to_first_frame_s"],
                                                                                       abs=0.02)
        # The server's own first-chunk latency is a part of the client's wait, not more.
        assert 0 < run["server_first_chunk_latency_ms"] / 1000 <= run["audio_to_first_frame_s"]
        assert run["exit_code"] == 0 and process_group_gone(run["pid"])  # drained, nothing left behind
    # The first start compiles and saves; the second loads the file and compiles nothing (its Inductor cache
    # folder was empty, so every cached graph came from the file).
    assert first["compile_cache"] == "new" and first["inductor_graphs_compiled"] >= 1
    assert first["compile_cache_read_s"] is None and second["compile_cache_read_s"] >= 0
    assert second["compile_cache"] == "loaded" and second["inductor_graphs_compiled"] == 0
    # ... so the first writes the file and the second leaves it as it was; both warm-ups open their sessions
    assert first["compile_cache_save_s"] >= 0 and second["compile_cache_save_s"] is None
    assert 0 < first["warmup_sessions_open_s"] < first["server_warmup_s"]
    assert 0 < second["warmup_sessions_open_s"] < second["server_warmup_s"]
    assert second["inductor_graphs_cached"] >= first["inductor_graphs_compiled"]
    assert result["compile_cache_mb"] == round((work / "compile-cache.bin").stat().st_size / 2**20, 3) > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "[second] first frame after" in proc.stderr  # progress on stderr, JSON alone on stdout


def test_a_server_that_fails_to_start_is_reported_and_cleaned_up(tmp_path):
    proc = run_benchmark("--model", str(tmp_path / "no-such-model"), "--timeout", 120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (run,) = json.loads(proc.stdout)["runs"]  # no second start after a failed first
    assert "server exited with" in run["error"] and run["exit_code"] not in (0, None)
    assert process_group_gone(run["pid"])


def test_options_the_script_owns_are_refused():
    proc = run_benchmark("--model", "tiny", "--port", "8000")
    assert proc.returncode != 0 and proc.stderr.strip() == (
        "error: --port is set by this script (a free port, a fresh compile cache)"
    )
    proc = run_benchmark("--portrait", "/nonexistent.jpg")
    assert proc.returncode != 0 and "no portrait at /nonexistent.jpg" in proc.stderr


def test_the_servers_warm_up_line_is_read_with_and_without_gpu_memory():
    from _util import load_benchmark
    from flashhead.serve.cli import warmed_up_line

    bench = load_benchmark("serve_cold_start")
    cpu = bench.WARMED.search(warmed_up_line(2, {"total_seconds": 41.26}, "loaded /x.bin"))
    assert cpu.groups() == ("41.3", None, None, "loaded")
    gpu = bench.WARMED.search(warmed_up_line(1, {"total_seconds": 135.2, "gpu_memory_held_gib": 31.42}, "new /x.bin"))
    assert gpu.groups() == ("135.2", "31.4", None, "new")
    # warm_up's own result: the seconds spent opening its sessions (their portraits' encode) are part of the total
    line = warmed_up_line(2, {"total_seconds": 21.1, "open_seconds_by_batch": {1: 6.0, 2: 1.25},
                              "gpu_memory_held_gib": 39.1}, "loaded /x.bin in 0.2 s, saved 9 B in 3.5 s")  # fmt: skip
    assert bench.WARMED.search(line).groups() == ("21.1", "39.1", "7.2", "loaded")
    assert bench.CACHE_SAVE.search(line).group(1) == "3.5" and bench.CACHE_READ.search(line).group(1) == "0.2"
