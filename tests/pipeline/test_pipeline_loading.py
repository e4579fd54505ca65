"""Pipeline folders: save_pretrained -> from_pretrained, and what model names resolve to."""

from __future__ import annotations

import json

import pytest
import torch

from _tiny import tiny_pipeline
from flashhead.errors import CheckpointError
from flashhead.pipeline import registry
from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline


@pytest.mark.parametrize("variant", ["lite", "pro"])
def test_save_and_load_round_trip_generates_the_same_chunk(tmp_path, variant):
    pipe, t, _ = tiny_pipeline(variant)
    pipe.name = f"tiny-{variant}"
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["vae"] == {"lite": "ltx", "pro": "wan"}[variant]
    loaded = FlashHeadPipeline.from_pretrained(tmp_path / "pipe", device="cpu")
    assert loaded.name == f"tiny-{variant}" and loaded.config == pipe.config

    image = t["inputs/cond_image_uint8"].numpy().astype("uint8")
    context = t["chunk0/audio_embedding"]
    outputs = []
    for p in (pipe, loaded):
        ref = p.encode_reference(image, generator=torch.Generator().manual_seed(1))
        chunk = p.generate_chunk(
            ref, ref.first_motion, context,
            generator=torch.Generator().manual_seed(0), encode_generator=torch.Generator().manual_seed(2),
        )  # fmt: skip
        outputs.append(chunk)
    # Same weights, same seeds: equal up to float32 rounding (on some CPUs, e.g. AMD EPYC, the reloaded pipeline's
    # kernels round a few values one ulp apart; a wrong or missing weight moves them by orders more).
    torch.testing.assert_close(outputs[0].video, outputs[1].video, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs[0].motion_latents, outputs[1].motion_latents, rtol=1e-4, atol=1e-5)


def test_unknown_or_missing_models_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="not 'lite', 'pro', 'tiny', 'auto' or a pipeline folder"):
        FlashHeadPipeline.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "model_index.json").write_text(json.dumps({"vae": "vqgan"}))
    with pytest.raises(CheckpointError, match="unknown vae 'vqgan'"):
        FlashHeadPipeline.from_pretrained(tmp_path, device="cpu")
    # "auto" with no official weights in the (empty) cache and no embedded model: say so, in one line.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(registry, "EMBEDDED_DIR", tmp_path / "no-embedded-model")
    assert not registry.official_weights_available(None)
    with pytest.raises(CheckpointError, match="no model available") as e:
        FlashHeadPipeline.from_pretrained("auto", device="cpu")
    assert "\n" not in str(e.value)


def test_float16_save_of_a_mel_pipeline_round_trips(tmp_path):
    import numpy as np

    from flashhead.pipeline.flashhead_pipeline import reference_generator

    pipe = FlashHeadPipeline.from_pretrained("tiny", device="cpu")
    folder = pipe.save_pretrained(tmp_path / "copy", weights_dtype=torch.float16)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["audio_encoder"] == "mel" and index["vae_sample_posterior"] is False
    assert next(p for p in pipe.dit.parameters()).dtype == torch.float32  # the live pipeline is untouched
    back = FlashHeadPipeline.from_pretrained(folder, device="cpu")
    assert back.config == pipe.config
    image = np.full((128, 128, 3), 90, np.uint8)
    audio = torch.sin(torch.arange(16000 * 2) / 16000 * 2 * torch.pi * 220) * 0.3
    frames = [
        np.concatenate(list(p.iter_frames(p.encode_reference(image, generator=reference_generator(0)), audio, seed=0)))
        for p in (pipe, back)
    ]
    assert np.array_equal(frames[0], frames[1])  # the shipped weights are float16 already: nothing is lost
