"""Full-size Lite and Pro, random weights, through the whole pipeline on a GPU (run on the device).

The released weights cannot be downloaded here, so the networks are the official configurations with
random initialisation: this checks shapes, memory and timing of the real sizes end to end, not quality.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from _util import speech_16k

pytestmark = pytest.mark.gpu



def random_pipeline(variant: str):
    from diffusers import AutoencoderKLLTXVideo, AutoencoderKLWan
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from flashhead.models import FlashHeadDiT
    from flashhead.models.audio import Wav2VecEncoder
    from flashhead.models.dit import official_config
    from flashhead.models.vae import LTX_VIDEO_090_VAE_CONFIG, LTXVideoVAE, WanVideoVAE, wan_config_to_diffusers
    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline

    torch.manual_seed(0)
    with torch.device("cuda"):
        dit = FlashHeadDiT.from_config(official_config(variant)).eval().requires_grad_(False)
        if variant == "lite":
            vae = LTXVideoVAE(AutoencoderKLLTXVideo.from_config(LTX_VIDEO_090_VAE_CONFIG))
        else:
            vae = WanVideoVAE(AutoencoderKLWan.from_config(wan_config_to_diffusers()))
        encoder = Wav2VecEncoder(Wav2Vec2Model(Wav2Vec2Config()))  # wav2vec2-base architecture
    pipe = FlashHeadPipeline(dit, vae, encoder).to("cuda", torch.bfloat16)
    pipe.name = f"random-{variant}"
    return pipe


@pytest.mark.parametrize("variant", ["lite", "pro"])
def test_full_size_random_weights_ten_seconds(variant):
    pipe = random_pipeline(variant)
    params = sum(p.numel() for p in pipe.dit.parameters())
    image = np.asarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3)), dtype=np.uint8)
    audio = speech_16k(10.0)
    pipe(image, audio[:32000], sample_rate=16000, seed=0, progress=False, allow_silent=True)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = pipe(image, audio, sample_rate=16000, seed=0, progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert out.frames.shape == (250, 512, 512, 3) and out.frames.dtype == np.uint8
    from flashhead.pipeline.timing import StageTimer

    pipe.timer = StageTimer()
    pipe(image, audio, sample_rate=16000, seed=0, progress=False)
    report = {
        "variant": variant,
        "gpu": torch.cuda.get_device_name(),
        "dit_parameters": params,
        "frames": len(out.frames),
        "seconds_total_incl_first_chunk": round(seconds, 2),
        "fps_eager_bf16": round(len(out.frames) / seconds, 1),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "frame_std": float(out.frames.std()),
        "stages_ms_per_chunk": pipe.timer.summary(),
    }
    print("FULL_SIZE_PIPELINE", json.dumps(report))
