from __future__ import annotations

import pytest
import torch

from flashhead.pipeline.scheduler import shift_timesteps
from flashhead.train.losses import (
    face_loss,
    flow_matching_loss,
    new_frame_mask,
    noisy_input,
    sample_sigmas,
    stage1_losses,
    temporal_loss,
)

B, C, F, H, W = 2, 3, 5, 4, 4


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_sigmas_are_uniform_u_warped_by_the_inference_shift():
    sigma = sample_sigmas(_gens(3), shift=5.0)
    u = torch.cat([1 - torch.rand(1, generator=g) for g in _gens(3)])
    torch.testing.assert_close(sigma, shift_timesteps(u * 1000, 5.0).float() / 1000)
    many = sample_sigmas(_gens(4000), shift=5.0)
    assert many.min() > 0 and many.max() <= 1
    # P(sigma > 0.5) = P(u > 1/6) = 5/6 with shift 5: most samples at high noise, as the teacher's schedule.
    assert abs((many > 0.5).float().mean().item() - 5 / 6) < 0.02
    ln = sample_sigmas(_gens(4000), shift=1.0, kind="logit_normal")
    assert abs(ln.median().item() - 0.5) < 0.03


def test_new_frame_mask():
    mask = new_frame_mask(torch.tensor([2, 1]), 5)
    assert mask.shape == (2, 1, 5, 1, 1)
    assert mask[:, 0, :, 0, 0].tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]]


def test_flow_matching_loss_is_the_mse_on_new_frames_only():
    target = torch.randn(B, C, F, H, W)
    pred = target.clone()
    pred[:, :, 2:] += 0.5  # error 0.5 on every new frame of sample 0 (n_motion 2)
    pred[:, :, :2] += 100.0  # huge error on motion frames: ignored
    loss = flow_matching_loss(pred, target, torch.tensor([2, 2]))
    torch.testing.assert_close(loss, torch.full((B,), 0.25))


def test_face_loss_averages_over_the_mouth_region():
    target = torch.zeros(B, C, F, H, W)
    pred = target.clone()
    pred[:, :, :, 1, 2] = 2.0  # error 2 in one latent cell
    pred[:, :, :, 0, 0] = 7.0  # error outside the region: ignored
    mask = torch.zeros(B, F, H, W)
    mask[0, :, 1, 2] = 1.0  # sample 0: exactly that cell
    mask[1, :, 1, 2:4] = 0.5  # sample 1: half of that cell and half of a clean one
    loss = face_loss(pred, target, torch.tensor([2, 1]), mask)
    torch.testing.assert_close(loss, torch.tensor([4.0, 2.0]))  # (0.5 * 4 + 0.5 * 0) / (0.5 + 0.5)
    assert face_loss(pred, target, torch.tensor([2, 1]), torch.zeros(B, F, H, W)).tolist() == [0.0, 0.0]


def test_temporal_loss_sees_jitter_and_the_seam_not_a_constant_offset():
    x0 = torch.randn(1, C, F, H, W)
    n_motion = torch.tensor([2])
    # A constant offset c on all new frames: only the seam (last motion frame -> first new) differs.
    c = 0.3
    pred = x0.clone()
    pred[:, :, 2:] += c
    torch.testing.assert_close(temporal_loss(pred, x0, n_motion), torch.tensor([c**2 / 3]))  # 1 of 3 steps
    # Alternating jitter +-c on new frames: steps 2->3 and 3->4 are off by 2c, the seam by c.
    jitter = x0.clone()
    jitter[:, :, 2] += c
    jitter[:, :, 3] -= c
    jitter[:, :, 4] += c
    torch.testing.assert_close(temporal_loss(jitter, x0, n_motion), torch.tensor([(c**2 + 2 * (2 * c) ** 2) / 3]))
    # The prediction on motion frames never enters (they are the pinned ground truth).
    garbage = pred.clone()
    garbage[:, :, :2] = 1e3
    assert torch.equal(temporal_loss(garbage, x0, n_motion), temporal_loss(pred, x0, n_motion))
    assert temporal_loss(x0 + 5.0, x0, torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-10)


def test_noisy_input_keeps_motion_frames_clean():
    x0, noise = torch.randn(B, C, F, H, W), torch.randn(B, C, F, H, W)
    sigma, n_motion = torch.tensor([0.7, 0.2]), torch.tensor([2, 1])
    x_t = noisy_input(x0, noise, sigma, n_motion)
    assert torch.equal(x_t[0, :, :2], x0[0, :, :2]) and torch.equal(x_t[1, :, :1], x0[1, :, :1])
    torch.testing.assert_close(x_t[0, :, 2:], 0.3 * x0[0, :, 2:] + 0.7 * noise[0, :, 2:])
    torch.testing.assert_close(x_t[1, :, 1:], 0.8 * x0[1, :, 1:] + 0.2 * noise[1, :, 1:])


def test_no_loss_term_depends_on_the_motion_frame_prediction():
    torch.manual_seed(0)
    x0, noise = torch.randn(B, C, F, H, W), torch.randn(B, C, F, H, W)
    sigma, n_motion = torch.tensor([0.9, 0.4]), torch.tensor([2, 1])
    face = torch.rand(B, F, H, W)
    x_t = noisy_input(x0, noise, sigma, n_motion)
    pred = torch.randn(B, C, F, H, W)
    changed = pred.clone()
    changed[0, :, :2] = torch.randn(C, 2, H, W) * 50
    changed[1, :, :1] = -17.0
    kw = {"flow_weight": 1.0, "face_weight": 0.5, "temporal_weight": 0.5}
    a = stage1_losses(pred, x_t, x0, noise, sigma, n_motion, face, **kw)
    b = stage1_losses(changed, x_t, x0, noise, sigma, n_motion, face, **kw)
    for name in ("flow", "face", "temporal", "total"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    # ... while changing a new frame does change it
    changed[0, :, 3] += 1
    assert not torch.equal(stage1_losses(changed, x_t, x0, noise, sigma, n_motion, face, **kw).total, a.total)


def test_weights_combine_terms_and_zero_weights_stay_out_of_the_graph():
    x0, noise = torch.randn(B, C, F, H, W), torch.randn(B, C, F, H, W)
    sigma, n_motion, face = torch.tensor([0.5, 0.5]), torch.tensor([2, 2]), torch.ones(B, F, H, W)
    pred = torch.randn(B, C, F, H, W, requires_grad=True)
    x_t = noisy_input(x0, noise, sigma, n_motion)
    t = stage1_losses(pred, x_t, x0, noise, sigma, n_motion, face, flow_weight=1.0, face_weight=2.0,
                      temporal_weight=0.0)  # fmt: skip
    torch.testing.assert_close(t.total, t.flow + 2 * t.face)
    assert t.temporal.abs().sum() > 0  # still computed for logging
    grad_total = torch.autograd.grad(t.total.sum(), pred, retain_graph=True)[0]
    grad_flow_face = torch.autograd.grad((t.flow + 2 * t.face).sum(), pred)[0]
    torch.testing.assert_close(grad_total, grad_flow_face)
