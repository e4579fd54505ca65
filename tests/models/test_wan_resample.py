"""The traceable Wan resample (on with compile_vae): the same frames as diffusers' WanResample in every cache
state (whole decodes of 1-3 latent frames, streamed chunks of one and of several frames after a first frame), per
model, and a compiled decoder with it traces each call in one graph. Sub-pixel upsampling (vae_subpixel_upsample):
the folded low-resolution convolution equals upsampling + convolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample
from torch import nn

from flashhead.models.vae.wan_resample import (
    SUBPIXEL_METHODS,
    TraceableWanResample,
    phase_weight,
    set_subpixel_upsample,
    set_traceable_resample,
    subpixel_weight,
    upsample_conv_phases,
    upsample_conv_transposed,
)
from models.test_wan_conv import tiny_wan


def stream_decode(model: AutoencoderKLWan, latent: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """The decoder over consecutive latent chunks with one feature cache, as a streaming decode runs it."""
    cache: list = [None] * sum(isinstance(m, WanCausalConv3d) for m in model.decoder.modules())
    out, start = [], 0
    for i, n in enumerate(sizes):
        x = model.post_quant_conv(latent[:, :, start : start + n])
        out.append(model.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=i == 0))
        start += n
    return torch.cat(out, dim=2)


@pytest.fixture(scope="module")
def wan():
    return tiny_wan()


# Chunks after a first one of a single frame: diffusers' own loop starts so. A first chunk of several frames is where
# the traceable resample differs on purpose (it upsamples them as that loop would, diffusers' forward leaves them
# un-upsampled in time): tests/models/test_wan_whole_chunk.py.
@pytest.mark.parametrize("how", ["whole-1", "whole-3", "chunks-1,1,1", "chunks-1,2,3", "chunks-1,3,2"])
def test_traceable_resample_equals_stock(wan, how):
    kind, sizes = how.split("-")
    sizes = [int(n) for n in sizes.split(",")]
    latent = torch.randn(1, 16, sum(sizes), 2, 3, generator=torch.Generator().manual_seed(len(how)))

    def run() -> torch.Tensor:
        with torch.no_grad():
            return wan.model.decode(latent).sample if kind == "whole" else stream_decode(wan.model, latent, sizes)

    stock = run()
    try:
        assert set_traceable_resample(wan.model, True) > 0
        swapped = run()
    finally:
        set_traceable_resample(wan.model, False)
    assert swapped.shape == stock.shape and stock.std() > 0.01
    assert torch.equal(swapped, stock)  # same ops in the same order: bit-identical


def test_switch_is_per_model_and_restores_diffusers_class():
    a, b = tiny_wan(0), tiny_wan(0)
    resamples = [m for m in a.model.modules() if isinstance(m, WanResample)]
    assert set_traceable_resample(a.model, True) == len(resamples) > 0
    assert all(type(m) is TraceableWanResample for m in resamples)
    assert all(type(m) is WanResample for m in b.model.modules() if isinstance(m, WanResample))
    assert a.model.state_dict().keys() == b.model.state_dict().keys()
    set_traceable_resample(a.model, False)
    assert all(type(m) is WanResample for m in resamples)


@pytest.mark.parametrize("switch", [set_traceable_resample, set_subpixel_upsample], ids=["traceable", "subpixel"])
def test_compiled_decoder_call_has_no_graph_break(wan, switch):
    """Each cache state the decoder meets (first chunk, after the "Rep" marker, with tensor caches): one graph, with
    the traceable resample (compile_vae) and with sub-pixel upsampling."""
    model = wan.model
    latent = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(3))
    cache: list = [None] * sum(isinstance(m, WanCausalConv3d) for m in model.decoder.modules())
    switch(model, True)
    try:
        with torch.no_grad():
            for i in range(3):
                x = model.post_quant_conv(latent[:, :, i : i + 1])
                report = torch._dynamo.explain(model.decoder)(x, feat_cache=cache, feat_idx=[0], first_chunk=i == 0)
                assert report.graph_break_count == 0, (i, [str(b.reason) for b in report.break_reasons])
                assert report.graph_count == 1
    finally:
        switch(model, False)
        torch._dynamo.reset()


# -- sub-pixel upsampling (vae_subpixel_upsample) ------------------------------------------------------------


@pytest.mark.parametrize("method", SUBPIXEL_METHODS)
@pytest.mark.parametrize(("c_in", "c_out", "h", "w"), [(5, 3, 4, 6), (8, 4, 1, 1), (3, 2, 7, 5)])
def test_folded_taps_are_upsample_then_conv(method, c_in, c_out, h, w):
    """In float64 the low-resolution form equals nearest 2x upsampling + the 3x3 convolution (padding 1),
    borders included (odd sizes, one pixel)."""
    torch.manual_seed(c_in)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1).double()
    x = torch.randn(2, c_in, h, w, dtype=torch.float64)
    with torch.no_grad():
        expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))
        if method == "transpose":
            got = upsample_conv_transposed(x, subpixel_weight(conv), conv.bias)
        else:
            got = upsample_conv_phases(x, phase_weight(conv), conv.bias)
    assert got.shape == expected.shape == (2, c_out, 2 * h, 2 * w)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_folded_weight_sums_the_taps_that_read_one_pixel():
    """Tap by tap: the corners of the 4x4 kernel are single 3x3 taps, its centre sums four."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(9.0).view(1, 1, 3, 3))
    folded = subpixel_weight(conv)[0, 0]
    assert folded.shape == (4, 4)
    # rows / columns of the 4x4 kernel collect 3x3 rows / columns {2}, {1, 2}, {0, 1}, {0}
    assert folded[0, 0] == 8 and folded[3, 3] == 0 and folded[0, 3] == 6 and folded[3, 0] == 2
    assert folded[1, 1] == 4 + 5 + 7 + 8 and folded[2, 2] == 0 + 1 + 3 + 4


