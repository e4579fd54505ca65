"""The distilled sampler and the teacher's Euler/CFG rule against the official numbers."""

from __future__ import annotations

import json

import pytest
import torch

from _util import FIXTURES, load_fixture, prefixed, rel_l2
from flashhead.models import FlashHeadDiT
from flashhead.models.dit import audio_config_from_official
from flashhead.pipeline.sampling import denoise_chunk
from flashhead.pipeline.scheduler import FlashHeadScheduler

SCHEDULES = json.loads((FIXTURES / "scheduler.json").read_text())["schedules"]


@pytest.mark.parametrize("steps", ["4", "2"])
def test_shifted_timesteps_and_sigmas_match_official(steps):
    official = SCHEDULES[steps]
    sched = FlashHeadScheduler()
    sched.set_timesteps(int(steps))
    assert sched.timesteps.tolist() == pytest.approx(official["timesteps_after_shift_fp32"][:-1], rel=1e-7)
    assert sched.sigmas.tolist() == pytest.approx(official["sigmas_fp32 (t/1000)"], rel=1e-7)
    sched.set_timesteps(int(steps), dtype=torch.bfloat16)
    assert sched.sigmas.float().tolist() == official["sigmas_bf16 (as applied in the update when param_dtype=bf16)"]
    seen = sched.timesteps.bfloat16().float().tolist()
    assert seen == official["timestep_seen_by_dit_when_bf16 (timestep.to(x.dtype) inside forward)"]


def test_other_step_counts_use_shifted_linspace():
    sched = FlashHeadScheduler(shift=5.0)
    sched.set_timesteps(20)
    base = torch.linspace(1000, 1, 20)
    u = base / 1000
    assert torch.allclose(sched.timesteps, 1000 * 5 * u / (1 + 4 * u))
    assert sched.sigmas[-1] == 0 and len(sched.sigmas) == 21
    with pytest.raises(ValueError):
        sched.set_timesteps(0)


def test_update_rule_matches_official_step_by_step():
    t, _ = load_fixture("scheduler_tiny")
    sched = FlashHeadScheduler()
    sched.set_timesteps(4)
    for i in range(4):
        assert sched.timesteps[i].item() == pytest.approx(t[f"step{i}/timestep"].item())
        x0 = sched.predict_x0(t[f"step{i}/model_input_x"], t[f"step{i}/model_output"], i)
        x_next = sched.step(t[f"step{i}/model_output"], i, t[f"step{i}/model_input_x"], t[f"step{i}/renoise"])
        assert rel_l2(x0, t[f"step{i}/x0"]) <= 1e-5
        assert rel_l2(x_next, t[f"step{i}/x_next"]) <= 1e-5


def lite_tiny_dit() -> FlashHeadDiT:
    w, meta = load_fixture("parity_dit_lite_tiny")
    cfg = dict(meta["config"]) | audio_config_from_official(meta["audio_proj_override"]["kwargs"], meta["config"])
    model = FlashHeadDiT.from_config(cfg).eval()
    model.load_state_dict(prefixed(w, "weights/"), strict=False)
    return model


@pytest.mark.parametrize("noise_source", ["injected", "generator"])
def test_whole_chunk_loop_matches_official(noise_source):
    t, _ = load_fixture("scheduler_tiny")
    model = lite_tiny_dit()
    sched = FlashHeadScheduler()
    sched.set_timesteps(4)
    kwargs = {}
    if noise_source == "injected":
        kwargs["renoise"] = [t[f"step{i}/renoise"][None] for i in range(4)]
        noise = t["initial_noise"][None]
    else:  # the official RNG order: initial noise, then one draw per step, from one CPU generator (seed 42)
        kwargs["generator"] = torch.Generator().manual_seed(42)
        noise = torch.randn(t["initial_noise"].shape, generator=kwargs["generator"])[None]
    seen = []

    def recording_model(x, timestep, context, y):
        seen.append(x.clone())
        return model(x, timestep, context, y)

    with torch.no_grad():
        out = denoise_chunk(
            recording_model,
            sched,
            noise,
            t["latent_motion_frames"][None],
            t["ref_latent"][None],
            t["context"],
            **kwargs,
        )
    for i in range(4):
        assert rel_l2(seen[i][0], t[f"step{i}/model_input_x"]) <= 1e-5
    assert rel_l2(out[0], t["final_latent"]) <= 1e-5
    assert torch.equal(out[0, :, :2], t["latent_motion_frames"])  # motion frames written back


def test_teacher_euler_with_audio_guidance():
    """20 Euler steps with audio CFG 3.0: v = v_uncond + 3 (v_cond - v_uncond), uncond = zeroed features."""
    t, _ = load_fixture("scheduler_tiny")
    model = lite_tiny_dit()
    sched = FlashHeadScheduler()
    sched.set_timesteps(20)
    x, motion, ref, ctx = t["initial_noise"][None], t["latent_motion_frames"][None], t["ref_latent"][None], t["context"]
    with torch.no_grad():
        out = denoise_chunk(model, sched, x, motion, ref, ctx, guidance_scale=3.0, euler=True)
        # The rule written out by hand, one sample at a time, as the official teacher path runs it.
        z = x.clone()
        for i in range(20):
            z[:, :, :2] = motion
            ti = sched.timesteps[i : i + 1]
            v_c = model(z, ti, ctx, ref)
            v_u = model(z, ti, torch.zeros_like(ctx), ref)
            z = z - (v_u + 3.0 * (v_c - v_u)) * (sched.timesteps[i] - (sched.timesteps[i + 1] if i < 19 else 0)) / 1000
        z[:, :, :2] = motion
    assert rel_l2(out, z) <= 1e-5
