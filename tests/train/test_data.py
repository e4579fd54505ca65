from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from flashhead.train.data import (
    SampleSpec,
    Stage1Dataset,
    build_sample,
    choose_sample,
    encode_samples,
    index_clips,
    latent_box_mask,
    mouth_boxes,
    precompute_extras,
    resize_center_crop,
)
from flashhead.train.trainer import build_frozen, resolve_dit_config
from train.helpers import SIZE, random_clip, tiny_config

LITE_SPEC = SampleSpec(height=SIZE, width=SIZE, vae_stride=(8, 32, 32))


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """The tiny config's random LTX-like VAE and wav2vec (CPU, float32)."""
    cfg = tiny_config(tmp_path_factory.mktemp("unused"), tmp_path_factory.mktemp("run"))
    return build_frozen(cfg, resolve_dit_config(cfg)["vae_stride"][0])


def test_motion_audio_drop_and_reference_frequencies():
    rng = np.random.default_rng(0)
    choices = [choose_sample(rng, 120, LITE_SPEC) for _ in range(4000)]
    two = np.array([c.n_motion == 2 for c in choices])
    assert set(c.n_motion for c in choices) == {1, 2}
    assert abs(two.mean() - 0.9) < 0.015  # [PAPER] 0.9 / 0.1
    assert abs(np.mean([c.drop_audio for c in choices]) - 0.1) < 0.015
    for c in choices:
        assert 0 <= c.window_start <= 120 - 33
        inside = c.window_start <= c.ref_frame < c.window_start + 33
        # cold start: the window's first frame (= its single motion frame); otherwise a frame outside
        assert (c.ref_frame == c.window_start) if c.n_motion == 1 else not inside
    # a clip exactly one window long has no frame outside: the window's first frame
    assert {choose_sample(rng, 33, LITE_SPEC).ref_frame for _ in range(50)} == {0}
    first = replace(LITE_SPEC, reference="window_first")
    assert all(c.ref_frame == c.window_start for c in (choose_sample(rng, 120, first) for _ in range(200)))


@pytest.mark.parametrize("chunk", [1, 3, 9])  # left-padded buffer (chunks 1, 3) and a full 8-s buffer (9)
def test_training_audio_context_is_the_streaming_cache_context(frozen, chunk):
    vae, encoder = frozen
    clip = random_clip("long", seconds=10.5, seed=3)
    cache = LITE_SPEC.context_cache(encoder)
    new = cache.new_frames  # 24 for the Lite geometry
    slices = [clip.audio[i * cache.slice_samples : (i + 1) * cache.slice_samples] for i in range(chunk + 1)]
    for piece in slices[:-1]:
        cache.append(piece)
    expected = cache.push(slices[-1])  # the context inference computes for chunk `chunk`
    # that chunk's 33 frames end where its audio ends: frames [(chunk + 1) * new - 33, (chunk + 1) * new)
    start = (chunk + 1) * new - 33
    choice = choose_sample(np.random.default_rng(0), len(clip.frames), LITE_SPEC)
    choice = replace(choice, window_start=start, drop_audio=False)
    inputs = encode_samples([build_sample(clip, choice, LITE_SPEC)], vae, encoder, LITE_SPEC)
    assert inputs.context.shape == (1, 33, 5, 3, 16)
    assert torch.equal(inputs.context, expected)
    dropped = encode_samples([build_sample(clip, replace(choice, drop_audio=True), LITE_SPEC)], vae, encoder, LITE_SPEC)
    assert torch.equal(dropped.context, torch.zeros_like(expected))


