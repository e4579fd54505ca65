"""Exact Wan2.1 strip encode (flashhead.parallel.wan_encode): strips' features, then the mid block and head on the
whole map == the one-process encode.

Single process: the strips are computed one after the other here; tests/parallel/test_sequence_parallel.py
checks the gather across 2 gloo processes and test_sp_pipeline.py the motion re-encode in the pipeline.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from _tiny import compiled_vae_switches, tiny_vae
from flashhead.errors import ConfigError
from flashhead.parallel.vae import strip_bounds
from flashhead.parallel.wan_encode import WanStripEncoder, row_windows
from flashhead.pipeline.fast_path import apply_vae_switches
from flashhead.pipeline.speed import SpeedConfig


def video(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, frames, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def strips(vae, encoder: WanStripEncoder, x: torch.Tensor, ranks: int) -> torch.Tensor:
    """The split encode of `ranks` strips, gathered by concatenation."""
    x = vae._check_video(x)
    rows = x.shape[-2] // encoder.scale
    with torch.no_grad():
        features = torch.cat([encoder.features(x, a, b) for a, b in strip_bounds(rows, ranks)], dim=-2)
        return vae.normalize(encoder.finish(features))


@pytest.mark.parametrize(("rows", "ranks", "frames"), [(32, 2, 5), (13, 3, 9), (16, 4, 1)])
def test_strips_equal_full_encode_across_time_chunks(rows, ranks, frames):
    """Tiny fixture VAE, float32, even and uneven strips, 1 to 3 time chunks (the causal caches carry over)."""
    vae = tiny_vae("pro")
    x = video(frames, 8 * rows, 24, seed=rows)
    with torch.no_grad():
        full = vae.encode(x)
    got = strips(vae, WanStripEncoder(vae.model), x, ranks)
    assert got.shape == full.shape == (1, 16, 1 + (frames - 1) // 4, rows, 3)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)


def test_strips_with_kernel_padded_convs_equal_the_stock_encode():
    """vae_conv_pad (+ channels-last): the strips still give the plain whole encode."""
    vae = tiny_vae("pro")
    x = video(9, 8 * 13, 24, seed=4)
    with torch.no_grad():
        full = vae.encode(x)
    apply_vae_switches(vae, SpeedConfig(vae_conv_pad=True, vae_channels_last=True))
    got = strips(vae, WanStripEncoder(vae.model), x, 3)
    with torch.no_grad():
        whole = vae.encode(x)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)
    torch.testing.assert_close(whole, full, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_compiled_encoder_compiles_the_strip_step_and_stays_exact():
    """With compile_vae (the encoder compiled) a strip runs its own compiled per-chunk step with every layout
    switch, equal to the eager whole encode: one graph for the first frame and one for a 4-frame chunk per strip
    (a rank runs one strip), two for the mid block and head after the gather (first latent frame, then with
    the caches), and a second stream compiles nothing new (~90 s)."""
    vae = tiny_vae("pro")
    x = video(5, 8 * 13, 24, seed=5)  # the motion re-encode: a first frame and one 4-frame chunk
    with torch.no_grad():
        full = vae.encode(x)
    with compiled_vae_switches(vae) as stats:
        encoder = WanStripEncoder(vae.model)
        got = strips(vae, encoder, x, 2)
        assert encoder._compiled is not None and encoder._compiled_finish is not None  # the compiled steps ran
        graphs = stats["unique_graphs"]
        assert graphs <= 2 * 2 + 2, dict(stats)
        again = strips(vae, encoder, x, 2)  # the next chunk of a stream: same shapes, no recompile
        assert stats["unique_graphs"] == graphs
        torch.testing.assert_close(got, full, rtol=0, atol=1e-4)
        torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_margins_are_the_receptive_field_not_more():
    """One row less of margin per layer breaks the equality: the margins are needed, and they are tight."""
    vae = tiny_vae("pro")
    encoder = WanStripEncoder(vae.model)
    windows = row_windows(encoder.stages, 32, 0, 16)
    # Back from latent rows [0, 16) of 32, tiny VAE (one residual block of 2 rows per level): 16+2 -> 2*17+3 = 37
    # -> 39 -> 2*38+3 = 79 -> 81 -> 163 -> 165 -> conv_in 166 of 256 pixel rows; the last stage reads 18 rows.
    assert windows[0] == (0, 166) and windows[-1] == (0, 18)
    # The strip below reaches up: 16-2 = 14 -> 2*14 = 28 (a strided conv reads no row above) -> 26 -> 52 -> 50 -> 100
    # -> 98 -> 97.
    assert row_windows(encoder.stages, 32, 16, 32)[0] == (97, 256)
    x = video(5, 256, 16)
    with torch.no_grad():
        full = vae.encode(x)
    for side in ("above", "below"):
        narrow = WanStripEncoder(vae.model)
        narrow.stages = [dataclasses.replace(s, **{side: max(0, getattr(s, side) - 1)}) for s in narrow.stages]
        assert (strips(vae, narrow, x, 2) - full).abs().max() > 1e-3, side


def test_full_size_wan21_encoder_is_exact():
    """The official Wan2.1 VAE config (random weights), 5 frames of 128 x 16 pixels: 2 strips == the full encode."""
    from diffusers import AutoencoderKLWan

    from flashhead.models.vae import WanVideoVAE, wan_config_to_diffusers

    torch.manual_seed(0)
    vae = WanVideoVAE(AutoencoderKLWan(**wan_config_to_diffusers()))
    encoder = WanStripEncoder(vae.model)
    # conv_in, then per level 2 residual blocks and a strided conv (none after the last level)
    assert [s.stride for s in encoder.stages].count(2) == 3 and len(encoder.stages) == 1 + 3 * 3 + 2
    x = video(5, 128, 16, seed=1)
    with torch.no_grad():
        full = vae.encode(x)
    torch.testing.assert_close(strips(vae, encoder, x, 2), full, rtol=0, atol=1e-5)


def test_unknown_encoder_layers_are_refused():
    vae = tiny_vae("pro")
    down = next(m for m in vae.model.encoder.down_blocks if type(m).__name__ == "WanResample")
    down.resample[1] = torch.nn.Conv2d(16, 16, 3, stride=4)
    with pytest.raises(ConfigError, match="kernel 3, stride 4"):
        WanStripEncoder(vae.model)
    vae.model.encoder.down_blocks[0] = torch.nn.Identity()
    with pytest.raises(ConfigError, match="not Identity"):
        WanStripEncoder(vae.model)
