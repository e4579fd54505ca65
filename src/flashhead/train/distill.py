"""Oracle-guided bidirectional distillation (SPEC 9.2): the student's rollout and the three losses.

Conventions as everywhere (SPEC 5.3): x_sigma = (1 - sigma) x0 + sigma eps, the DiT predicts v = eps - x0,
x0_hat = x_sigma - sigma v. A chunk's first `n` latent frames are clean motion latents, pinned before every
model call; no loss looks at them.

One iteration, for a micro-batch of K-chunk windows:

    k ~ U{1..K}, exit ~ U{0..steps-1}            same on every process (FSDP collectives must match)
    chunks 1..k-1   the student's full 4-step sampling on its own history, no graph; the history goes
                    through decode -> colour correction -> encode of the last motion frames, as inference
    chunk k         the sampler up to step `exit`; only that step's model call keeps its graph; its x0
                    prediction (motion frames pinned) is the student's sample x0_s
    generator       (every critic_ratio-th iteration)
                    DMD: noise x0_s to sigma_d; the fake score sees the student's motion m_pred, the real
                    score (teacher, audio CFG) the ground-truth motion m_gt (the oracle);
                    g = (x0_fake - x0_real) / mean|x0_s - x0_real|, loss 0.5 ||x0_s - sg(x0_s - g)||^2
                    regression: ||x0_s - x0_gt||^2 against chunk k's ground-truth latents
    fake score      (every iteration) flow matching on sg(x0_s) with m_pred as motion context

All noise of a sample comes from a generator seeded by the sample's own seed, in a fixed order, so one
process with a micro-batch of B equals B processes with one sample each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from flashhead.pipeline.color import match_colors
from flashhead.pipeline.scheduler import FlashHeadScheduler, shift_timesteps
from flashhead.train.losses import _per_sample_mean, flow_matching_loss, new_frame_mask, sample_sigmas
from flashhead.train.rollout_data import RolloutInputs, RolloutSpec, encode_chunk_truth

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rollout_choice(seed: int, step: int, num_chunks: int, num_steps: int) -> tuple[int, int]:
    """(k, exit step) of an iteration: chunks rolled out (1..K) and the denoising step with the graph."""
    rng = np.random.default_rng([seed, step, 7])
    return int(rng.integers(1, num_chunks + 1)), int(rng.integers(num_steps))


def draw(generators: Sequence[torch.Generator], shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """One standard-normal tensor per sample from its own generator, stacked to (B, *shape)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(device)


def pin(x: torch.Tensor, motion: torch.Tensor, n: int) -> torch.Tensor:
    """x with its first n latent frames replaced by the clean motion latents (autograd-safe)."""
    return torch.cat([motion[:, :, :n].to(x.dtype), x[:, :, n:]], dim=2)


@dataclass
class Chunk:
    """What the student produced for one chunk."""

    x0: torch.Tensor  # (B, C, F, h, w) sample (or exit-step x0 prediction), motion frames pinned
    motion: torch.Tensor  # (B, C, n, h, w) the motion latents it was conditioned on
    n_motion: int


