"""compile_vae compiles both halves of either VAE (the encoder re-encodes every chunk's motion frames) and they
compute what the eager networks compute; switching it off restores the eager modules."""

from __future__ import annotations

import logging

import pytest
import torch

from _tiny import tiny_vae
from flashhead.pipeline import fast_path
from flashhead.pipeline.fast_path import _static_shapes_for_one_stream, apply_vae_switches, canonical_strides
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


class _SymbolLog(logging.Handler):
    """Counts the symbolic sizes Dynamo creates while it traces (symbolic_shapes' "create_symbol" records)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.symbols = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.symbols += record.getMessage().startswith("create_symbol")


@pytest.mark.slow
def test_one_stream_compiles_the_wan_vae_with_static_shapes():
    """vae_static_shapes: the Wan decoder, called per latent frame with caches of 0-2 frames, meets several shapes;
    by default Dynamo recompiles them with symbolic sizes, with the switch it traces them static. ~2 min on 2 CPU
    cores."""
    vae = tiny_vae("pro")
    latent = torch.randn((1, *vae.latent_shape(9, 64, 64)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = vae.decode(latent)
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    symbols = {}
    for static in (False, True):
        log, level = _SymbolLog(), logger.level
        logger.addHandler(log)
        logger.setLevel(logging.INFO)
        torch._dynamo.reset()
        apply_vae_switches(vae, SpeedConfig(compile_vae=True, vae_static_shapes=static))
        try:
            with torch.no_grad():
                decoded = vae.decode(latent)
            symbols[static] = log.symbols
        finally:
            logger.removeHandler(log)
            logger.setLevel(level)
            apply_vae_switches(vae, SpeedConfig())
            torch._dynamo.reset()
        torch.testing.assert_close(decoded, eager, rtol=0, atol=1e-4)
    assert symbols[False] > 0, "the default compile no longer meets symbolic sizes: the switch has nothing to do"
    assert symbols[True] == 0


def test_static_shapes_only_for_batch_one():
    """The wrapper turns Dynamo's automatic dynamic shapes off for batch-1 calls only, and passes arguments and
    results through."""
    seen = []

    class Net(torch.nn.Module):
        pass

    net = Net()
    net._compiled_call_impl = lambda x, *rest, **kw: (
        seen.append(torch._dynamo.config.automatic_dynamic_shapes) or (x.shape[0], rest, kw)
    )
    _static_shapes_for_one_stream(net)
    assert net._compiled_call_impl(torch.zeros(1, 3), 5, cache=None) == (1, (5,), {"cache": None})
    assert net._compiled_call_impl(torch.zeros(2, 3)) == (2, (), {})
    assert seen == [False, True]
    assert torch._dynamo.config.automatic_dynamic_shapes
    cache = [None, "Rep", torch.zeros(1, 2, 4, 3)[:, :, :2]]  # the Wan VAE's feature caches: entries get new strides
    net._compiled_call_impl(torch.zeros(1, 2, 3, 4, 4)[:, :, :1], feat_cache=cache)
    assert cache[:2] == [None, "Rep"] and cache[2].stride() == torch.empty(1, 2, 2, 3).stride()


def test_canonical_strides_give_one_layout_per_shape_without_copying_dense_tensors():
    """A slice keeps the strides of the tensor it was cut from, which Dynamo's guards compare: canonical_strides
    gives every tensor of a shape the same strides, as a view where the memory is already dense."""
    long_clip, short_clip = torch.randn(1, 3, 33, 8, 8), torch.randn(1, 3, 5, 8, 8)
    first_frames = [canonical_strides(c[:, :, :1]) for c in (long_clip, short_clip)]
    assert first_frames[0].stride() == first_frames[1].stride() == torch.empty(1, 3, 1, 8, 8).stride()
    groups = [canonical_strides(c[:, :, 1:5]) for c in (long_clip, short_clip)]  # dense in no layout: copied
    assert groups[0].stride() == groups[1].stride() and torch.equal(groups[0], long_clip[:, :, 1:5])
    assert torch.equal(first_frames[0], long_clip[:, :, :1])

    activation = torch.randn(1, 4, 4, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    cached = activation[:, :, -2:]  # a feature cache entry: the last two frames, batch stride of four frames
    fresh = torch.empty(1, 4, 2, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    assert cached.stride() != fresh.stride()
    assert canonical_strides(cached).stride() == fresh.stride()
    assert canonical_strides(cached).data_ptr() == cached.data_ptr() and torch.equal(canonical_strides(cached), cached)

    image = torch.randn(1, 3, 1, 8, 8).expand(-1, -1, 4, -1, -1)  # the reference clip: one frame repeated
    as_vae = canonical_strides(image, torch.channels_last_3d)
    assert as_vae.is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(as_vae, image)


@pytest.mark.parametrize("channels_last", [False, True])
def test_one_stream_traces_each_vae_cache_state_once(channels_last, monkeypatch):
    """With vae_static_shapes, the Wan VAE's graphs are one per cache state: the reference's 33-frame encode makes
    the encoder's three and a chunk's 5-frame motion re-encode reuses them (it traced two more, its input and
    caches having other strides); the decode makes the decoder's three, and its two-piece form reuses them. Dynamo's
    eager backend: what is counted is tracing, not Inductor."""
    from torch._dynamo.utils import counters

    vae = tiny_vae("pro")
    monkeypatch.setattr(fast_path, "_compile", lambda module, mode: module.compile(backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    switches = SpeedConfig(compile_vae=True, vae_static_shapes=True, vae_channels_last=channels_last,
                           vae_conv_pad=True, vae_subpixel_upsample=True)  # fmt: skip
    apply_vae_switches(vae, switches)
    graphs = []
    try:
        portrait = torch.rand(1, 3, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
        with torch.no_grad():
            latent = vae.encode(portrait.expand(-1, -1, 33, -1, -1))
            graphs.append(counters["stats"]["unique_graphs"])
            video = vae.decode(latent)
            graphs.append(counters["stats"]["unique_graphs"])
            pieces = list(vae.decode_in_pieces(latent, 2))
            motion = vae.encode(video[:, :, -5:])
            graphs.append(counters["stats"]["unique_graphs"])
    finally:
        apply_vae_switches(vae, SpeedConfig())
        torch._dynamo.reset()
    assert graphs == [3, 6, 6]
    with torch.no_grad():
        assert torch.equal(torch.cat(pieces, dim=2), video)
        torch.testing.assert_close(motion, vae.encode(video[:, :, -5:]), rtol=0, atol=1e-5)