def test_precomputed_extras_give_the_same_inputs(frozen):
    vae, encoder = frozen
    vae.sample_posterior = False  # deterministic latents on both paths
    try:
        clip = random_clip("pre", seconds=4.0, seed=5)
        extras = precompute_extras(clip, vae, encoder, LITE_SPEC, window_starts=[10, 40], ref_frames=[2, 90],
                                   dtype=np.float32)  # fmt: skip
        choice = replace(choose_sample(np.random.default_rng(1), len(clip.frames), LITE_SPEC),
                         window_start=40, ref_frame=2, n_motion=2, drop_audio=False)  # fmt: skip
        online = encode_samples([build_sample(clip, choice, LITE_SPEC)], vae, encoder, LITE_SPEC)
        clip.extras.update(extras)
        pre_choice = replace(choice, window_slot=1, ref_slot=0)
        sample = build_sample(clip, pre_choice, LITE_SPEC)
        assert "video" not in sample and "reference" not in sample and "audio" not in sample
        pre = encode_samples([sample], vae, encoder, LITE_SPEC)
    finally:
        vae.sample_posterior = True
    torch.testing.assert_close(pre.x0, online.x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(pre.y, online.y, rtol=0, atol=1e-6)
    assert torch.equal(pre.context, online.context)
    # with precomputed windows the sampler picks among them
    rng = np.random.default_rng(2)
    assert {choose_sample(rng, 100, LITE_SPEC, [10, 40]).window_start for _ in range(50)} == {10, 40}


def test_mouth_box_follows_resize_and_crop_and_becomes_a_latent_mask():
    clip = random_clip("box", seconds=1.4, seed=0, size=128)
    clip.extras["mouth_box"][:] = [40, 72, 88, 100]  # source pixels
    spec = replace(LITE_SPEC, face_margin=0.0)
    boxes = mouth_boxes(clip, list(range(33)), spec)
    np.testing.assert_allclose(boxes[0], [20, 36, 44, 50])  # 128 -> 64: halved
    grown = mouth_boxes(clip, [0], replace(spec, face_margin=0.25))[0]
    np.testing.assert_allclose(grown, [14, 32.5, 50, 53.5])
    mask = latent_box_mask(boxes, spec)  # 2 x 2 cells of 32 pixels
    assert mask.shape == (5, 2, 2)
    # x covers [20, 44): 12/32 of cell 0, 12/32 of cell 1; y covers [36, 50): 14/32 of row 1
    np.testing.assert_allclose(mask[0].numpy(), [[0, 0], [12 / 32 * 14 / 32] * 2], atol=1e-6)
    # no box anywhere: the fixed central-lower region
    del clip.extras["mouth_box"]
    np.testing.assert_allclose(mouth_boxes(clip, [0, 1], spec)[1], np.array([0.3, 0.55, 0.7, 0.85]) * SIZE)


def test_resize_center_crop():
    frames = np.zeros((2, 80, 40, 3), np.uint8)
    frames[:, 30:50] = 255  # the middle band survives the crop
    out = resize_center_crop(frames, 64, 64)  # 40 wide -> scale 1.6 -> 128 x 64, crop rows 32..96
    assert out.shape == (2, 64, 64, 3) and out.dtype == torch.uint8
    assert out[0, 32, 32, 0] == 255 and out[0, 0, 32, 0] == 0


def _keys(batch):
    return [(s["key"], s["window_start"], s["ref_frame"], s["n_motion"], s["seed"]) for s in batch]


def test_stream_is_deterministic_across_processes_workers_and_resume(dataset_dir):
    clips = index_clips([dataset_dir], "train", LITE_SPEC)
    assert len(clips) == 6
    one = Stage1Dataset(clips, LITE_SPEC, seed=7, micro_batch_size=4)
    ranks = [Stage1Dataset(clips, LITE_SPEC, seed=7, micro_batch_size=2, rank=r, world_size=2) for r in (0, 1)]
    for step in range(4):  # crosses an epoch boundary (6 samples per epoch)
        assert _keys(one.micro_batch(step)) == _keys(ranks[0].micro_batch(step)) + _keys(ranks[1].micro_batch(step))
    # resuming at a sample position continues the same stream
    resumed = Stage1Dataset(clips, LITE_SPEC, seed=7, micro_batch_size=4, start_position=8)
    assert _keys(next(iter(resumed))) == _keys(one.micro_batch(2))
    assert one.position(8) == (1, 2)
    # DataLoader workers return the micro-batches in stream order
    with_workers = iter(DataLoader(one, batch_size=None, num_workers=2))
    assert [_keys(next(with_workers)) for _ in range(3)] == [_keys(one.micro_batch(s)) for s in range(3)]
    # every clip once per epoch
    epoch0 = [s["key"] for s in one.micro_batch(0)] + [s["key"] for s in one.micro_batch(1)[:2]]
    assert sorted(epoch0) == sorted(c.key for c in clips)