@pytest.mark.parametrize("method", SUBPIXEL_METHODS)
@pytest.mark.parametrize("how", ["whole-3", "chunks-1,2,3"])
def test_subpixel_decoder_equals_stock(wan, method, how):
    """Whole and streamed decodes (every cache state of the time upsampling): float32 rounding only."""
    kind, sizes = how.split("-")
    sizes = [int(n) for n in sizes.split(",")]
    latent = torch.randn(1, 16, sum(sizes), 2, 3, generator=torch.Generator().manual_seed(7))

    def run() -> torch.Tensor:
        with torch.no_grad():
            return wan.model.decode(latent).sample if kind == "whole" else stream_decode(wan.model, latent, sizes)

    stock = run()
    try:
        assert set_subpixel_upsample(wan.model, True, method=method) > 0
        folded = run()
    finally:
        set_subpixel_upsample(wan.model, False)
    assert folded.shape == stock.shape and stock.std() > 0.01
    torch.testing.assert_close(folded, stock, rtol=0, atol=1e-5)


def test_subpixel_switch_is_per_model_and_undone():
    a, b = tiny_wan(0), tiny_wan(0)
    ups = [m for m in a.model.modules() if isinstance(m, WanResample) and m.mode.startswith("upsample")]
    keys = a.model.state_dict().keys()
    assert set_subpixel_upsample(a.model, True, channels_last=True) == len(ups) > 0
    assert all(type(m) is TraceableWanResample and m.subpixel == "transpose" for m in ups)
    assert all(m.subpixel_weight.is_contiguous(memory_format=torch.channels_last) for m in ups)
    assert a.model.state_dict().keys() == keys  # the folded weights are not part of the checkpoint
    assert all(type(m) is WanResample for m in b.model.modules() if isinstance(m, WanResample))
    set_traceable_resample(a.model, False)  # compile_vae off must not drop the sub-pixel forward
    assert all(type(m) is TraceableWanResample for m in ups)
    set_subpixel_upsample(a.model, False)
    set_traceable_resample(a.model, False)
    assert all(type(m) is WanResample and "subpixel_weight" not in m._buffers for m in ups)
    with pytest.raises(ValueError, match="method"):
        set_subpixel_upsample(a.model, True, method="bilinear")


def test_subpixel_weights_follow_the_module_to_another_dtype():
    vae = tiny_wan(0)
    set_subpixel_upsample(vae.model, True)
    vae.model.to(torch.float64)
    ups = [m for m in vae.model.modules() if getattr(m, "subpixel", None)]
    assert ups and all(m.subpixel_weight.dtype == torch.float64 for m in ups)
