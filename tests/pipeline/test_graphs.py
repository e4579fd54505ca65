"""CUDA-graph replay of fixed-shape calls (flashhead.pipeline.graphs): where graphs are kept and when they are used.

The replays themselves need a GPU: tests/pipeline/test_gpu_graphs.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny import tiny_pipeline, tiny_vae
from _util import speech_16k
from flashhead.pipeline.fast_path import apply_vae_switches
from flashhead.pipeline.graphs import GraphedCall, graphed
from flashhead.pipeline.speed import SpeedConfig


def test_vae_switch_gives_the_vae_a_store_and_drops_it_again():
    vae = tiny_vae("pro")
    assert graphed(vae, "decode", vae.decode) == vae.decode  # never switched: the function itself
    apply_vae_switches(vae, SpeedConfig(vae_cuda_graphs=True))
    call = graphed(vae, "decode", vae.decode)
    assert isinstance(call, GraphedCall) and graphed(vae, "decode", vae.decode) is call  # one per name
    assert graphed(vae, "encode", vae.encode) is not call
    apply_vae_switches(vae, SpeedConfig(vae_cuda_graphs=True, compile_vae=True))
    assert graphed(vae, "decode", vae.decode) is not call  # graphs of other switches are not replayed
    apply_vae_switches(vae, SpeedConfig())
    assert graphed(vae, "decode", vae.decode) == vae.decode


def test_graphed_call_runs_cpu_tensors_directly():
    calls = []

    def fn(x, y, scale):
        calls.append(scale)
        return x * scale + y

    call = GraphedCall(fn, "fn")
    x, y = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(call(x, y, 2.0), x * 2 + y)
    assert calls == [2.0] and call.graphs == {}  # nothing captured on the CPU
    with pytest.raises(TypeError, match="tensors first"):
        call(x, 2.0, y)


class _Replayed:
    """Stands in for a captured graph on the CPU: replays `fn` with its settings and counts."""

    def __init__(self, fn, settings):
        self.fn, self.settings, self.replays = fn, settings, 0

    def replay(self, tensors):
        self.replays += 1
        return self.fn(*tensors, *self.settings)


class _CpuGraphedCall(GraphedCall):
    """GraphedCall's bookkeeping on the CPU: every tensor counts as graphable, capture gives a `_Replayed`."""

    @staticmethod
    def _graphable(tensors):
        return bool(tensors)

    def _capture(self, tensors, settings):
        return None if settings == ("refused",) else _Replayed(self.fn, settings)


def test_one_graph_per_signature_and_setting_up_to_a_bound(caplog):
    call = _CpuGraphedCall(lambda x, tag: x + len(tag), "fn", max_graphs=3)
    x = torch.zeros(2)
    for _ in range(3):
        torch.testing.assert_close(call(x, "a"), x + 1)
    assert len(call.graphs) == 1 and next(iter(call.graphs.values())).replays == 3  # captured once, replayed
    call(torch.zeros(3), "a")  # another shape
    call(torch.zeros(2, dtype=torch.float64), "a")  # another dtype
    assert len(call.graphs) == 3
    with caplog.at_level("INFO", logger="flashhead.pipeline.graphs"):
        torch.testing.assert_close(call(x, "bb"), x + 2)  # over the bound: run directly, nothing kept
        call(x, "ccc")
    assert len(call.graphs) == 3 and caplog.text.count("graphs kept") == 1
    call.reset()
    torch.testing.assert_close(call(x, "refused"), x + 7)  # a refused capture runs directly, and stays so
    torch.testing.assert_close(call(x, "refused"), x + 7)
    assert list(call.graphs.values()) == [None]


def test_optimized_preset_graphs_the_vae():
    assert SpeedConfig.optimized().vae_cuda_graphs and not SpeedConfig().vae_cuda_graphs
    assert SpeedConfig.parse("vae_cuda_graphs=off", base=SpeedConfig.optimized()).vae_cuda_graphs is False


@pytest.mark.parametrize("variant", ["pro", "lite"])
def test_stream_decodes_and_encodes_through_the_store(monkeypatch, variant):
    """With the switch on, a chunk's decode and motion encode go through the VAE's graphed calls (CPU: run
    directly, so the frames are the plain ones)."""
    from flashhead.pipeline.stream import StreamEngine

    pipe = tiny_pipeline(variant)[0]
    used = []
    original = GraphedCall.__call__

    def spy(self, *args):
        used.append(self.name.rsplit(".", 1)[-1])
        return original(self, *args)

    monkeypatch.setattr(GraphedCall, "__call__", spy)
    image = np.random.default_rng(0).integers(0, 256, (pipe.config.height, pipe.config.width, 3), dtype=np.uint8)
    frames = {}
    for switch in (False, True):
        pipe.optimize(SpeedConfig(vae_cuda_graphs=switch))
        engine = StreamEngine(pipe)
        session = engine.open_session(image, seed=1)
        session.push_audio(speech_16k(2 * pipe.new_frames / 25))
        session.end()
        frames[switch] = np.concatenate([c.frames for c in engine.run_until_idle()])
    pipe.optimize(SpeedConfig())
    encode = "encode_sampled" if variant == "lite" else "encode"  # the LTX encode samples with the stream's noise
    assert used.count("decode") >= 2 and used.count(encode) >= 2, used
    assert np.array_equal(frames[True], frames[False])
