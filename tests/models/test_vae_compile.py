"""compile_vae compiles both halves of either VAE (the encoder re-encodes every chunk's motion frames) and they
compute what the eager networks compute; switching it off restores the eager modules."""

from __future__ import annotations

import pytest
import torch

from _tiny import tiny_vae
from flashhead.pipeline.fast_path import apply_vae_switches
from flashhead.pipeline.speed import SpeedConfig


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lite", "pro"])
def test_compiled_vae_encodes_and_decodes_like_eager(variant):
    """~50 s per VAE on 2 CPU cores (Inductor compiles both networks)."""
    vae = tiny_vae(variant)
    g = torch.Generator().manual_seed(0)
    frames = 1 + vae.stride[0]  # a first frame and one temporal group, like a motion-frame re-encode
    video = torch.rand(1, 3, frames, 64, 64, generator=g) * 2 - 1
    shape = (1, *vae.latent_shape(frames, 64, 64))
    noise, latent = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    with torch.no_grad():
        eager_encode, eager_decode = vae.encode(video, noise=noise), vae.decode(latent)
    torch._dynamo.reset()
    apply_vae_switches(vae, SpeedConfig(compile_vae=True))
    try:
        assert vae.model.encoder._compiled_call_impl is not None
        assert vae.model.decoder._compiled_call_impl is not None
        with torch.no_grad():
            encoded, decoded = vae.encode(video, noise=noise), vae.decode(latent)
    finally:
        apply_vae_switches(vae, SpeedConfig())
        torch._dynamo.reset()
    assert vae.model.encoder._compiled_call_impl is None and vae.model.decoder._compiled_call_impl is None
    assert eager_encode.std() > 0.01 and eager_decode.std() > 0.01
    torch.testing.assert_close(encoded, eager_encode, rtol=0, atol=1e-4)
    torch.testing.assert_close(decoded, eager_decode, rtol=0, atol=1e-4)
