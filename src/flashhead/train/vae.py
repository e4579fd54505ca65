"""Training a small video VAE (an LTX-Video-style `AutoencoderKLLTXVideo`) on clip shards.

flashhead-tiny needs a VAE that is small enough to ship and fast on a laptop CPU; the released ones are
neither (LTX 0.9.0 decodes at 32x spatial compression with 400 M parameters). This trains any
`AutoencoderKLLTXVideo` configuration from scratch on short windows (1 + k * stride frames) of the same
shards the DiT trains on:

    loss = L1 + ssim_weight * (1 - SSIM) + kl_weight * KL(posterior || N(0, I))

on pixels in [-1, 1], with random horizontal flips. At the end the per-channel mean and standard deviation
of the latents over the training data become the model's `latents_mean` / `latents_std`, so the DiT sees
unit-variance latents, and the model is written as a diffusers folder that `LTXVideoVAE.from_pretrained`
reads (the pipeline encodes to the posterior mean: `sample_posterior=False`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flashhead.atomic import atomic_path, make_folder
from flashhead.config_files import ConfigFile
from flashhead.errors import ConfigError

logger = logging.getLogger(__name__)

# A 4.1 M-parameter LTX-style VAE: 2x2 patchify, two spatio-temporal stages -> stride (4, 8, 8), 16 channels.
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [32, 64, 80],
    "decoder_block_out_channels": [32, 64, 80],
    "layers_per_block": [1, 1, 1, 1],
    "decoder_layers_per_block": [1, 1, 1, 1],
    "spatio_temporal_scaling": [True, True, False],
    "decoder_spatio_temporal_scaling": [True, True, False],
    "decoder_inject_noise": [False, False, False, False],
    "upsample_residual": [False, False, False],
    "upsample_factor": [1, 1, 1],
    "timestep_conditioning": False,
    "patch_size": 2,
    "patch_size_t": 1,
    "encoder_causal": True,
    "decoder_causal": False,
}


@dataclass
class VAETrainConfig(ConfigFile):
    model: dict[str, Any] = field(default_factory=lambda: dict(TINY_VAE_CONFIG))
    roots: list[str] = field(default_factory=list)  # shard folders
    split: str = "train"
    height: int = 128
    width: int = 128
    latent_windows: int = 3  # frames per sample = 1 + (latent_windows - 1) * temporal stride
    batch_size: int = 16
    num_workers: int = 2
    lr: float = 1e-3
    warmup_steps: int = 200
    total_steps: int = 4000
    min_lr_ratio: float = 0.05
    ssim_weight: float = 0.5
    kl_weight: float = 1e-6
    latent_noise: float = 0.05  # relative std of the noise added to the posterior mean before decoding
    precision: str = "fp32"  # "bf16": autocast on CUDA (faster, but a small VAE trains less stably in it)
    grad_clip: float = 1.0
    stats_batches: int = 16  # batches whose latents give latents_mean / latents_std
    log_interval: int = 50
    checkpoint_interval: int = 1000
    seed: int = 0
    output_dir: str = "runs/vae"
    max_minutes: float | None = None  # stop early (then finish normally) after this much training time


def build_vae_model(config: dict[str, Any]) -> Any:
    from diffusers import AutoencoderKLLTXVideo

    try:
        return AutoencoderKLLTXVideo(**config)
    except TypeError as e:
        raise ConfigError(f"vae model config: {e}") from None


class WindowDataset(IterableDataset):
    """Endless random windows (T, H, W, 3) uint8 from the clips of some shard folders."""

    def __init__(self, roots: list[str], split: str, frames: int, height: int, width: int, seed: int) -> None:
        from flashhead.data.shards import read_manifest

        self.refs = []
        for root in roots:
            manifest = read_manifest(root)
            rows = manifest[(manifest.split == split) & (manifest.num_frames >= frames)]
            self.refs += [(str(Path(root) / r.shard), int(r.offset), int(r.num_frames)) for r in rows.itertuples()]
        if not self.refs:
            raise ConfigError(f"no {split!r} clips of at least {frames} frames under {roots}")
        self.frames, self.height, self.width, self.seed = frames, height, width, seed

    def __iter__(self):
        from flashhead.train.data import decode_frames, read_clip_at, resize_center_crop

        info = get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info else 0])
        while True:
            shard, offset, n = self.refs[int(rng.integers(len(self.refs)))]
            clip = read_clip_at(shard, offset)
            start = int(rng.integers(0, n - self.frames + 1))
            frames = resize_center_crop(decode_frames(clip, range(start, start + self.frames)), self.height, self.width)
            if rng.random() < 0.5:
                frames = frames.flip(2)
            yield frames


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of two (N, C, H, W) images in [0, 1] (Gaussian window, the usual constants)."""
    coords = torch.arange(window, dtype=x.dtype, device=x.device) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum())[None, None]
    c = x.shape[1]

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.conv2d(t, g[..., None].expand(c, 1, window, 1), groups=c)
        return F.conv2d(t, g[:, :, None].expand(c, 1, 1, window), groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean()


def vae_losses(model: Any, video: torch.Tensor, cfg: VAETrainConfig) -> dict[str, torch.Tensor]:
    """video (B, 3, T, H, W) in [-1, 1] -> the loss terms of one step."""
    posterior = model.encode(video).latent_dist
    # The pipeline decodes posterior means; training on them (plus a little noise, so the decoder tolerates
    # the DiT's small latent errors) converges far faster than on unit-variance posterior samples.
    z = posterior.mean
    if cfg.latent_noise > 0:
        z = z + cfg.latent_noise * z.detach().std() * torch.randn_like(z)
    recon = model.decode(z).sample
    l1 = (recon - video).abs().mean()
    flat = lambda v: v.transpose(1, 2).flatten(0, 1).float().add(1).div(2)  # noqa: E731  (B*T, 3, H, W) in [0, 1]
    s = ssim(flat(recon).clamp(0, 1), flat(video))
    kl = posterior.kl().mean() / math.prod(posterior.mean.shape[1:])
    total = l1 + cfg.ssim_weight * (1 - s) + cfg.kl_weight * kl
    return {"loss": total, "l1": l1, "ssim": s, "kl": kl}


def train_vae(cfg: VAETrainConfig, resume: bool = False) -> Path:
    """Train; returns the folder of the final diffusers model (<output_dir>/vae)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = make_folder(cfg.output_dir, "output_dir")
    (out / "vae_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    model = build_vae_model(cfg.model).to(device).train()
    stride = model.temporal_compression_ratio
    frames = 1 + (cfg.latent_windows - 1) * stride
    if cfg.height % model.spatial_compression_ratio or cfg.width % model.spatial_compression_ratio:
        raise ConfigError(f"{cfg.height}x{cfg.width} is not a multiple of the VAE's {model.spatial_compression_ratio}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)

    def lr_factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    step, ckpt_path = 0, out / "checkpoint.pt"
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        logger.info("vae: resumed at step %d", step)
    dataset = WindowDataset(cfg.roots, cfg.split, frames, cfg.height, cfg.width, cfg.seed + step)
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, prefetch_factor=4 if cfg.num_workers else None
    )
    batches = iter(loader)
    on_gpu = device.type == "cuda"
    use_bf16 = on_gpu and cfg.precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    metrics = (out / "metrics.jsonl").open("a")
    t0 = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(total=cfg.total_steps, initial=step, desc="vae", unit="step", mininterval=5)
    while step < cfg.total_steps:
        video = next(batches).to(device).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1)  # (B, 3, T, H, W)
        with autocast:
            terms = vae_losses(model, video, cfg)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update()
        if step % cfg.log_interval == 0 or step == cfg.total_steps:
            point = {"step": step, **{k: float(v.detach()) for k, v in terms.items()}, "lr": scheduler.get_last_lr()[0]}
            metrics.write(json.dumps(point) + "\n")
            metrics.flush()
            bar.set_postfix(l1=f"{point['l1']:.4f}", ssim=f"{point['ssim']:.3f}")
        if step % cfg.checkpoint_interval == 0:
            _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "step": step}, ckpt_path)  # fmt: skip
        if cfg.max_minutes is not None and time.perf_counter() - t0 > cfg.max_minutes * 60:
            logger.info("vae: time budget reached at step %d", step)
            break
    bar.close()
    metrics.close()
    model.eval()
    with torch.no_grad():
        mean, std = latent_statistics(model, batches, cfg.stats_batches, device)
    del batches
    model.latents_mean.copy_(mean)
    model.latents_std.copy_(std)
    folder = out / "vae"
    tmp = out / "vae.tmp"
    model.save_pretrained(tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)
    logger.info("vae: %d steps; wrote %s", step, folder)
    return folder


def latent_statistics(model: Any, batches: Any, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the posterior means of `n` batches."""
    total = total_sq = count = 0
    for _ in range(n):
        video = next(batches).to(device).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1)
        mu = model.encode(video).latent_dist.mean.float()
        total = total + mu.sum((0, 2, 3, 4))
        total_sq = total_sq + mu.pow(2).sum((0, 2, 3, 4))
        count += mu.numel() // mu.shape[1]
    mean = total / count
    return mean.cpu(), (total_sq / count - mean**2).clamp(min=1e-8).sqrt().cpu()


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
