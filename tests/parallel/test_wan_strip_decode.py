"""Exact Wan2.1 strip decode (flashhead.parallel.wan_decode): strips of a decode == the same rows of a full decode.

Single process: the strips are decoded one after the other here; tests/parallel/test_sequence_parallel.py
checks the gather across 2 gloo processes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _tiny import compiled_vae_switches, tiny_vae
from flashhead.errors import ConfigError
from flashhead.parallel.vae import decode_strip, strip_bounds
from flashhead.parallel.wan_decode import WanStripDecoder, row_windows
from flashhead.pipeline.fast_path import apply_vae_switches
from flashhead.pipeline.speed import SpeedConfig


def strips(vae, latent, ranks: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([decode_strip(vae, latent, a, b, 0) for a, b in strip_bounds(latent.shape[-2], ranks)], -2)


@pytest.mark.parametrize(("rows", "ranks", "frames"), [(8, 2, 4), (13, 3, 3), (16, 4, 2)])
def test_strips_equal_full_decode_across_latent_frames(rows, ranks, frames):
    """Tiny fixture VAE, float32, even and uneven strips, several latent frames (the causal caches carry over)."""
    vae = tiny_vae("pro")
    latent = torch.randn(1, 16, frames, rows, 6, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        full = vae.decode(latent)
    got = strips(vae, latent, ranks)
    assert got.shape == full.shape == (1, 3, 1 + 4 * (frames - 1), 8 * rows, 48)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "speed",
    [
        SpeedConfig(vae_conv_pad=True, vae_channels_last=True),
        SpeedConfig(vae_subpixel_upsample=True, vae_conv_pad=True),
        SpeedConfig(vae_conv_out_gemm=True, vae_conv_pad=True, vae_channels_last=True),
    ],
    ids=["conv_pad+channels_last", "subpixel+conv_pad", "conv_out_gemm+conv_pad+channels_last"],
)
def test_strips_with_switched_layers_equal_the_stock_decode(speed):
    """vae_conv_pad (+ channels-last), vae_subpixel_upsample (the folded upsampling convolutions read the same
    rows) and vae_conv_out_gemm (the output convolution's tap planes are zero-padded like its input): the strips,
    and the whole decode, still compute the rows of the plain whole decode."""
    vae = tiny_vae("pro")
    latent = torch.randn(1, 16, 3, 13, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = vae.decode(latent)
    apply_vae_switches(vae, speed)
    try:
        got = strips(vae, latent, 3)
        with torch.no_grad():
            whole = vae.decode(latent)
    finally:
        apply_vae_switches(vae, SpeedConfig())
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(whole, full, rtol=0, atol=1e-5)


def test_margins_are_the_receptive_field_not_more():
    """One row less of margin per layer breaks the equality: the margins are needed, and they are tight."""
    vae = tiny_vae("pro")
    latent = torch.randn(1, 16, 2, 32, 4, generator=torch.Generator().manual_seed(0))
    decoder = WanStripDecoder(vae.model)
    windows = row_windows(decoder.stages, 32, 0, 16)
    # Back from the pixels: conv_out 1 row, per level 2 res blocks (2 x 2 rows) and an upsampling conv (1 row)
    # then halving: 1+4 -> 6 -> 3+4+1 -> 4+4+1 -> ceil(9/2) = 5 latent rows + 4 for the first level's res blocks.
    assert windows[0] == (0, 16 + 9) and windows[-1] == (0, 16 * 8 + 1)
    vae._strip_decoder = decoder
    decoder.stages = [dataclasses.replace(s, radius=max(0, s.radius - 1)) for s in decoder.stages]
    with torch.no_grad():
        full = vae.decode(latent)
    assert (strips(vae, latent, 2) - full).abs().max() > 1e-3


def test_full_size_wan21_decoder_is_exact():
    """The official Wan2.1 VAE config (random weights), 64 x 16 pixels: 2 strips == the full decode."""
    from diffusers import AutoencoderKLWan

    from flashhead.models.vae import WanVideoVAE, wan_config_to_diffusers

    torch.manual_seed(0)
    vae = WanVideoVAE(AutoencoderKLWan(**wan_config_to_diffusers()))
    latent = torch.randn(1, 16, 2, 8, 2, generator=torch.Generator().manual_seed(1))
    decoder = WanStripDecoder(vae.model)
    assert [s.upsample for s in decoder.stages].count(2) == 3 and len(decoder.stages) == 4 * 3 + 3 + 1
    with torch.no_grad():
        full = vae.decode(latent)
    torch.testing.assert_close(strips(vae, latent, 2), full, rtol=0, atol=1e-5)


def test_unknown_decoder_layers_are_refused():
    vae = tiny_vae("pro")
    vae.model.decoder.up_blocks[0].resnets[0].conv1 = torch.nn.Conv2d(16, 16, 5, padding=1)
    with pytest.raises(ConfigError, match="kernel 5, padding 1"):
        WanStripDecoder(vae.model)


@pytest.mark.slow
def test_compiled_decoder_compiles_the_strip_step_and_stays_exact():
    """With compile_vae (the decoder compiled) a strip runs its own compiled per-frame step, same rows (~40 s)."""
    vae = tiny_vae("pro")
    latent = torch.randn(1, 16, 2, 8, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = vae.decode(latent)
    torch._dynamo.reset()
    vae.model.decoder.compile()
    try:
        with torch.no_grad():
            top = decode_strip(vae, latent, 0, 4, 0)
        assert vae._strip_decoder._compiled is not None  # the compiled step ran
        torch.testing.assert_close(top, full[..., : 4 * 8, :], rtol=0, atol=1e-4)
    finally:
        vae.model.decoder._compiled_call_impl = None
        torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_strip_step_keeps_three_graphs_with_every_switch():
    """The strip's caches keep one layout, so its compiled step has one graph per cache state (none, one frame,
    two frames) however many frames and chunks follow: every further variant was a recompile, and past Dynamo's
    limit the decode fell back to eager (~20 s)."""
    vae = tiny_vae("pro")
    latent = torch.randn(1, 16, 5, 8, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = vae.decode(latent)
    with compiled_vae_switches(vae) as stats:
        assert torch._dynamo.config.recompile_limit >= 128  # the decoder's nested frames get room for their shapes
        with torch.no_grad():
            for _ in range(2):  # two chunks
                top = decode_strip(vae, latent, 0, 4, 0)
        assert stats["unique_graphs"] <= 3, dict(stats)
        torch.testing.assert_close(top, full[..., : 4 * 8, :], rtol=0, atol=1e-4)


@pytest.mark.parametrize(("call_frames", "batch"), [(0, 1), (2, 1), (0, 2)])
def test_whole_chunk_strips_equal_the_full_decode(call_frames, batch):
    """vae_whole_chunk on the strip decoder: each strip decodes its latent frames in the whole-chunk calls (all at
    once, or bounded by vae_call_frames over the batch) with the shipped layer switches, and the strips are the rows
    of the plain per-frame full decode."""
    vae = tiny_vae("pro")
    latent = torch.randn(batch, 16, 5, 13, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = vae.decode(latent)
    speed = SpeedConfig(vae_whole_chunk=True, vae_call_frames=call_frames, vae_conv_pad=True, vae_channels_last=True,
                        vae_subpixel_upsample=True, vae_conv_out_gemm=True)  # fmt: skip
    apply_vae_switches(vae, speed)
    expected = vae.decoder_calls(0, 5, batch=batch, frames=5)
    seen: list[int] = []
    hook = vae.model.decoder.mid_block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[2]))
    try:
        got = strips(vae, latent, 3)
    finally:
        hook.remove()
        apply_vae_switches(vae, SpeedConfig())
    assert len(expected) < 5 and seen == [b - a for a, b in expected] * 3  # the whole chunk's calls, on each strip
    torch.testing.assert_close(got, full, rtol=0, atol=2e-5)
