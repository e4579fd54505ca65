"""vae_whole_chunk: the Wan2.1 decoder over all of a decode's latent frames at once gives the frames of diffusers'
per-frame loop (whole decodes and two-piece decodes, with stock and with the shipped layer variants), the encoder
over all frames the latents of diffusers' first-frame-then-groups-of-4 loop; each compiles to one graph without
breaks, and the switch is per VAE."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

from flashhead.models.vae import WanVideoVAE
from flashhead.models.vae.wan_conv import set_kernel_padding, set_tap_sum
from flashhead.models.vae.wan_resample import TraceableWanResample, set_subpixel_upsample
from models.test_wan_conv import tiny_wan as tiny_random_wan

# float32 convolutions of other shapes (and on several frames) sum in another order: ~4e-6 here.
ATOL = 2e-5


def tiny_wan(layers: str) -> WanVideoVAE:
    vae = tiny_random_wan()
    if layers == "shipped":  # the preset's Wan layer variants
        set_tap_sum(vae.model, True)
        set_kernel_padding(vae.model, True)
        set_subpixel_upsample(vae.model, True)
    return vae


def latent(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, frames, 4, 6, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("layers", ["stock", "shipped"])
@pytest.mark.parametrize("frames", [1, 2, 3, 6])
def test_whole_chunk_decode_equals_the_per_frame_loop(layers, frames):
    vae = tiny_wan(layers)
    z = latent(frames)
    loop = vae.decode(z)
    vae.set_whole_chunk(True)
    whole = vae.decode(z)
    assert whole.shape == loop.shape == (1, 3, 1 + 4 * (frames - 1), 32, 48) and loop.std() > 0.05
    torch.testing.assert_close(whole, loop, atol=ATOL, rtol=0)
    # a frame of difference anywhere in time (a time upsampling off by one) would be far above the tolerance
    assert (whole - loop).abs().amax(dim=(0, 1, 3, 4)).max() < ATOL
    assert vae.model._feat_map == [None] * len(vae.model._feat_map)  # caches cleared


@torch.no_grad()
@pytest.mark.parametrize("head", [1, 2, 4])
def test_whole_chunk_pieces_equal_the_whole_decode(head):
    """Two pieces, each one decoder call: the first holds its latent frames' pixels, together they are the decode."""
    vae = tiny_wan("shipped")
    z = latent(5, seed=1)
    loop = vae.decode(z)
    vae.set_whole_chunk(True)
    pieces = list(vae.decode_in_pieces(z, head))
    assert len(pieces) == 2 and pieces[0].shape[2] == 1 + 4 * (head - 1)
    torch.testing.assert_close(torch.cat(pieces, dim=2), loop, atol=ATOL, rtol=0)
    assert vae.model._feat_map == [None] * len(vae.model._feat_map)


