"""Colour correction against the official Lab mean/std transfer."""

from __future__ import annotations

import pytest
import torch

from _util import load_fixture, rel_l2
from flashhead.pipeline.color import lab_to_rgb, match_colors, rgb_to_lab


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_matches_official(strength):
    t, _ = load_fixture("color_correction")
    out = match_colors(t["source"], t["reference"], strength)
    assert out.shape == t["source"].shape
    assert rel_l2(out, t[f"output_strength_{strength}"]) <= 1e-5


def test_lab_conversion_matches_official_and_round_trips():
    t, _ = load_fixture("color_correction")
    src = ((t["source"] + 1) / 2).permute(0, 2, 3, 4, 1)
    assert rel_l2(rgb_to_lab(src), t["source_lab"]) <= 1e-5
    assert rel_l2(rgb_to_lab(((t["reference"] + 1) / 2).permute(0, 2, 3, 4, 1)), t["reference_lab"]) <= 1e-5
    assert torch.allclose(lab_to_rgb(rgb_to_lab(src)), src, atol=1e-4)


def test_statistics_are_transferred_and_edge_cases():
    gen = torch.Generator().manual_seed(0)
    video = torch.rand((1, 3, 4, 16, 16), generator=gen) * 0.5 - 0.8  # dark, low contrast
    reference = torch.rand((1, 3, 1, 16, 16), generator=gen) * 1.6 - 0.8
    out = match_colors(video, reference)
    ref_lab = rgb_to_lab(((reference + 1) / 2).permute(0, 2, 3, 4, 1))
    out_lab = rgb_to_lab(((out + 1) / 2).permute(0, 2, 3, 4, 1))
    assert torch.allclose(out_lab.mean((2, 3))[:, 0], ref_lab.mean((2, 3))[:, 0], atol=1.5)
    assert torch.equal(match_colors(video, reference, 0.0), video)
    flat = torch.zeros((1, 3, 2, 8, 8))  # zero std must not divide by zero
    assert torch.isfinite(match_colors(flat, reference[..., :8, :8])).all()
    with pytest.raises(ValueError):
        match_colors(video, reference, 1.5)
    with pytest.raises(ValueError):
        match_colors(video, reference[..., :8, :8])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frames_corrected_apart_equal_the_whole_chunk(dtype):
    """What the sequence-parallel ranks do: each corrects a block of frames from the reference's statistics."""
    from flashhead.pipeline.color import match_colors_to, reference_statistics

    g = torch.Generator().manual_seed(0)
    video = (torch.rand(2, 3, 7, 16, 24, generator=g) * 2 - 1).to(dtype)
    reference = (torch.rand(2, 3, 1, 16, 24, generator=g) * 2 - 1).to(dtype)
    stats = reference_statistics(reference)
    assert stats.shape == (2, 2, 3) and stats.dtype == dtype
    whole = match_colors(video, reference, 0.75)
    assert torch.equal(match_colors_to(video, stats, 0.75), whole)
    blocks = [match_colors_to(video[:, :, a:b], stats, 0.75) for a, b in ((0, 4), (4, 7))]
    assert torch.equal(torch.cat(blocks, dim=2), whole)
    assert not torch.equal(match_colors_to(video, stats.flip(0), 0.75), whole)  # the statistics are used


def test_compiled_correction_equals_eager_in_float32():
    """Under torch.compile the 3x3 colour matrices are written out as multiply-adds (fused into the elementwise
    kernels); the result is the same computation, up to float32 rounding."""
    from flashhead.pipeline.color import match_colors_to, reference_statistics

    g = torch.Generator().manual_seed(1)
    video = torch.rand(1, 3, 3, 24, 16, generator=g) * 2 - 1
    stats = reference_statistics(torch.rand(1, 3, 1, 24, 16, generator=g) * 2 - 1)
    torch._dynamo.reset()
    compiled = torch.compile(match_colors_to, dynamic=False)
    eager = match_colors_to(video, stats, 0.8)
    out = compiled(video, stats, 0.8)
    assert (out - eager).abs().max() <= 1e-5
    assert not torch.equal(compiled(video.flip(-1), stats, 0.8), out)  # it does compute from its input
