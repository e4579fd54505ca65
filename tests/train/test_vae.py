"""The small-VAE trainer: it learns, writes a folder the pipeline loads, and normalises its latents."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from flashhead.models.vae import LTXVideoVAE
from flashhead.train.vae import TINY_VAE_CONFIG, VAETrainConfig, ssim, train_vae

SMALL = dict(TINY_VAE_CONFIG, block_out_channels=[8, 16, 16], decoder_block_out_channels=[8, 16, 16], latent_channels=8)


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((48, 48)).astype(np.float32)
    b = np.clip(a + 0.1 * rng.standard_normal((48, 48)), 0, 1).astype(np.float32)
    ours = ssim(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]).item()
    ref = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert abs(ours - ref) < 2e-3


def test_trains_and_writes_a_loadable_normalised_vae(dataset_dir, tmp_path):
    cfg = VAETrainConfig(
        model=SMALL, roots=[str(dataset_dir)], height=32, width=32, batch_size=2, num_workers=0, lr=2e-3,
        warmup_steps=1, total_steps=12, log_interval=1, stats_batches=2, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    folder = train_vae(cfg)
    points = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(points) == 12 and all(np.isfinite(p["loss"]) for p in points)
    assert np.mean([p["ssim"] for p in points[-3:]]) > np.mean([p["ssim"] for p in points[:3]]) + 0.05  # it learns
    vae = LTXVideoVAE.from_pretrained(folder, strict_config=False, sample_posterior=False)
    assert vae.stride == (4, 8, 8) and vae.latent_channels == 8
    assert not torch.allclose(vae.model.latents_std, torch.ones(8))  # data statistics, not the defaults
    video = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    latent = vae.encode(video)
    assert latent.shape == (1, 8, 3, 4, 4) and torch.equal(latent, vae.encode(video))  # deterministic mean
    assert vae.decode(latent).shape == video.shape


def test_cli_rejects_an_unknown_setting(tmp_path):
    config = tmp_path / "vae.yaml"
    config.write_text("roots: [nowhere]\nlearning_rate: 1.0\n")
    run = subprocess.run(
        [sys.executable, "-m", "flashhead.train", "vae", str(config)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0 and "learning_rate" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("steps", [1])
def test_recipe_is_packaged_and_valid(steps):
    from flashhead.train.config import Stage1Config
    from flashhead.train.tiny import load_recipe

    recipe = load_recipe(overrides=[f"stage1.optim.total_steps={steps}"])
    VAETrainConfig.from_dict(recipe["vae"])
    cfg = Stage1Config.from_dict(recipe["stage1"])
    assert cfg.optim.total_steps == steps and cfg.audio.kind == "mel" and cfg.vae.sample_posterior is False
    assert recipe["export"]["height"] == cfg.data.height == 128
