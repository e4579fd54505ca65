"""The traceable Wan resample (on with compile_vae): the same frames as diffusers' WanResample in every cache
state (whole decodes of 1-3 latent frames, streamed chunks of one and of several frames), per model, and a
compiled decoder with it traces each call in one graph."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

from flashhead.models.vae import WanVideoVAE, wan_config_to_diffusers
from flashhead.models.vae.wan_resample import TraceableWanResample, set_traceable_resample


def tiny_wan(seed: int = 0) -> WanVideoVAE:
    torch.manual_seed(seed)
    return WanVideoVAE(AutoencoderKLWan(**wan_config_to_diffusers({"dim": 8, "num_res_blocks": 1}))).eval()


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


@pytest.mark.parametrize("how", ["whole-1", "whole-3", "chunks-1,1,1", "chunks-1,2,3", "chunks-2,2"])
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


def test_compiled_decoder_call_has_no_graph_break(wan):
    """Each cache state the decoder meets (first chunk, after the "Rep" marker, with tensor caches): one graph."""
    model = wan.model
    latent = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(3))
    cache: list = [None] * sum(isinstance(m, WanCausalConv3d) for m in model.decoder.modules())
    set_traceable_resample(model, True)
    try:
        with torch.no_grad():
            for i in range(3):
                x = model.post_quant_conv(latent[:, :, i : i + 1])
                report = torch._dynamo.explain(model.decoder)(x, feat_cache=cache, feat_idx=[0], first_chunk=i == 0)
                assert report.graph_break_count == 0, (i, [str(b.reason) for b in report.break_reasons])
                assert report.graph_count == 1
    finally:
        set_traceable_resample(model, False)
        torch._dynamo.reset()
