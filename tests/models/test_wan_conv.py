"""The vae_conv_pad switch: Wan causal convolutions with spatial padding inside the kernel compute what diffusers'
stock forward computes (float32 on CPU), for one convolution in every cache case, for whole decodes and encodes,
and for a chunked causal stream; it changes only the model it is applied to and switches back. The same for
vae_conv_out_gemm (the decoder's output convolution as one GEMM and a sum of shifted tap planes), whose compiled
form is one GEMM and one fused kernel."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from flashhead.models.vae import WanVideoVAE, wan_config_to_diffusers
from flashhead.models.vae.wan_conv import KernelPaddedCausalConv3d, TapSumCausalConv3d, set_kernel_padding, set_tap_sum
from flashhead.pipeline.fast_path import apply_vae_switches
from flashhead.pipeline.speed import SpeedConfig

TOL = 1e-5


def tiny_wan(seed: int = 0) -> WanVideoVAE:
    """The Wan2.1 VAE architecture with base_dim 8 and one residual block per level (random weights)."""
    torch.manual_seed(seed)
    return WanVideoVAE(AutoencoderKLWan(**wan_config_to_diffusers({"dim": 8, "num_res_blocks": 1}))).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


# -- one convolution ---------------------------------------------------------------------------------------------

CONVS = {  # the kinds of causal convolution in the Wan2.1 VAE
    "3x3x3": dict(kernel_size=3, padding=1),
    "1x1x1 (shortcut, quant convs)": dict(kernel_size=1),
    "3x1x1 time conv of the upsampler": dict(kernel_size=(3, 1, 1), padding=(1, 0, 0)),
    "3x1x1 stride-2 time conv of the downsampler": dict(kernel_size=(3, 1, 1), stride=(2, 1, 1)),
}


def one_convolution(kind: str, cached: int | None, channels_last: bool, out_channels: int = 5) -> tuple:
    """A stock Wan causal convolution of `kind` (6 input channels), an input of 4 frames and `cached` cache frames."""
    torch.manual_seed(0)
    conv = WanCausalConv3d(6, out_channels, **CONVS[kind]).eval()
    if channels_last:
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 4, 7, 9, generator=g)
    cache = None if cached is None else torch.randn(2, 6, cached, 7, 9, generator=g)
    return conv, x, cache


@pytest.mark.parametrize("kind", list(CONVS))
@pytest.mark.parametrize("cached", [None, 1, 2, 3])  # frames of cache: none, shorter than, as long as, longer
@pytest.mark.parametrize("channels_last", [False, True])
def test_one_convolution_equals_stock_in_every_cache_case(kind, cached, channels_last):
    conv, x, cache = one_convolution(kind, cached, channels_last)
    with torch.no_grad():
        stock = conv(x, cache)
        assert set_kernel_padding(conv, True) == 1 and type(conv) is KernelPaddedCausalConv3d
        fast = conv(x, cache)
    assert max_diff(fast, stock) <= TOL
    if cached is not None and conv._padding[4] > 0:  # the cache is really read: other cache, other output
        with torch.no_grad():
            assert max_diff(conv(x, torch.zeros_like(cache)), fast) > 1e-3


STRIDE_1 = [kind for kind in CONVS if "stride" not in kind]


@pytest.mark.parametrize("kind", STRIDE_1)
@pytest.mark.parametrize("cached", [None, 1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_tap_sum_convolution_equals_stock_in_every_cache_case(kind, cached, channels_last):
    conv, x, cache = one_convolution(kind, cached, channels_last, out_channels=3)
    with torch.no_grad():
        stock = conv(x, cache)
        conv.__class__ = TapSumCausalConv3d
        fast = conv(x, cache)
    assert max_diff(fast, stock) <= TOL and stock.std() > 0.1


@pytest.mark.parametrize("cached", [True, False])
def test_compiled_tap_sum_is_one_gemm_and_one_fused_sum(cached):
    """What the switch is for: Inductor turns the layer into one batched GEMM and one kernel for the 27 shifted
    planes (padding, slices and sum fused), beside the causal time context's concatenation where a cache is given;
    without one (a chunk's first call, a whole-chunk decode) the zero frames in front are padding of the planes, fused
    into the sum too: no padded copy of the input."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    conv = WanCausalConv3d(16, 3, 3, padding=1).eval()
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 16, 4, 12, 10).contiguous(memory_format=torch.channels_last_3d)
    cache = torch.randn(1, 16, 2, 12, 10).contiguous(memory_format=torch.channels_last_3d) if cached else None
    with torch.no_grad():
        stock = conv(x, cache)
        conv.__class__ = TapSumCausalConv3d
        torch._dynamo.reset()
        out, (code,) = run_and_get_code(torch.compile(conv), x, cache)
    assert max_diff(out, stock) <= 1e-4
    calls = [line.strip() for line in code.splitlines() if line.strip().startswith(("extern_kernels.", "cpp_fused"))]
    calls = [c for c in calls if "(" in c and "async_compile" not in c]
    assert len([c for c in calls if c.startswith("extern_kernels.bmm")]) == 1, calls
    assert "convolution" not in code
    # with a cache: the time context's concatenation, the GEMM, the fused sum; without: the GEMM and the sum
    assert len(calls) == (3 if cached else 2), calls


# -- whole decode and encode -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan():
    return tiny_wan()


