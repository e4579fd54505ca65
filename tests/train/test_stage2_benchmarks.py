"""The Stage-2 scripts in benchmarks/ run end to end on tiny random networks (CPU path of each)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

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
    # the control (teacher weights, student's sampler) rolls out too; the table lists every model and the truth
    assert results["models"]["teacher_distilled_sampler"]["clips"][0]["frames"] == round(2.5 * 25)
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 5 and f"| {results['models']['student']['mse']:.5f} |" in table
    from safetensors.torch import load_file

    student = load_file(out / "student-dit-fp16" / "diffusion_pytorch_model.safetensors")
    exported = load_file(out / "run" / "export" / "dit" / "diffusion_pytorch_model.safetensors")
    assert student.keys() == exported.keys() and all(t.dtype == torch.float16 for t in student.values())
    assert all(torch.equal(student[k], exported[k].half()) for k in student)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the payload's eval clips need espeak-ng")
def test_device_payload_and_script_without_pyav(tmp_path):
    """distill_payload.py packs held-out clips, a training subset and the teacher; the device script trains the
    tiny teacher for 2 iterations and evaluates on a machine where `import av` fails, leaving the 8 promised files."""
    from flashhead.data.cli import plan_clips, synth_dataset
    from flashhead.data.shards import iter_clips, read_manifest

    plans = plan_clips(3, seed=5, kind="procedural", seconds=(3.0, 4.0), val_fraction=0.0)
    synth_dataset(tmp_path / "train", plans, size=128, progress=False)
    long_enough = read_manifest(tmp_path / "train").query("num_frames >= 89")["key"].tolist()
    device = tmp_path / "device" / "distill"
    _run(REPO / "benchmarks" / "distill_payload.py", "--train", tmp_path / "train", "--out", device,
         "--train-clips", len(long_enough), "--eval-clips", 1, "--seconds", 3, "--workers", 1,
         "--teacher", REPO / "src" / "flashhead" / "assets" / "flashhead-tiny")  # fmt: skip
    assert (device / "run.sh").read_bytes() == (REPO / "benchmarks" / "distill_device.sh").read_bytes()
    with tarfile.open(device / "data.tar.xz") as tar:
        tar.extractall(tmp_path / "data", filter="data")
    packed = {c.key: c.video for c in iter_clips(tmp_path / "data" / "train", decode=False)}
    original = {c.key: c.video for c in iter_clips(tmp_path / "train", decode=False)}
    assert sorted(packed) == sorted(long_enough) and all(packed[k] == original[k] for k in packed)  # not re-encoded
    assert list(read_manifest(tmp_path / "data" / "eval")["split"]) == ["val"]
    assert (tmp_path / "data" / "teacher" / "dit" / "diffusion_pytorch_model.safetensors").is_file()

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "RUN": str(tmp_path / "run"), "SKIP_WHEELS": "1", "EVAL_SECONDS": "3",
           "EVAL_CLIPS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests" / "train" / "noav")}
    proc = subprocess.run(["bash", str(device / "run.sh"), "--set", "distill.total_steps=2", "--set",
                           "data.micro_batch_size=1", "--set", "data.num_workers=0"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["log.txt", "metrics.jsonl", "results.json", "results.md", "results.png",
                     "student_dit.safetensors", "student_dit_config.json", "summary.json"]  # fmt: skip
    assert all((out / f).stat().st_size < 16e6 for f in files)
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and results["models"]["student"]["clips"][0]["frames"] == 75
    assert "== done" in (out / "log.txt").read_text()
    assert json.loads((out / "summary.json").read_text())  # the training run's own summary came along
