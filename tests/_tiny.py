"""Tiny random-weight networks of the official fixtures, built through our public loaders.

The parity fixtures store the official tiny networks by their official names; these helpers load them
into our classes so that any test can run the whole pipeline on CPU in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from transformers import Wav2Vec2Config, Wav2Vec2Model

from _util import load_fixture, prefixed
from flashhead.models import FlashHeadDiT
from flashhead.models.audio import Wav2VecEncoder
from flashhead.models.dit import audio_config_from_official
from flashhead.models.vae import LTXVideoVAE, VideoVAE, WanVideoVAE


def tiny_dit(variant: str) -> FlashHeadDiT:
    weights, meta = load_fixture(f"parity_dit_{variant}_tiny")
    cfg = dict(meta["config"]) | audio_config_from_official(meta["audio_proj_override"]["kwargs"], meta["config"])
    dit = FlashHeadDiT.from_config(cfg).eval()
    missing, unexpected = dit.load_state_dict(prefixed(weights, "weights/"), strict=False)
    assert not unexpected and all(k.startswith("audio_emb.") for k in missing)
    return dit


def tiny_vae(variant: str) -> VideoVAE:
    t, meta = load_fixture(f"pipeline_{variant}_tiny")
    if variant == "lite":
        return LTXVideoVAE.from_native_state_dict(prefixed(t, "vae/"), meta["vae_config"], strict_config=False)
    config = {k: v for k, v in meta["vae_config"].items() if k != "wrapper"}  # "wrapper" is a note
    return WanVideoVAE.from_official_state_dict(prefixed(t, "vae/"), config)


def tiny_audio_encoder() -> Wav2VecEncoder:
    t, meta = load_fixture("wav2vec_features_tiny")
    model = Wav2Vec2Model(Wav2Vec2Config(**meta["wav2vec2_config"]))
    model.load_state_dict(prefixed(t, "weights/"), strict=True)
    return Wav2VecEncoder(model)


def tiny_pipeline(variant: str, **config_changes):
    """(pipeline, fixture tensors, fixture params) at the fixture's output size."""
    from flashhead.pipeline.config import GenerationConfig
    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline

    t, meta = load_fixture(f"pipeline_{variant}_tiny")
    p = meta["params"]
    config = GenerationConfig(height=p["target_size"][0], width=p["target_size"][1], shift=p["shift"])
    pipe = FlashHeadPipeline(
        tiny_dit(variant), tiny_vae(variant), tiny_audio_encoder(), config=config.replace(**config_changes)
    )
    pipe.name = f"tiny-{variant}"
    return pipe, t, p


@contextmanager
def compiled_vae_switches(vae: VideoVAE) -> Iterator[dict]:
    """compile_vae with both layout switches on `vae`, from a fresh Dynamo state; yields Dynamo's "stats"
    counters (e.g. unique_graphs) counted from here; the switches and Dynamo are reset afterwards."""
    import torch
    from torch._dynamo.utils import counters

    from flashhead.pipeline.fast_path import apply_vae_switches
    from flashhead.pipeline.speed import SpeedConfig

    torch._dynamo.reset()
    counters.clear()
    apply_vae_switches(vae, SpeedConfig(vae_conv_pad=True, vae_channels_last=True, compile_vae=True))
    try:
        yield counters["stats"]
    finally:
        apply_vae_switches(vae, SpeedConfig())
        torch._dynamo.reset()


def eager_and_compiled_block(model: FlashHeadDiT, rope_dtype=None, fullgraph: bool = True):
    """Run the first block of `model` eagerly and compiled (static shapes, from a fresh Dynamo state) on seeded
    inputs at a small token grid (2 frames of 2 x 4 tokens); returns (eager, compiled, Inductor's generated code).
    With fullgraph, a graph break raises. rope_dtype: the RoPE table's dtype (None: the model's default)."""
    import torch
    from torch._inductor.utils import run_and_get_code

    block = model.blocks[0]
    torch.manual_seed(0)
    n_frames, dim = 2, model.config.dim
    x = torch.randn(1, n_frames * 8, dim)
    audio = torch.randn(1, n_frames, model.config.audio_tokens, dim)
    t_mod = torch.randn(1, 6, dim)
    table = {} if rope_dtype is None else {"dtype": rope_dtype}
    rope = model.rope((n_frames, 2, 4), x.device, table=True, **table)
    with torch.no_grad():
        eager = block(x, audio, t_mod, rope)
        torch._dynamo.reset()
        compiled_block = torch.compile(block, dynamic=False, fullgraph=fullgraph)
        compiled, codes = run_and_get_code(compiled_block, x, audio, t_mod, rope)
    torch._dynamo.reset()
    return eager, compiled, "\n".join(codes)