def decode_encode(vae: WanVideoVAE, video: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return vae.decode(latent), vae.encode(video)


@pytest.mark.parametrize("frames", [1, 5, 9])
@pytest.mark.parametrize("channels_last", [False, True])
def test_decode_and_encode_equal_stock(wan, frames, channels_last):
    g = torch.Generator().manual_seed(frames)
    video = torch.rand(1, 3, frames, 16, 24, generator=g) * 2 - 1
    latent = torch.randn(1, 16, 1 + (frames - 1) // 4, 2, 3, generator=g)
    stock = decode_encode(wan, video, latent)
    try:
        apply_vae_switches(wan, SpeedConfig(vae_conv_pad=True, vae_channels_last=channels_last))
        assert all(type(m) is not WanCausalConv3d for m in wan.model.modules())
        fast = decode_encode(wan, video, latent)
    finally:
        apply_vae_switches(wan, SpeedConfig())
    assert fast[0].shape == (1, 3, frames, 16, 24) and fast[1].shape == latent.shape
    assert max_diff(fast[0], stock[0]) <= TOL and max_diff(fast[1], stock[1]) <= TOL
    assert stock[0].std() > 0.01 and stock[1].std() > 0.01  # not a constant output that any change would keep


@pytest.mark.parametrize("conv_pad", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_decode_with_conv_out_gemm_equals_stock(wan, conv_pad, channels_last):
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(1, 16, 3, 2, 3, generator=g)
    video = torch.rand(1, 3, 9, 16, 24, generator=g) * 2 - 1
    stock = decode_encode(wan, video, latent)
    try:
        apply_vae_switches(
            wan, SpeedConfig(vae_conv_out_gemm=True, vae_conv_pad=conv_pad, vae_channels_last=channels_last)
        )
        assert type(wan.model.decoder.conv_out) is TapSumCausalConv3d
        assert type(wan.model.encoder.conv_out) is (KernelPaddedCausalConv3d if conv_pad else WanCausalConv3d)
        fast = decode_encode(wan, video, latent)
    finally:
        apply_vae_switches(wan, SpeedConfig())
    assert max_diff(fast[0], stock[0]) <= TOL and torch.equal(fast[1], stock[1])  # the encoder is not touched
    assert type(wan.model.decoder.conv_out) is WanCausalConv3d


def causal_stream(net: torch.nn.Module, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """A Wan encoder or decoder run over consecutive time chunks of x with one feature cache (streaming)."""
    cache: list = [None] * sum(isinstance(m, WanCausalConv3d) for m in net.modules())
    outputs, start = [], 0
    for n in sizes:
        outputs.append(net(x[:, :, start : start + n], feat_cache=cache, feat_idx=[0]))
        start += n
    assert start == x.shape[2]
    return torch.cat(outputs, dim=2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_streamed_chunks_with_caches_equal_stock(wan, channels_last):
    """Chunks of several frames per call (the one-frame calls of diffusers' decode are covered above)."""
    g = torch.Generator().manual_seed(7)
    latent = torch.randn(1, 16, 6, 2, 3, generator=g)
    video = torch.rand(1, 3, 13, 16, 24, generator=g) * 2 - 1
    model = wan.model

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return causal_stream(model.decoder, latent, [1, 2, 3]), causal_stream(model.encoder, video, [1, 4, 8])

    stock = run()
    try:
        apply_vae_switches(wan, SpeedConfig(vae_conv_pad=True, vae_channels_last=channels_last))
        fast = run()
    finally:
        apply_vae_switches(wan, SpeedConfig())
    assert fast[0].shape[2] == 1 + 4 * 5 and fast[1].shape[2] == 1 + 1 + 2  # 4x in time, causal first frame
    assert max_diff(fast[0], stock[0]) <= TOL and max_diff(fast[1], stock[1]) <= TOL


# -- switching ---------------------------------------------------------------------------------------------------


def test_switch_is_per_model_and_restores_the_stock_forward():
    a, b = tiny_wan(0), tiny_wan(0)
    convs = [m for m in a.model.modules() if isinstance(m, WanCausalConv3d)]
    apply_vae_switches(a, SpeedConfig(vae_conv_pad=True))
    assert convs and all(type(m) is KernelPaddedCausalConv3d for m in convs)
    # The other model in this process, and diffusers' class itself, are untouched.
    assert all(type(m) is WanCausalConv3d for m in b.model.modules() if isinstance(m, WanCausalConv3d))
    assert WanCausalConv3d.forward is not KernelPaddedCausalConv3d.forward
    assert a.model.state_dict().keys() == b.model.state_dict().keys()
    apply_vae_switches(a, SpeedConfig())
    assert all(type(m) is WanCausalConv3d and m.forward.__func__ is WanCausalConv3d.forward for m in convs)


def test_conv_out_gemm_switches_back_to_the_padding_switch_class():
    vae = tiny_wan(0)
    conv_out = vae.model.decoder.conv_out
    apply_vae_switches(vae, SpeedConfig(vae_conv_out_gemm=True, vae_conv_pad=True))
    assert type(conv_out) is TapSumCausalConv3d
    assert sum(type(m) is KernelPaddedCausalConv3d for m in vae.model.modules()) > 0
    apply_vae_switches(vae, SpeedConfig(vae_conv_pad=True))
    assert type(conv_out) is KernelPaddedCausalConv3d
    other = tiny_wan(0)
    assert set_tap_sum(other.model, True) == 1 and type(vae.model.decoder.conv_out) is KernelPaddedCausalConv3d


def test_lite_vae_has_no_wan_convolutions():
    from _tiny import tiny_vae

    lite = tiny_vae("lite")
    before = {k: v.clone() for k, v in lite.state_dict().items()}
    assert set_kernel_padding(lite.model, True) == 0
    assert set_tap_sum(lite.model, True) == 0
    assert all(torch.equal(v, before[k]) for k, v in lite.state_dict().items())
