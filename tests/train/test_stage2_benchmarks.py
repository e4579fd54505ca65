"""The Stage-2 scripts in benchmarks/ run end to end on tiny random networks (CPU path of each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from train.helpers import REPO, SIZE
from train.test_stage2 import teacher_dir  # noqa: F401  (module-scoped fixture: a random tiny teacher folder)


def _run(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_memory_benchmark_cpu_path(tmp_path):
    out = tmp_path / "mem.json"
    _run(REPO / "benchmarks" / "stage2_memory.py", "--tiny", "--device", "cpu", "--size", SIZE, "--config",
         REPO / "configs" / "stage2_tiny_cpu.yaml", "--steps", 2, "--out", out)  # fmt: skip
    result = json.loads(out.read_text())
    assert [r["generator_step"] for r in result["iterations"]] == [True, False]
    assert all(r["finite"] for r in result["iterations"]) and result["peak_rss_gib"] > 0
    plan = result["plan_8_gpu_fsdp"]
    # 16 bytes per trained parameter (weights, grads, Adam) x 2 networks + EMA 4 + teacher 2, over 8 GPUs
    assert abs(plan["total state"] * 2**30 - result["parameters_per_network"] * 38 / 8) < 1e3


def test_distill_experiment_pipeline(dataset_dir, teacher_dir, tmp_path):  # noqa: F811
    out = tmp_path / "exp"
    _run(REPO / "benchmarks" / "distill_experiment.py", "--teacher", teacher_dir, "--data", dataset_dir, "--out", out,
         "--seconds", 2.5, "--eval-clips", 1, "--set", "distill.total_steps=2", "--set", "distill.num_chunks=2",
         "--set", "val.interval=0", "--set", "data.num_workers=0")  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.png").stat().st_size > 10_000
    assert (out / "run" / "export" / "model_index.json").is_file()
    truth = results["truth"]
    assert truth["clips"][0]["mse"] == 0 and truth["truth_mouth_corr"] > 0.3  # the mouth read-out sees the truth
    for name in ("student", "teacher_4step"):
        clip = results["models"][name]["clips"][0]
        assert clip["frames"] == round(2.5 * 25) and len(clip["mse_per_second"]) == 2 and clip["mse"] > 0
    assert set(results["verdict"]) == {"student_error_lower", "student_mouth_corr_at_least_as_high",
                                       "student_identity_flatter", "student_better_on_all"}  # fmt: skip
