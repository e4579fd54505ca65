"""Training throughput metrics (MFU, tokens/s, memory), the synthetic talking-blob inputs, and
benchmarks/fsdp_train.py under 2 gloo processes (FSDP2 + activation checkpointing on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from flashhead.models.dit import FlashHeadDiT, official_config
from flashhead.train.config import Stage1Config, Stage2Config
from flashhead.train.data import SampleSpec
from flashhead.train.distill import rollout_choice
from flashhead.train.rollout_data import RolloutSpec
from flashhead.train.stage2 import assemble, chunk_spec, iteration, iteration_passes, trainable_copy
from flashhead.train.synthetic import TalkingBlobs
from flashhead.train.throughput import SampleCost, ThroughputMeter, loss_trend, sample_cost, summarize
from flashhead.train.trainer import DistInfo
from train.helpers import REPO, SIZE

BENCH = REPO / "benchmarks" / "fsdp_train.py"


def test_meter_mfu_hfu_and_tokens():
    meter = ThroughputMeter(torch.device("cpu"), world_size=2, peak=1e12)
    cost = SampleCost(tokens=100, forward_flops=1e9)
    for _ in range(3):  # 3 steps of 4 samples, forward + backward + a recomputed forward each
        meter.add(cost, forwards=4, backwards=4, recomputed=4)
    point = meter.report()
    elapsed = point["step_time_s"] * 3
    assert point["model_tflops_per_gpu"] * 1e12 * elapsed == pytest.approx(3 * 4 * 3e9)  # 3F per sample
    assert point["mfu"] == pytest.approx(point["model_tflops_per_gpu"] * 1e12 / 1e12)
    assert point["hfu"] / point["mfu"] == pytest.approx(4 / 3)  # the recomputed forward is not model work
    assert point["tokens_per_s"] * elapsed == pytest.approx(3 * 4 * 100 * 2)  # both processes' tokens
    assert point["memory"] is None  # CPU
    assert ThroughputMeter.for_device(torch.device("cpu")).report()["mfu"] is None


def test_lite_sample_cost_and_summaries():
    cost = sample_cost(official_config("lite"), (5, 16, 16))
    assert cost.tokens == 1280 and cost.forward_flops / 1e12 == pytest.approx(3.56, abs=0.01)  # docs/performance.md
    points = [{"step_time_s": t, "mfu": None, "memory": {"allocated_gib": [a, 2 * a], "reserved_gib": [a, a]}}
              for t, a in ((9.0, 5.0), (1.0, 1.0), (2.0, 1.5), (3.0, 0.5))]  # fmt: skip
    s = summarize(points)
    assert s["step_time_s"] == 2.0 and s["mfu"] is None  # the warm-up point is left out of the median
    assert s["peak_allocated_gib_per_gpu"] == [5.0, 10.0] and s["peak_reserved_gib_per_gpu"] == [5.0, 5.0]
    trend = loss_trend([3.0] * 20 + [2.0] * 20)
    assert trend["fell"] and trend["first_mean"] == 3.0 and trend["last_mean"] == 2.0


def test_talking_blobs_audio_predicts_the_mouth():
    spec = SampleSpec(height=512, width=512, vae_stride=(8, 32, 32), audio_drop_prob=0.0)
    blobs = TalkingBlobs(spec, official_config("lite"), seed=3)
    seeds = [blobs.sample_seed(0, 0, b) for b in range(12)]
    batch = blobs.stage1_inputs(seeds)
    assert batch.x0.shape == (12, 128, 5, 16, 16) and batch.context.shape == (12, 33, 5, 12, 768)
    again = blobs.stage1_inputs(seeds)
    assert torch.equal(batch.x0, again.x0) and torch.equal(batch.context, again.context)  # seeded
    # loudness read back from the audio context (centre of each frame's window) ...
    direction = blobs.audio_dirs[0].flatten()
    loud = batch.context[:, :, 2].flatten(2) @ direction / direction.square().sum()  # (B, 33) = 2 loud - 1
    per_latent = torch.stack([loud[:, :1].mean(1)] + [loud[:, 1 + 8 * j : 9 + 8 * j].mean(1) for j in range(4)], 1)
    # ... against the mouth opening in the latents: the mouth material's amount in the mouth region vs the reference
    mouth_dir = blobs.materials[0] - blobs.materials[1]
    opening = torch.einsum("bcfhw,c,bfhw->bf", batch.x0 - batch.y, mouth_dir, batch.face_mask)
    r = np.corrcoef(per_latent.flatten().numpy(), opening.flatten().numpy())[0, 1]
    assert r > 0.8, r


def test_iteration_passes_count_the_real_dit_calls():
    tiny = Stage1Config.from_file(REPO / "configs" / "stage1_tiny_cpu.yaml")
    cfg = Stage2Config.from_file(REPO / "configs" / "stage2_tiny_cpu.yaml",
                                 [f"data.height={SIZE}", f"data.width={SIZE}", "distill.num_chunks=2"])  # fmt: skip
    sys.path.insert(0, str(REPO / "benchmarks"))
    from stage2_memory import random_vae

    torch.manual_seed(0)
    teacher = FlashHeadDiT.from_config(tiny.model.config)
    student, critic = trainable_copy(teacher), trainable_copy(teacher)
    vae = random_vae("ltx", tiny.vae.config).requires_grad_(False)
    spec = RolloutSpec(chunk_spec(cfg, teacher, vae), cfg.distill.num_chunks)
    parts = assemble(cfg, DistInfo(), teacher, student, critic, vae, spec)
    calls = {"forwards": 0, "with_grad": 0}

    def count(module, args, output):
        calls["forwards"] += args[0].shape[0]  # samples in this call (the teacher's CFG batch counts twice)
        calls["with_grad"] += args[0].shape[0] * torch.is_grad_enabled()

    for net in (teacher, student, critic):
        net.register_forward_hook(count)
    blobs = TalkingBlobs(spec.chunk, tiny.model.config)
    inputs = blobs.rollout_inputs([1, 2], spec, vae, "cpu")
    step = next(s for s in range(50) if rollout_choice(cfg.seed, s, 2, 4)[0] == 2 and s % 5 == 0)
    for s in (step, step + 1):  # a generator iteration with a 2-chunk rollout, then a fake-score one
        calls.update(forwards=0, with_grad=0)
        out = iteration(parts, inputs, s, cfg)
        forwards, backwards = iteration_passes(out["k"], out["exit_step"], "dmd" in out, cfg.distill)
        assert calls == {"forwards": 2 * forwards, "with_grad": 2 * backwards}, (s, out["k"], out["exit_step"])


def _bench(*args, procs=2, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = [*launcher, str(BENCH), "--tiny", *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_fsdp_benchmark_stage1_two_processes(tmp_path):
    out = tmp_path / "stage1.json"
    _bench("--stage", 1, "--steps", 20, "--size", 128, "--micro-batch", 2, "--workers", 1, "--json", out)
    result = json.loads(out.read_text())
    s = result["summary"]
    assert result["parts"] == {"stage1_train": "ok"} and result["errors"] == []
    assert result["world_size"] == 2 and result["backend"] == "gloo"
    assert s["parallel"] == "fsdp" and s["gradient_checkpointing"] and s["global_batch"] == 4
    assert s["tokens_per_sample"] == 5 * 4 * 4 and s["mfu"] is None  # CPU: no peak, no MFU
    assert s["tokens_per_s"] == pytest.approx(80 * 4 / s["step_time_s"], rel=0.5)  # medians of the same steps
    losses = result["losses"]
    assert len(losses) == 20 and np.isfinite(losses).all()
    assert result["loss_trend"]["fell"], result["loss_trend"]  # the blobs are learnable
    lines = (tmp_path / "stage1-run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 20 and all(json.loads(line)["step_time_s"] > 0 for line in lines)


def test_fsdp_benchmark_stage2_one_process(tmp_path):
    """In this process (no launcher start-up): the same main() that torchrun starts once per GPU."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from fsdp_train import main

    out = tmp_path / "stage2.json"
    argv = ["--tiny", "--stage", "2", "--steps", "2", "--size", str(SIZE), "--set", "distill.num_chunks=2"]
    assert main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["errors"] == [] and result["parts"] == {"stage2_build": "ok", "stage2_iterations": "ok"}
    rows, distill = result["iterations"], Stage2Config.from_dict(result["config"]).distill
    assert [r["generator_step"] for r in rows] == [True, False]
    for r in rows:
        passes = iteration_passes(r["k"], r["exit_step"], r["generator_step"], distill)
        assert (r["dit_forwards"], r["dit_backwards"]) == passes
        assert np.isfinite(r["critic"]) and r["step_time_s"] > 0 and r["tokens_per_s"] > 0
    assert result["plan"]["total state"] * 2**30 == pytest.approx(result["parameters_per_network"] * 38)
    trend = result["summary"]["loss_trend"]
    assert trend["critic"]["first_mean"] == pytest.approx(rows[0]["critic"]) and trend["critic"]["finite"]
    assert trend["regression"]["last_mean"] == pytest.approx(rows[0]["regression"])  # generator steps only
    from plot_fsdp import main as plot

    plot([str(out), "--out", str(tmp_path / "curves.png")])
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG" and not list(tmp_path.glob("*.tmp*"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match="bad.json is not a readable fsdp_train.py result"):
        plot([str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad.png")])
    assert not (tmp_path / "bad.png").exists()
