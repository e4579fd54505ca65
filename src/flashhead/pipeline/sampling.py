"""The per-chunk denoising loop shared by offline generation, streaming and training rollouts."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from flashhead.pipeline.scheduler import FlashHeadScheduler

# A velocity model: (x, timestep (B,), context, y) -> velocity, as FlashHeadDiT.forward.
VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def denoise_chunk(
    model: VelocityModel,
    scheduler: FlashHeadScheduler,
    latents: torch.Tensor,
    motion_latents: torch.Tensor,
    ref_latents: torch.Tensor,
    audio_context: torch.Tensor,
    *,
    renoise: Sequence[torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    guidance_scale: float = 1.0,
    euler: bool = False,
    motion_lengths: Sequence[int] | None = None,
    guidance_steps: int | None = None,
) -> torch.Tensor:
    """Denoise one chunk of latents, keeping its first latent frames pinned to the clean motion latents.

    Args:
        model: the DiT (or any callable with its signature).
        scheduler: a scheduler after `set_timesteps`.
        latents: initial noise (B, C, F, H, W).
        motion_latents: clean latents (B, C, n_motion, H, W) written over the first frames before every
            model call and once after the loop (1 frame on a stream's first chunk, 2 afterwards).
        ref_latents: reference-image latents, same shape as `latents`.
        audio_context: windowed audio features (B, 33, window, layers, channels).
        renoise: one noise tensor per step for the re-noising of the distilled sampler (tests and
            reproducible streams inject these); otherwise drawn from `generator` in the official order.
        guidance_scale: audio classifier-free guidance (> 1 runs a second, audio-free branch with zeroed
            features in the same batch, as the official teacher path does).
        euler: integrate with Euler steps (undistilled Stage-1 teacher) instead of x0-predict + re-noise.
        motion_lengths: per sample, how many leading frames of `motion_latents` are real (a batch may mix
            streams on their first chunk, with one motion frame, and later chunks, with two).
        guidance_steps: guide only the first this many steps (None: all). The early, noisy steps decide
            the mouth shape; the later ones refine texture, where a second branch costs more than it gives.

    Returns:
        the denoised latents (B, C, F, H, W) with the motion frames written back.
    """
    x = latents.clone()
    B = x.shape[0]
    lengths = list(motion_lengths) if motion_lengths is not None else [motion_latents.shape[2]] * B

    def pin_motion(x: torch.Tensor) -> None:
        if len(set(lengths)) == 1:
            x[:, :, : lengths[0]] = motion_latents[:, :, : lengths[0]]
        else:
            for b, n in enumerate(lengths):
                x[b, :, :n] = motion_latents[b, :, :n]

    for i in range(scheduler.num_steps):
        pin_motion(x)
        t = scheduler.timesteps[i].to(x.device).expand(B)
        if guidance_scale != 1.0 and (guidance_steps is None or i < guidance_steps):
            v_cond, v_uncond = model(
                torch.cat([x, x]), torch.cat([t, t]),
                torch.cat([audio_context, torch.zeros_like(audio_context)]), torch.cat([ref_latents, ref_latents]),
            ).chunk(2)  # fmt: skip
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        else:
            v = model(x, t, audio_context, ref_latents)
        if euler:
            x = scheduler.euler_step(v, i, x)
        else:
            # Fresh noise is drawn at every step, also the last one (sigma 0), to keep the RNG stream
            # aligned with the official implementation.
            noise = renoise[i] if renoise is not None else None
            if noise is None:
                noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = scheduler.step(v, i, x, noise.to(x))
    pin_motion(x)
    return x