@torch.no_grad()
@pytest.mark.parametrize("layers", ["stock", "shipped"])
@pytest.mark.parametrize("frames", [1, 5, 9])
def test_whole_chunk_encode_equals_the_grouped_loop(layers, frames):
    vae = tiny_wan(layers)
    video = torch.rand(1, 3, frames, 32, 48, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    loop = vae.encode(video)
    vae.set_whole_chunk(True)
    whole = vae.encode(video)
    assert whole.shape == loop.shape == (1, 16, 1 + (frames - 1) // 4, 4, 6) and loop.std() > 0.1
    torch.testing.assert_close(whole, loop, atol=ATOL, rtol=0)
    assert vae.model._enc_feat_map == [None] * len(vae.model._enc_feat_map)


def test_whole_chunk_makes_the_resamples_traceable_and_is_per_vae():
    a, b = tiny_wan("stock"), tiny_wan("stock")
    a.set_whole_chunk(True)
    assert a.whole_chunk and not b.whole_chunk
    ups = [m for m in a.model.modules() if isinstance(m, WanResample)]
    assert ups and all(type(m) is TraceableWanResample for m in ups)
    assert all(type(m) is WanResample for m in b.model.modules() if isinstance(m, WanResample))
    a.set_whole_chunk(False)
    assert not a.whole_chunk


def test_compiled_whole_chunk_decoder_and_encoder_are_one_graph_each():
    vae = tiny_wan("shipped")
    model = vae.model
    vae.set_whole_chunk(True)
    z = model.post_quant_conv(latent(3, seed=2))
    model.clear_cache()
    try:
        with torch.no_grad():
            report = torch._dynamo.explain(model.decoder)(z, feat_cache=model._feat_map, feat_idx=[0], first_chunk=True)
        assert report.graph_break_count == 0, [str(r.reason) for r in report.break_reasons]
        assert report.graph_count == 1
        model.clear_cache()
        video = torch.rand(1, 3, 5, 32, 48)
        with torch.no_grad():
            report = torch._dynamo.explain(model.encoder)(video, feat_cache=model._enc_feat_map, feat_idx=[0])
        assert report.graph_break_count == 0, [str(r.reason) for r in report.break_reasons]
        assert report.graph_count == 1
    finally:
        model.clear_cache()
        torch._dynamo.reset()


def decoder_call_frames(vae: WanVideoVAE) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    """The latent frames of each decoder call from now on (the hook appends; remove the handle after)."""
    frames: list[int] = []
    handle = vae.model.decoder.register_forward_pre_hook(lambda _m, args: frames.append(args[0].shape[2]))
    return frames, handle


@torch.no_grad()
@pytest.mark.parametrize(
    ("batch", "call_frames", "calls"),
    [
        (1, 0, [5]),  # one stream's whole decode in one call
        (2, 0, [2, 2, 1]),  # two streams: at most 5 latent frames per call over both, 2 each
        (3, 0, [1, 1, 1, 1, 1]),  # more streams than 5 // 2: the per-frame loop's calls
        (1, 4, [3, 2]),  # a bound below the decode: near-equal calls, at most 4 frames each
        (2, 6, [3, 2]),
    ],
)
def test_whole_chunk_calls_are_bounded_over_the_batch_and_keep_the_frames(batch, call_frames, calls):
    vae = tiny_wan("shipped")
    z = torch.randn(batch, 16, 5, 4, 6, generator=torch.Generator().manual_seed(3))
    loop = vae.decode(z)
    vae.set_whole_chunk(True, call_frames=call_frames)
    seen, handle = decoder_call_frames(vae)
    try:
        bounded = vae.decode(z)
    finally:
        handle.remove()
    assert seen == calls
    assert bounded.shape == loop.shape == (batch, 3, 17, 32, 48)
    torch.testing.assert_close(bounded, loop, atol=ATOL, rtol=0)
    # each stream its own frames: a batch mixed up along the way would differ by far more than the tolerance
    assert (bounded[1:] - bounded[:1]).abs().max() > 0.05 if batch > 1 else True


@torch.no_grad()
def test_bounded_calls_split_each_piece_apart():
    """Early first frames: the head piece and the rest are split each within its own bounds, and together are the
    per-frame loop's decode."""
    vae = tiny_wan("shipped")
    z = latent(5, seed=4)
    loop = vae.decode(z)
    vae.set_whole_chunk(True, call_frames=2)
    seen, handle = decoder_call_frames(vae)
    try:
        pieces = list(vae.decode_in_pieces(z, 1))
    finally:
        handle.remove()
    assert seen == [1, 2, 2] and [p.shape[2] for p in pieces] == [1, 16]
    torch.testing.assert_close(torch.cat(pieces, dim=2), loop, atol=ATOL, rtol=0)


def test_call_frames_must_not_be_negative():
    with pytest.raises(ValueError, match="call_frames"):
        tiny_wan("stock").set_whole_chunk(True, call_frames=-1)
