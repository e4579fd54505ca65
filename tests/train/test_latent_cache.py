"""The latent cache: cached Stage-1 inputs equal the on-the-fly ones, training reads them, bad caches are refused."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from _util import load_benchmark
from flashhead.errors import ConfigError
from flashhead.train.data import (
    ClipRef,
    SampleChoice,
    SampleSpec,
    Stage1Dataset,
    build_sample,
    encode_samples,
    index_clips,
    read_clip,
)
from flashhead.train.latent_cache import CachedStage1Dataset, LatentCache, build_latent_cache, window_plan
from flashhead.train.losses import NoiseSampling, sample_sigmas
from flashhead.train.trainer import build_dit, build_frozen, compute_losses, resolve_dit_config, sample_spec, train
from train.helpers import tiny_config


@pytest.fixture(scope="module")
def cached(dataset_dir, tmp_path_factory):
    """The tiny CPU config with deterministic latents, its frozen encoders, spec and a cache of the train clips."""
    out = tmp_path_factory.mktemp("cache")
    cfg = tiny_config(dataset_dir, out / "run", "vae.sample_posterior=false")
    vae, encoder = build_frozen(cfg, 8)
    spec = sample_spec(cfg, resolve_dit_config(cfg), vae)
    folder = build_latent_cache([str(dataset_dir)], out / "cache", vae, encoder, spec, batch_size=3, progress=False)
    return cfg, vae, encoder, spec, folder


def test_window_plan_covers_both_ends_at_the_vae_stride():
    spec = SampleSpec(64, 64, (4, 8, 8))
    starts, refs = window_plan(70, spec, 4)
    assert starts == [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 37]
    assert refs[:3] == [0, 4, 8] and refs[-1] == 69
    assert set(starts) <= set(refs) and window_plan(32, spec, 4) == ([], [])


def test_cached_samples_equal_the_on_the_fly_inputs(cached):
    cfg, vae, encoder, spec, folder = cached
    cache = LatentCache(folder)
    cache.check(spec, vae, encoder)
    index = json.loads((folder / "cache.json").read_text())
    assert index["windows"] == len(np.load(folder / "latents.npy", mmap_mode="r"))
    dataset = CachedStage1Dataset(cache, spec, seed=3)
    refs = {c.key: c for c in index_clips(cfg.data.roots, "train", spec)}
    kinds = Counter()
    for p in range(300):
        s = dataset.sample_at(p)
        kinds[s["n_motion"]] += 1
        assert s["window_start"] % 4 == 0 or s["window_start"] == refs[s["key"]].num_frames - spec.frame_num
        if s["n_motion"] == 1:
            assert s["ref_frame"] == s["window_start"]  # a stream's first chunk: its own first frame
        else:
            assert not s["window_start"] <= s["ref_frame"] < s["window_start"] + spec.frame_num
        if p >= 8 and (s["n_motion"] == 2 or kinds[1] > 2):
            continue  # the encoders run on the first samples and on two cold starts
        choice = SampleChoice(s["window_start"], s["ref_frame"], s["n_motion"], s["drop_audio"], s["seed"])
        online = encode_samples([build_sample(read_clip(refs[s["key"]]), choice, spec)], vae, encoder, spec)
        pre = encode_samples([s], vae, encoder, spec)
        # float16 storage of the latents: relative rounding of 2^-11
        torch.testing.assert_close(pre.x0, online.x0, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(pre.y, online.y, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(pre.context, online.context, rtol=1e-4, atol=1e-5)  # float32 rounding across CPUs
        torch.testing.assert_close(pre.face_mask, online.face_mask, rtol=0, atol=1e-3)
    assert kinds[2] > 5 * kinds[1] > 0  # P(cold start) = 0.1


def test_cache_workers_hand_over_the_trainers_inputs_bit_for_bit(cached):
    """A worker's batch (stacked, audio windowed, noise drawn) is what the training process used to build from
    the samples itself: per sample, the streaming cache's windows and the sample's own noise generator."""
    cfg, vae, encoder, spec, folder = cached
    spec = replace(spec, audio_drop_prob=0.5)  # both kinds of context in a few batches
    dataset = CachedStage1Dataset(LatentCache(folder), spec, NoiseSampling.of(cfg.loss), seed=5, micro_batch_size=6)
    windowing, lo, dit = spec.context_cache(encoder), cfg.loss, build_dit(cfg)
    dropped = 0
    for step, batch in zip(range(3), DataLoader(dataset, batch_size=None, num_workers=1), strict=False):
        samples = dataset.micro_batch(step)
        contexts = [windowing.context(s["audio_features"]) for s in samples]
        contexts = [torch.zeros_like(c) if s["drop_audio"] else c for c, s in zip(contexts, samples, strict=True)]
        generators = [torch.Generator().manual_seed(s["seed"]) for s in samples]
        sigma = sample_sigmas(generators, lo.shift, lo.timestep_sampling, lo.logit_mean, lo.logit_std)
        noise = torch.stack([torch.randn(samples[0]["latents"].shape, generator=g) for g in generators])
        assert torch.equal(batch.x0, torch.stack([s["latents"] for s in samples]))
        assert torch.equal(batch.y, torch.stack([s["ref_latents"] for s in samples]))
        assert torch.equal(batch.context, torch.cat(contexts))
        assert torch.equal(batch.face_mask, torch.stack([s["face_mask"] for s in samples]))
        assert batch.n_motion.tolist() == [s["n_motion"] for s in samples]
        assert batch.seeds == [s["seed"] for s in samples]
        assert torch.equal(batch.sigma, sigma) and torch.equal(batch.noise, noise)
        dropped += sum(s["drop_audio"] for s in samples)
        # the trainer takes the worker's noise: the same losses as drawing it itself
        drawn = compute_losses(dit, replace(batch, sigma=None, noise=None), cfg, contextlib.nullcontext())
        given = compute_losses(dit, batch, cfg, contextlib.nullcontext())
        assert torch.equal(drawn.total, given.total)
    assert 0 < dropped < 18  # zero contexts and real ones


def test_step_profile_finds_no_per_sample_work_in_the_training_process(cached, tmp_path):
    """benchmarks/stage1_step_profile.py's split of a real profiled run: every phase is seen, and the data
    phase (a worker's ready batch to the device) costs the same few operators whatever the batch size."""
    from torch.profiler import ProfilerActivity, profile, schedule

    summarize = load_benchmark("stage1_step_profile")
    cfg, _, _, _, folder = cached
    data_ops, plan = [], schedule(wait=0, warmup=1, active=2, repeat=1)
    for batch in (2, 8):
        run = tiny_config(cfg.data.roots[0], tmp_path / f"b{batch}", "vae.sample_posterior=false", "data.num_workers=1",
                          f"data.cache={folder}", f"data.micro_batch_size={batch}", "optim.total_steps=3")  # fmt: skip
        with profile(activities=[ProfilerActivity.CPU], schedule=plan) as prof:
            train(run, on_step=lambda _: prof.step())  # noqa: B023 (called inside the loop's own iteration)
        result = summarize.summarize(list(prof.events()), 2)
        assert all(result["phases_ops"][p] > 0 for p in summarize.PHASES), result
        assert result["host_ms"] == pytest.approx(result["model_ms"] + result["outside_model_ms"], abs=0.01)
        assert result["ops"] == pytest.approx(sum(result["phases_ops"].values()), abs=8)
        data_ops.append(result["phases_ops"]["data"])
    assert data_ops[0] == data_ops[1] < 50, data_ops


def test_training_reads_the_cache_and_refuses_a_foreign_one(cached, tmp_path):
    cfg, vae, encoder, spec, folder = cached
    run = tiny_config(cfg.data.roots[0], tmp_path / "run", "vae.sample_posterior=false", f"data.cache={folder}",
                      "optim.total_steps=3")  # fmt: skip
    result = train(run)
    assert result.step == 3 and all(np.isfinite(h["loss"]) for h in result.history)
    assert f"cache: {folder}" in (tmp_path / "run" / "config.yaml").read_text()

    # a cache made with other encoder weights (here: posterior sampling switched on) is refused in one line
    other = tiny_config(cfg.data.roots[0], tmp_path / "run2", f"data.cache={folder}", "optim.total_steps=1")
    with pytest.raises(ConfigError, match="other VAE/audio weights"):
        train(other)
    with pytest.raises(ConfigError, match="not a latent cache"):
        LatentCache(tmp_path)


def test_source_weights_set_each_sources_share_of_the_samples():
    clips = [ClipRef("", 0, f"a{i}", 50, "many") for i in range(9)] + [ClipRef("", 0, "b", 50, "few")]
    spec = SampleSpec(64, 64, (4, 8, 8))
    dataset = Stage1Dataset(clips, spec, seed=1, windows_per_clip=100, source_weights={"many": 0.5, "few": 0.5})
    order = dataset._order(0)
    share = np.mean([clips[i].source == "few" for i in order])
    assert 0.45 < share < 0.55  # one clip of ten, drawn for half the samples
    assert np.array_equal(order, Stage1Dataset(clips, spec, seed=1, windows_per_clip=100,
                                               source_weights={"many": 0.5, "few": 0.5})._order(0))  # fmt: skip
    with pytest.raises(ConfigError, match="no weight for source"):
        Stage1Dataset(clips, spec, source_weights={"many": 1.0})
    # "*": every source not named, together
    probs = Stage1Dataset(clips, spec, source_weights={"many": 0.75, "*": 0.25}).clip_probs
    assert probs[-1] == pytest.approx(0.25) and probs[0] == pytest.approx(0.75 / 9)
