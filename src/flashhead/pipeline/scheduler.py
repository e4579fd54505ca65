"""Timesteps and update rules of FlashHead sampling (flow matching, shifted timesteps).

Convention: x_sigma = (1 - sigma) * x0 + sigma * noise, and the DiT predicts the velocity v = noise - x0.

Two samplers share the same shifted schedule:
- the distilled models (Lite, Pro, and our Stage-2 students) predict x0 = x - sigma * v and re-noise it to
  the next sigma with *fresh* noise ("x0-predict, re-noise"; 4 steps, no guidance);
- the Stage-1 teacher integrates the ODE with Euler steps (20 steps) and audio classifier-free guidance.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config


def shift_timesteps(timesteps: torch.Tensor, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """t' = T * shift * u / (1 + (shift - 1) * u), u = t / T: spends more steps at high noise."""
    u = timesteps / num_train_timesteps
    return num_train_timesteps * shift * u / (1 + (shift - 1) * u)


class FlashHeadScheduler(ConfigMixin):
    """Owns the timestep schedule and the per-step update; knows nothing about models.

    Example:
        sched = FlashHeadScheduler()            # shift 5, as the released models
        sched.set_timesteps(4)                  # timesteps [1000, 937.5, 833.33, 625], sigmas [..., 0]
        x0 = sched.predict_x0(x, v, i)
        x = sched.renoise(x0, i, noise)         # distilled models
        x = sched.euler_step(x, v, i)           # teacher
    """

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 5.0):
        self.timesteps = torch.empty(0)
        self.sigmas = torch.empty(0)

    def set_timesteps(self, num_inference_steps: int, dtype: torch.dtype = torch.float32) -> None:
        """Set `timesteps` (num_inference_steps values fed to the DiT) and `sigmas` (with a final 0).

        The released code uses evenly spaced base steps for 2 and 4 steps ([1000, 500], [1000, 750, 500,
        250]) and linspace(1000, 1, n) otherwise. `dtype` rounds sigmas as the update sees them (the
        official bf16 path uses bf16-rounded sigmas, e.g. 0.8333 -> 0.83203125).
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        T = self.config.num_train_timesteps
        if num_inference_steps in (2, 4):
            base = torch.arange(num_inference_steps, dtype=torch.float32) * (-T / num_inference_steps) + T
        else:
            base = torch.linspace(T, 1, num_inference_steps, dtype=torch.float32)
        shifted = shift_timesteps(torch.cat([base, torch.zeros(1)]), self.config.shift, T).float()
        self.timesteps = shifted[:-1]
        self.sigmas = (shifted / T).to(dtype)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def predict_x0(self, sample: torch.Tensor, velocity: torch.Tensor, step: int) -> torch.Tensor:
        return sample - self.sigmas[step].to(sample.dtype) * velocity

    def renoise(self, x0: torch.Tensor, step: int, noise: torch.Tensor) -> torch.Tensor:
        """Move x0 to the next step's noise level with fresh `noise` (at the last step this returns x0)."""
        s = self.sigmas[step + 1].to(x0.dtype)
        return (1 - s) * x0 + s * noise

    def step(self, velocity: torch.Tensor, step: int, sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One distilled step: x0 prediction, then re-noising to the next sigma."""
        return self.renoise(self.predict_x0(sample, velocity, step), step, noise)

    def euler_step(self, velocity: torch.Tensor, step: int, sample: torch.Tensor) -> torch.Tensor:
        """One Euler step of the flow ODE from sigma[step] to sigma[step + 1] (the undistilled teacher)."""
        dt = (self.sigmas[step] - self.sigmas[step + 1]).to(sample.dtype)
        return sample - dt * velocity

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Forward process x_sigma = (1 - sigma) x0 + sigma noise; sigma broadcasts from (B,)."""
        sigma = sigma.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
        return (1 - sigma) * x0 + sigma * noise