class Distiller:
    """The distillation computation, given the networks; optimisation lives in flashhead.train.stage2.

    Args:
        student: the generator as called with a graph (DDP wrapper, FSDP2 module or plain module).
        student_eval: the same weights, for calls without a graph (the unwrapped module under DDP).
        critic, critic_eval: the fake score, likewise.
        teacher: the frozen Stage-1 model (real score).
        vae: the frozen VAE (history round trip, ground-truth latents).
        spec: rollout geometry; cfg: the `distill` section; autocast: the mixed-precision context.
    """

    def __init__(self, student, student_eval, critic, critic_eval, teacher, vae, spec: RolloutSpec, cfg, autocast):
        self.student, self.student_eval = student, student_eval
        self.critic, self.critic_eval = critic, critic_eval
        self.teacher, self.vae, self.spec, self.cfg, self.autocast = teacher, vae, spec, cfg, autocast
        self.scheduler = FlashHeadScheduler(shift=cfg.shift)
        self.scheduler.set_timesteps(cfg.num_inference_steps)

    # -- the student's rollout ----------------------------------------------------------------------

    def _call(self, model: Model, x: torch.Tensor, sigma: torch.Tensor, context, y) -> torch.Tensor:
        with self.autocast:
            return model(x, sigma * 1000, context, y).float()

    def sample_chunk(
        self, inputs: RolloutInputs, j: int, motion: torch.Tensor, gens, exit_step: int | None = None, grad=False
    ) -> Chunk:
        """Chunk j by the student's sampler; with `exit_step` stop there and return that step's x0 prediction
        (with its graph when `grad`), otherwise the finished sample. Earlier steps never keep a graph."""
        n = motion.shape[2]
        shape = inputs.y.shape[1:]
        device = inputs.y.device
        x = draw(gens, shape, device)
        last = self.scheduler.num_steps - 1 if exit_step is None else exit_step
        context = inputs.contexts[:, j]
        for i in range(last + 1):
            x = pin(x, motion, n)
            sigma = self.scheduler.sigmas[i].to(device).expand(x.shape[0])
            keep = grad and i == last
            with torch.set_grad_enabled(keep):
                v = self._call(self.student if keep else self.student_eval, x, sigma, context, inputs.y)
                x0 = x - sigma.view(-1, 1, 1, 1, 1) * v
            if i == last:
                return Chunk(pin(x0, motion, n), motion, n)
            x = self.scheduler.renoise(x0, i, draw(gens, shape, device))
        raise AssertionError("unreachable")

    @torch.no_grad()
    def next_motion(self, inputs: RolloutInputs, latents: torch.Tensor, gens) -> torch.Tensor:
        """The next chunk's motion latents, as inference makes them: decode, colour-correct to the reference,
        encode the last motion frames (LTX posterior noise from each sample's generator)."""
        vae = self.vae
        video = vae.decode(latents.to(vae.dtype))
        if self.cfg.color_correction:
            video = match_colors(video, inputs.ref_image.to(video), 1.0)
        tail = video[:, :, -self.spec.chunk.motion_frames :]
        shape = vae.latent_shape(tail.shape[2], tail.shape[3], tail.shape[4])
        noise = draw(gens, shape, tail.device)  # drawn for any VAE, to keep the order of later draws fixed
        if getattr(vae, "sample_posterior", False):
            return vae.encode(tail, noise=noise.to(tail)).float()
        return vae.encode(tail).float()

    def rollout(self, inputs: RolloutInputs, k: int, exit_step: int, gens, grad: bool) -> Chunk:
        """Chunks 0..k-2 fully sampled on their own history (no graph), then chunk k-1 to `exit_step`."""
        motion = inputs.y[:, :, :1]  # cold start: the reference's own first latent frame
        for j in range(k - 1):
            with torch.no_grad():
                chunk = self.sample_chunk(inputs, j, motion, gens)
            motion = self.next_motion(inputs, chunk.x0, gens)[:, :, : self.cfg.motion_latent_frames]
        return self.sample_chunk(inputs, k - 1, motion, gens, exit_step, grad)

    # -- losses -------------------------------------------------------------------------------------

    def _sigmas(self, gens, lo: float, hi: float) -> torch.Tensor:
        u = torch.cat([lo + (hi - lo) * torch.rand(1, generator=g) for g in gens])
        return shift_timesteps(u * 1000, self.cfg.shift).float() / 1000

    def _real_velocity(self, x, sigma, context, y) -> torch.Tensor:
        g = self.cfg.guidance_scale
        if g == 1.0:
            return self._call(self.teacher, x, sigma, context, y)
        cond, uncond = self._call(
            self.teacher, torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([context, torch.zeros_like(context)]),
            torch.cat([y, y]),
        ).chunk(2)  # fmt: skip
        return uncond + g * (cond - uncond)

    def generator_losses(
        self, inputs: RolloutInputs, chunk: Chunk, truth: torch.Tensor, j: int, gens
    ) -> dict[str, torch.Tensor]:
        """Per-sample DMD and regression terms (B,) of the student's chunk-j sample (which carries a graph)."""
        x0, n = chunk.x0, chunk.n_motion
        B, dev = x0.shape[0], x0.device
        mask = new_frame_mask(torch.full((B,), n, device=dev), x0.shape[2])
        sigma = self._sigmas(gens, *self.cfg.dmd_sigma_range).to(dev)
        noise = draw(gens, x0.shape[1:], dev)
        gt_motion = truth[:, :, :n] if self.cfg.oracle and j > 0 else chunk.motion
        context = inputs.contexts[:, j]
        with torch.no_grad():
            s = sigma.view(-1, 1, 1, 1, 1)
            x_t = (1 - s) * x0.detach() + s * noise
            x_fake, x_real = pin(x_t, chunk.motion, n), pin(x_t, gt_motion, n)
            x0_fake = x_fake - s * self._call(self.critic_eval, x_fake, sigma, context, inputs.y)
            x0_real = x_real - s * self._real_velocity(x_real, sigma, context, inputs.y)
            normalizer = _per_sample_mean((x0.detach() - x0_real).abs(), mask).clamp_min(1e-6)
            grad = torch.nan_to_num((x0_fake - x0_real) / normalizer.view(-1, 1, 1, 1, 1))
        dmd = 0.5 * _per_sample_mean((x0 - (x0.detach() - grad)).square(), mask)
        regression = _per_sample_mean((x0 - truth).square(), mask)
        return {"dmd": dmd, "regression": regression, "dmd_grad": _per_sample_mean(grad.abs(), mask)}

    def critic_loss(self, inputs: RolloutInputs, chunk: Chunk, j: int, gens) -> torch.Tensor:
        """Per-sample flow-matching loss (B,) of the fake score on the student's (detached) chunk-j sample."""
        x0, n = chunk.x0.detach(), chunk.n_motion
        dev = x0.device
        sigma = sample_sigmas(list(gens), self.cfg.shift).to(dev)
        noise = draw(gens, x0.shape[1:], dev)
        s = sigma.view(-1, 1, 1, 1, 1)
        x_t = pin((1 - s) * x0 + s * noise, chunk.motion, n)
        v = self._call(self.critic, x_t, sigma, inputs.contexts[:, j], inputs.y)
        return flow_matching_loss(v, noise - x0, torch.full((x0.shape[0],), n, device=dev))

    def truth(self, inputs: RolloutInputs, j: int) -> torch.Tensor:
        return encode_chunk_truth(inputs, j, self.vae, self.spec).to(inputs.y.device)


def sample_generators(seeds: Sequence[int], step: int) -> list[torch.Generator]:
    """Each sample's noise stream for this iteration (a sample seen twice gets fresh noise each time)."""
    return [torch.Generator().manual_seed(int(np.random.default_rng([s, step]).integers(2**62))) for s in seeds]
