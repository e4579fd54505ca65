"""Stage-1 objective: flow matching on the new latent frames, plus the face and temporal terms.

Convention (same as inference, SPEC 5.3): x_sigma = (1 - sigma) x0 + sigma eps, the DiT predicts the
velocity v = eps - x0, and the predicted clean latent is x0_hat = x_sigma - sigma v_hat.

The first `n_motion` latent frames of every sample are clean ground truth (the motion context); no term
below looks at the model's output on them. Every term is first reduced per sample (each normalised by its
own element count) and then averaged over the batch, so a global batch split across processes gives the
same loss and gradient as one process holding it whole.

The report's Figure 2 names a "Face Loss" and a "Temporal Loss" but never defines them (SPEC 13.1-8);
the definitions here are ours (docs/training.md explains the choice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flashhead.pipeline.scheduler import shift_timesteps


def sample_sigmas(
    generators: list[torch.Generator],
    shift: float = 5.0,
    kind: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """One noise level per sample, (B,) float32 in (0, 1].

    u is drawn uniformly on (0, 1] ("uniform") or as sigmoid(N(logit_mean, logit_std)) ("logit_normal"),
    then warped by the inference shift, sigma = shift u / (1 + (shift - 1) u). With "uniform" the training
    noise levels are distributed as the teacher's shifted sampling schedule (linspace then shift): most
    samples sit at high noise, where the motion and lip shape are decided.
    """
    if kind == "uniform":
        u = torch.cat([1 - torch.rand(1, generator=g) for g in generators])  # (0, 1]
    elif kind == "logit_normal":
        u = torch.sigmoid(torch.cat([torch.randn(1, generator=g) for g in generators]) * logit_std + logit_mean)
    else:
        raise ValueError(f"unknown timestep sampling {kind!r}")
    return shift_timesteps(u * 1000, shift).float() / 1000


@dataclass(frozen=True)
class NoiseSampling:
    """How a sample's noise level and noise come from its own seed (the loss section's fields), so that they
    depend on nothing but the seed: not on the batch layout, the process, the device or the data worker."""

    shift: float = 5.0
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    @classmethod
    def of(cls, loss: object) -> NoiseSampling:
        return cls(loss.shift, loss.timestep_sampling, loss.logit_mean, loss.logit_std)

    def draw(self, seeds: Sequence[int], shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma (B,), noise (B, *shape)) on the CPU, float32: per seed, sigma first, then the noise."""
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        sigma = sample_sigmas(generators, self.shift, self.timestep_sampling, self.logit_mean, self.logit_std)
        noise = torch.empty(len(seeds), *shape)
        for row, g in zip(noise, generators, strict=True):
            torch.randn(tuple(shape), generator=g, out=row)  # in place: no per-sample tensors to stack
        return sigma, noise


