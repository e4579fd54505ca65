"""Synthetic clips and the tiny training configuration shared by the training tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from flashhead.data.shards import Clip
from flashhead.train.config import Stage1Config

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "configs" / "stage1_tiny_cpu.yaml"
SIZE = 64  # training and clip size of the tests (a 2 x 2 latent grid with the Lite-like tiny VAE)


def random_clip(key: str, seconds: float, seed: int, split: str = "train", size: int = SIZE) -> Clip:
    """A clip of smooth moving colours with a sine-and-noise 'voice' and a mouth box per frame."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * 25))
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    base = rng.uniform(40, 200, 3)
    frames = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        blob = 80 * np.exp(-((x - size / 2) ** 2 + (y - 0.7 * size - 3 * np.sin(i / 3)) ** 2) / 30.0)
        for c in range(3):
            frames[i, ..., c] = np.clip(base[c] + 0.5 * x + 0.3 * y * (c - 1) + blob, 0, 255)
    t = np.arange(int(seconds * 16000)) / 16000
    audio = 0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 2 * t) > 0) + 0.01 * rng.standard_normal(len(t))
    audio = (np.round(audio * 32768) / 32768).astype(np.float32)
    box = np.array([0.35, 0.6, 0.65, 0.8], np.float32) * size
    meta = {"split": split, "source": "test", "identity": key}
    return Clip(key, frames, audio, 16000, meta, {"mouth_box": np.tile(box, (n, 1))})


def synthetic_clip(key: str, seconds: float, seed: int, split: str = "train") -> Clip:
    """A procedural talking face (espeak-ng speech) when available, else `random_clip`."""
    try:
        from flashhead.data.synth_procedural import ProceduralConfig, generate_clip

        clip = generate_clip(key, seed, seed % 5, [seed, seed + 1], seconds, split=split,
                             config=ProceduralConfig(size=SIZE))  # fmt: skip
        clip.meta["split"] = split
        return clip
    except Exception:  # no espeak-ng (or the generator changed): the test data only needs to be plausible
        return random_clip(key, seconds, seed, split)


def tiny_config(dataset_dir: Path, out: Path, *overrides: str) -> Stage1Config:
    """configs/stage1_tiny_cpu.yaml at 64 x 64, batch 2, no workers, no validation, no export."""
    base = [
        f"data.roots=[{dataset_dir}]", f"data.height={SIZE}", f"data.width={SIZE}", "data.micro_batch_size=2",
        "data.num_workers=0", f"output_dir={out}", "val.interval=0", "export_at_end=false", "log.interval=1",
        "log.tensorboard=false", "log.checkpoint_interval=1000", "optim.warmup_steps=5", "optim.schedule=constant",
    ]  # fmt: skip
    return Stage1Config.from_file(TINY_CONFIG, base + list(overrides))


def torchrun_train(stage: str, config_file: Path, run_dir: Path, *args: str, timeout: float = 240) -> None:
    """`python -m flashhead.train <stage>` in 2 gloo processes under torchrun; asserts it exits 0.

    One retry from an empty `run_dir`: on this shared 2-core machine a 2-process gloo run has (rarely) finished
    every step and then hung or aborted in its teardown (sessions 14, 15: "terminate called without an active
    exception", or no exit within the timeout). A real error fails both attempts; the first one's stderr is printed.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "flashhead.train", stage, str(config_file), *args]  # fmt: skip
    for attempt in (1, 2):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # fmt: skip
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
            _, stderr = proc.communicate()
            stderr += f"\n(no exit within {timeout:.0f} s)"
        if proc.returncode == 0:
            return
        print(f"torchrun attempt {attempt} failed (exit {proc.returncode}):\n{stderr[-4000:]}")
        shutil.rmtree(run_dir, ignore_errors=True)
    raise AssertionError(stderr[-3000:])