def new_frame_mask(n_motion: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, 1, F, 1, 1) float: 1 on latent frames f >= n_motion[b] (the frames the model must generate)."""
    frames = torch.arange(num_frames, device=n_motion.device)
    return (frames[None] >= n_motion[:, None]).float()[:, None, :, None, None]


def _per_sample_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # values (B, C, F, H, W), weights broadcastable to it: sum(w * v) / sum(w) over everything but B.
    weights = weights.expand_as(values)
    return (values * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp_min(1e-12)


def flow_matching_loss(v_pred: torch.Tensor, v_target: torch.Tensor, n_motion: torch.Tensor) -> torch.Tensor:
    """Flow-matching MSE on the new frames, per sample (B,).

    L_fm = mean over (c, f >= n_motion, h, w) of (v_hat - (eps - x0))^2. [PAPER] Eq. 1; restricting it to
    the new frames is ours (the motion frames are given, not generated).
    """
    mask = new_frame_mask(n_motion, v_pred.shape[2])
    return _per_sample_mean((v_pred.float() - v_target.float()).square(), mask)


def face_loss(
    v_pred: torch.Tensor, v_target: torch.Tensor, n_motion: torch.Tensor, face_mask: torch.Tensor
) -> torch.Tensor:
    """Face (mouth-region) loss: the flow-matching MSE averaged over the mouth region only, per sample (B,).

    L_face = sum_{c, f >= n_motion, h, w} m[f, h, w] (v_hat - v)^2 / (C sum_{f >= n_motion, h, w} m[f, h, w])

    `face_mask` (B, F, H, W) in [0, 1] is the fraction of each latent cell covered by the (enlarged) mouth
    box of the pixel frames that latent frame encodes (flashhead.train.data.latent_box_mask). Added to the
    plain loss it up-weights the few latent cells that carry lip sync, which the plain average over the
    whole frame dilutes (the mouth is ~5% of a 512x512 face crop). A sample with an empty mask gives 0.
    """
    weights = new_frame_mask(n_motion, v_pred.shape[2]) * face_mask[:, None].to(v_pred.device)
    has_region = weights.flatten(1).sum(1) > 0
    loss = _per_sample_mean((v_pred.float() - v_target.float()).square(), weights)
    return torch.where(has_region, loss, torch.zeros_like(loss))


def temporal_loss(x0_pred: torch.Tensor, x0: torch.Tensor, n_motion: torch.Tensor) -> torch.Tensor:
    """Temporal (motion-consistency) loss on predicted clean latents, per sample (B,).

    With x0_tilde = x0_hat on the new frames and the ground-truth x0 on the motion frames (they are pinned
    at inference), L_temp = mean over (c, h, w) and over f >= max(n_motion, 1) of
    ((x0_tilde[f] - x0_tilde[f-1]) - (x0[f] - x0[f-1]))^2.
    It asks the frame-to-frame change of the prediction to match the true change, including the step from
    the last motion frame into the first new one (the chunk seam). Since x0_hat - x0 = sigma (v - v_hat),
    this is a sigma^2-weighted loss on the temporal differences of the velocity error: it penalises
    jitter between neighbouring frames more than a constant offset, which the plain MSE cannot tell apart.
    """
    num_frames = x0.shape[2]
    motion = ~new_frame_mask(n_motion, num_frames).bool()
    x0_tilde = torch.where(motion, x0.float(), x0_pred.float())
    error = (x0_tilde.diff(dim=2) - x0.float().diff(dim=2)).square()  # (B, C, F-1, H, W): step f-1 -> f
    # difference f-1 -> f counts when frame f is new (f >= n_motion); index f-1 in `error`
    mask = new_frame_mask(n_motion, num_frames)[:, :, 1:]
    return _per_sample_mean(error, mask)


@dataclass
class LossTerms:
    """Per-sample terms (B,) and the weighted total; `.mean()` values are what gets logged."""

    flow: torch.Tensor
    face: torch.Tensor
    temporal: torch.Tensor
    total: torch.Tensor


def stage1_losses(
    v_pred: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigma: torch.Tensor,
    n_motion: torch.Tensor,
    face_mask: torch.Tensor,
    *,
    flow_weight: float = 1.0,
    face_weight: float = 0.0,
    temporal_weight: float = 0.0,
) -> LossTerms:
    """All Stage-1 terms from one forward pass (shapes (B, C, F, H, W); sigma, n_motion (B,))."""
    v_target = noise - x0
    x0_pred = x_t.float() - sigma.view(-1, 1, 1, 1, 1) * v_pred.float()
    flow = flow_matching_loss(v_pred, v_target, n_motion)
    face = face_loss(v_pred, v_target, n_motion, face_mask)
    temporal = temporal_loss(x0_pred, x0, n_motion)
    weighted = [(flow_weight, flow), (face_weight, face), (temporal_weight, temporal)]
    # A term with weight 0 is still computed (and logged, for ablations) but kept out of the graph.
    total = sum(w * (t if w else t.detach()) for w, t in weighted)
    return LossTerms(flow, face, temporal, total)


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, n_motion: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) x0 + sigma eps, with the first n_motion[b] latent frames left clean (motion)."""
    s = sigma.view(-1, 1, 1, 1, 1).to(x0.dtype)
    x_t = (1 - s) * x0 + s * noise
    motion = ~new_frame_mask(n_motion, x0.shape[2]).bool()
    return torch.where(motion, x0, x_t)
