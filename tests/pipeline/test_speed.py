"""Speed switches on the CPU: each fast path computes what the plain path computes (GPU-only switches are
checked at full size by test_gpu_speed.py on the device)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from _tiny import tiny_dit, tiny_pipeline
from _util import psnr_uint8, speech_16k
from flashhead.errors import ConfigError
from flashhead.models.dit import apply_rope, rope_frequencies, rope_table
from flashhead.pipeline.fast_path import FastDenoiser
from flashhead.pipeline.flops import dit_forward_flops, peak_flops
from flashhead.pipeline.sampling import denoise_chunk
from flashhead.pipeline.scheduler import FlashHeadScheduler
from flashhead.pipeline.speed import SpeedConfig
from flashhead.pipeline.stream import StreamEngine

# -- switches --------------------------------------------------------------------------------------------


def test_optimized_attention_is_fa3_only_where_it_runs(monkeypatch):
    from flashhead.pipeline import speed as speed_module

    assert speed_module.fa3_available() is False  # no GPU here (and no FlashAttention-3)
    assert SpeedConfig.optimized().attention == "cudnn"
    monkeypatch.setattr(speed_module, "fa3_available", lambda: True)
    assert SpeedConfig.optimized().attention == "fa3"


def test_optimized_takes_the_cutlass_convolutions_only_where_they_run(monkeypatch):
    from flashhead.pipeline import speed as speed_module

    assert speed_module.cutlass_conv_available() is False  # no GPU here
    assert not SpeedConfig.optimized().vae_cutlass_conv and not SpeedConfig.optimized().vae_whole_chunk
    assert SpeedConfig.optimized().vae_call_frames == 0  # the per-frame loop has no calls to bound
    monkeypatch.setattr(speed_module, "cutlass_conv_available", lambda: True)
    optimized = SpeedConfig.optimized()
    assert optimized.vae_cutlass_conv and optimized.vae_conv_pad  # the pair the config requires
    # with the kernels' own time padding: compiled Pro chunk decode 153.5 -> 140.3 ms (H200, session 31); with
    # cuDNN's convolutions, which need a padded copy, no faster (session 29)
    assert optimized.vae_whole_chunk
    # ... in calls of 3 latent frames: the same frames, stream peak 29.5 -> 20.3 GiB for +2.7 ms (H200, session 33)
    assert optimized.vae_call_frames == 3


def test_fa3_runs_only_the_long_self_attentions(monkeypatch):
    """FA3 needs a Hopper GPU: a stand-in module records which shapes reach it (the rest go to torch SDPA)."""
    import sys
    import types

    from flashhead.models.dit import sdpa_kernel as sdpa
    from flashhead.pipeline.fast_path import FA3_MIN_TOKENS, fa3_kernel

    seen = []

    def flash_attn_func(q, k, v):
        seen.append(q.shape[1])
        return sdpa(q, k, v), None  # FA3 also returns the log-sum-exp

    monkeypatch.setitem(sys.modules, "flash_attn_interface", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    kernel = fa3_kernel()
    gen = torch.Generator().manual_seed(0)
    for tokens in (FA3_MIN_TOKENS - 256, FA3_MIN_TOKENS):
        q, k, v = (torch.randn(1, tokens, 2, 8, generator=gen) for _ in range(3))
        torch.testing.assert_close(kernel(q, k, v), sdpa(q, k, v))
    assert seen == [FA3_MIN_TOKENS]


def test_switches_parse_and_reject_bad_values():
    speed = SpeedConfig.parse("compile_dit=on, attention=cudnn,rope_table")
    assert speed.compile_dit and speed.rope_table and speed.attention == "cudnn" and not speed.cuda_graphs
    assert SpeedConfig.parse("cuda_graphs=off", base=SpeedConfig.optimized()).cuda_graphs is False
    assert SpeedConfig.from_dict(speed.to_dict()) == speed
    assert SpeedConfig().is_plain and not SpeedConfig().fast_denoiser
    optimized = SpeedConfig.optimized()
    assert not optimized.decode_new_only and not optimized.fp8  # only output-preserving switches
    assert optimized.vae_conv_pad and optimized.vae_channels_last  # Pro decode -19 % (docs/performance.md)
    assert optimized.vae_subpixel_upsample  # Pro decode 186.8 -> 177.2 ms per chunk (H100, session 22)
    assert optimized.vae_conv_out_gemm  # Pro compiled decode 172.2 -> 169.1 ms per chunk (H200, session 26)
    assert optimized.rope_fp32 and optimized.rope_table  # q / k norm + RoPE kernel 91.4 -> 70.4 us (H200, session 30)
    with pytest.raises(ConfigError, match="unknown speed switch"):
        SpeedConfig.parse("turbo=on")
    with pytest.raises(ConfigError, match="on or off"):
        SpeedConfig.parse("compile_dit=maybe")
    with pytest.raises(ConfigError, match="attention must be"):
        SpeedConfig(attention="xformers")
    with pytest.raises(ConfigError, match="cuda_graphs"):
        SpeedConfig(cuda_graphs=True, compile_mode="reduce-overhead")
    with pytest.raises(ConfigError, match="cudnn_benchmark on"):
        SpeedConfig.parse("cudnn_search_limit=0")
    with pytest.raises(ConfigError, match="whole number"):
        SpeedConfig.parse("cudnn_benchmark=on,cudnn_search_limit=all")
    with pytest.raises(ConfigError, match="0 .every algorithm. or more"):
        SpeedConfig.parse("cudnn_benchmark=on,cudnn_search_limit=-1")
    with pytest.raises(ConfigError, match="cudnn_search_all is now cudnn_search_limit"):
        SpeedConfig.parse("cudnn_search_all=on")
    assert SpeedConfig.parse("cudnn_benchmark=on,cudnn_search_limit=24").cudnn_search_limit == 24
    assert SpeedConfig.parse("vae_whole_chunk,vae_call_frames=3").vae_call_frames == 3
    with pytest.raises(ConfigError, match="vae_call_frames must be 0"):
        SpeedConfig.parse("vae_whole_chunk,vae_call_frames=-2")
    assert SpeedConfig.from_dict({"cudnn_benchmark": True, "cudnn_search_limit": 0}).cudnn_search_limit == 0
    with pytest.raises(ConfigError, match="cudnn_benchmark on"):
        SpeedConfig.optimized().replace(cudnn_benchmark=False)
    with pytest.raises(ConfigError, match="video_encoder must be"):
        SpeedConfig.parse("video_encoder=vp9")
    assert SpeedConfig.parse("video_encoder=h264_nvenc").video_encoder == "h264_nvenc"


def test_video_encoder_choices_are_the_writers():
    from flashhead.media.video_io import VIDEO_ENCODERS as WRITER_ENCODERS
    from flashhead.pipeline.speed import VIDEO_ENCODERS

    assert VIDEO_ENCODERS == WRITER_ENCODERS
    assert SpeedConfig().video_encoder == "libx264" and SpeedConfig.optimized().video_encoder == "auto"


@pytest.mark.parametrize("fa3, cutlass", [(False, False), (True, False), (True, True)])
def test_speed_matrix_ladder_ends_at_the_optimized_preset(fa3, cutlass, monkeypatch):
    """benchmarks/speed_matrix.py adds switches row by row; its "(all)" row must be what --optimized runs, also
    where the preset takes FlashAttention-3 and the CUTLASS convolutions."""
    from _util import load_benchmark
    from flashhead.pipeline import speed as speed_module

    monkeypatch.setattr(speed_module, "fa3_available", lambda: fa3)
    monkeypatch.setattr(speed_module, "cutlass_conv_available", lambda: cutlass)
    matrix = load_benchmark("speed_matrix")
    speed, rows = SpeedConfig(), {}
    for name, changes, sibling in matrix.ladder():
        assert name not in rows
        rows[name] = speed.replace(**changes)
        speed = speed if sibling else rows[name]
    assert rows["+cublaslt_no_workspace (all)"] == SpeedConfig.optimized()
    assert rows["+cublaslt_no_workspace (all)"].attention == ("fa3" if fa3 else "cudnn")
    assert "+vae_conv_pad" in rows and "+persistent_norms" in rows and "+rope_fp32" in rows
    assert ("+vae_cutlass_conv" in rows) == cutlass and ("+vae_whole_chunk" in rows) == cutlass


@pytest.mark.parametrize("fa3, cutlass", [(False, False), (True, True)])
def test_speed_matrix_grouped_ladder_ends_at_the_optimized_preset(fa3, cutlass, monkeypatch):
    """`speed_matrix.py --ladder groups`: every group adds something, no switch twice, and the "(all)" row is the
    preset; the CUTLASS group only where the preset takes it."""
    from _util import load_benchmark
    from flashhead.pipeline import speed as speed_module

    monkeypatch.setattr(speed_module, "fa3_available", lambda: fa3)
    monkeypatch.setattr(speed_module, "cutlass_conv_available", lambda: cutlass)
    matrix = load_benchmark("speed_matrix")
    speed, rows, seen = SpeedConfig(), {}, set()
    for name, changes, sibling in matrix.grouped_ladder():
        assert name not in rows and (changes or name == "plain") and not seen & changes.keys()
        seen |= changes.keys() if not sibling else set()
        rows[name] = speed.replace(**changes)
        speed = speed if sibling else rows[name]
    (all_row,) = [name for name in rows if name.endswith("(all)")]
    assert rows[all_row] == SpeedConfig.optimized() and 8 <= len(rows) <= 12
    assert ("+CUTLASS convolutions, whole chunks" in rows) == cutlass
    assert rows["all +fp8"].fp8 and not rows["all +decode_new_only"].fp8


def test_cublaslt_no_workspace_is_set_in_the_process_environment(monkeypatch):
    """torch reads CUBLASLT_WORKSPACE_SIZE at the first GEMM; the switch sets it, a value already there stays."""
    from flashhead.pipeline.speed import CUBLASLT_WORKSPACE_ENV, apply_process_settings

    monkeypatch.setenv(CUBLASLT_WORKSPACE_ENV, "placeholder")  # restored (to absent) after the test
    monkeypatch.delenv(CUBLASLT_WORKSPACE_ENV)
    apply_process_settings(SpeedConfig.optimized().replace(cublaslt_no_workspace=False))
    assert CUBLASLT_WORKSPACE_ENV not in os.environ
    apply_process_settings(SpeedConfig.optimized())
    assert os.environ[CUBLASLT_WORKSPACE_ENV] == "0"
    monkeypatch.setenv(CUBLASLT_WORKSPACE_ENV, "4096")
    apply_process_settings(SpeedConfig.optimized())
    assert os.environ[CUBLASLT_WORKSPACE_ENV] == "4096"


def test_cudnn_search_limit_is_set_and_undone(lite):
    """cuDNN's search limit (benchmark_limit: algorithms timed per shape; 0 all) is set with the switch and
    torch's default comes back without it; the optimized preset searches the first 32."""
    from flashhead.pipeline.fast_path import TORCH_CUDNN_BENCHMARK_LIMIT

    try:
        for limit in (0, 32):
            lite.optimize(SpeedConfig(cudnn_benchmark=True, cudnn_search_limit=limit))
            assert torch.backends.cudnn.benchmark and torch.backends.cudnn.benchmark_limit == limit
        lite.optimize(SpeedConfig(cudnn_benchmark=True))
        assert torch.backends.cudnn.benchmark_limit == TORCH_CUDNN_BENCHMARK_LIMIT == 10
    finally:
        lite.optimize(SpeedConfig())
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.benchmark_limit == 10
    assert SpeedConfig.optimized().cudnn_search_limit == 32


# -- RoPE table ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(5, 16, 16), (9, 32, 32)])  # the Lite and Pro token grids at 512 px
def test_rope_table_matches_the_complex_path(grid):
    head_dim = 128
    phasors = rope_frequencies(head_dim, grid, torch.device("cpu"))
    table = rope_table(head_dim, grid, torch.device("cpu"))
    assert table.dtype == torch.float64 and table.shape == (*phasors.shape, 2, 2)
    x = torch.randn(1, phasors.shape[0], 2, head_dim, generator=torch.Generator().manual_seed(0))
    exact, fast = apply_rope(x, phasors), apply_rope(x, table)
    assert (fast - exact).abs().max() < 1e-6 * x.abs().max()
    # In bfloat16 (the inference dtype) the real float64 rotation rounds exactly like the complex one: a
    # float32 rotation flipped ~0.5 % of the roundings, which random-weight networks amplify to ~35 dB PSNR.
    xb = x.bfloat16()
    assert torch.equal(apply_rope(xb, phasors), apply_rope(xb, table))


def test_rope_fp32_rotates_in_float32_and_needs_the_table():
    """rope_fp32: the same table rounded to float32, the rotation then in float32 (few bf16 roundings differ)."""
    grid, head_dim = (9, 32, 32), 128
    table64 = rope_table(head_dim, grid, torch.device("cpu"))
    table32 = rope_table(head_dim, grid, torch.device("cpu"), torch.float32)
    assert table32.dtype == torch.float32 and torch.equal(table32, table64.float())
    x = torch.randn(1, table64.shape[0], 12, head_dim, generator=torch.Generator().manual_seed(1)).bfloat16()
    exact, fast = apply_rope(x, table64), apply_rope(x, table32)
    assert fast.dtype == torch.bfloat16
    flipped = (fast != exact).float().mean().item()
    assert 0 < flipped < 0.02  # the last bf16 bit of a few values: the switch is not exact, and nothing more
    _, exponent = torch.frexp(exact.float())
    ulp = torch.ldexp(torch.ones_like(exact, dtype=torch.float32), exponent - 8)  # bf16 spacing at each value
    assert ((fast.float() - exact.float()).abs() <= ulp + 1e-6 * x.float().abs().max()).all()  # one ulp at most
    with pytest.raises(ConfigError, match="rope_table"):
        SpeedConfig(rope_fp32=True)


def test_fast_denoiser_takes_the_float32_table_with_rope_fp32():
    dit = tiny_dit("pro")
    grid = (3, 2, 2)
    for speed, dtype in ((SpeedConfig(rope_table=True), torch.float64),
                         (SpeedConfig(rope_table=True, rope_fp32=True), torch.float32)):  # fmt: skip
        assert FastDenoiser(dit, speed).rope(grid, torch.device("cpu")).dtype == dtype
    scheduler = FlashHeadScheduler()
    scheduler.set_timesteps(4)
    inputs = chunk_inputs(dit, batch=1)
    with torch.no_grad():
        exact = FastDenoiser(dit, SpeedConfig(rope_table=True, cond_cache=True))(
            scheduler, euler=False, motion_lengths=[2], **inputs)  # fmt: skip
        fast = FastDenoiser(dit, SpeedConfig(rope_table=True, rope_fp32=True, cond_cache=True))(
            scheduler, euler=False, motion_lengths=[2], **inputs)  # fmt: skip
    torch.testing.assert_close(fast, exact, rtol=1e-4, atol=1e-4)  # float32 weights: float32 is plenty


def test_compiled_rope_keeps_no_float64_buffer():
    """Compiled, the table's rotation stays inside the norm kernel: no float64 tensor of the q / k size is written
    (with the old interleaving stack Inductor wrote the rotated pairs in float64 and read them back: 74 + 66 us
    of a 2-GPU Pro layer on H100). CPU Inductor; the GPU's Triton code is built from the same graph."""
    from torch._inductor.utils import run_and_get_code

    from flashhead.models.dit import SelfAttention

    torch.manual_seed(0)
    attn = SelfAttention(64, 4, 1e-6).to(torch.bfloat16)
    x = torch.randn(1, 48, 64, dtype=torch.bfloat16)
    table = rope_table(16, (3, 4, 4), torch.device("cpu"))
    with torch.no_grad():
        expected = attn(x, table)
        got, code = run_and_get_code(torch.compile(attn), x, table)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2)
    allocations = [line for line in "\n".join(code).splitlines() if "empty_strided" in line]
    assert allocations and not [a for a in allocations if "float64" in a], allocations


# -- the fast denoiser --------------------------------------------------------------------------------------


def chunk_inputs(dit, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = dit.config
    F, H, W = 3, 2 * cfg.patch_size[1], 2 * cfg.patch_size[2]
    shape = (batch, cfg.out_dim, F, H, W)
    context = torch.randn(batch, 1 + cfg.vae_stride[0] * (F - 1), cfg.audio_window, cfg.audio_layers,
                          cfg.audio_channels, generator=g)  # fmt: skip
    return {
        "latents": torch.randn(shape, generator=g),
        "motion_latents": torch.randn(batch, cfg.out_dim, 2, H, W, generator=g),
        "ref_latents": torch.randn(shape, generator=g),
        "audio_context": context,
        "renoise": [torch.randn(shape, generator=g) for _ in range(4)],
    }


@pytest.mark.parametrize("variant", ["lite", "pro"])
@pytest.mark.parametrize("euler", [False, True])
def test_fast_denoiser_equals_the_plain_loop(variant, euler):
    dit = tiny_dit(variant)
    scheduler = FlashHeadScheduler()
    scheduler.set_timesteps(4)
    inputs = chunk_inputs(dit, batch=3)
    lengths = [1, 2, 2]  # a first chunk batched with two later ones
    with torch.no_grad():
        plain = denoise_chunk(dit, scheduler, **inputs, euler=euler, motion_lengths=lengths)
        for speed in (SpeedConfig(cond_cache=True), SpeedConfig(rope_table=True, cond_cache=True, attention="math")):
            fast = FastDenoiser(dit, speed)(scheduler, euler=euler, motion_lengths=lengths, **inputs)
            torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)
            assert torch.equal(fast[0, :, :1], inputs["motion_latents"][0, :, :1])  # motion frames pinned
            assert torch.equal(fast[1, :, :2], inputs["motion_latents"][1, :, :2])


@pytest.mark.slow  # inductor's C++ compile of one block takes ~40 s on 2 cores
def test_compiled_blocks_equal_eager():
    dit = tiny_dit("lite")
    scheduler = FlashHeadScheduler()
    scheduler.set_timesteps(4)
    inputs = chunk_inputs(dit, batch=1)
    with torch.no_grad():
        eager = FastDenoiser(dit, SpeedConfig(rope_table=True, cond_cache=True))(
            scheduler, euler=False, motion_lengths=[2], **inputs
        )
        from flashhead.pipeline.fast_path import apply_module_switches

        apply_module_switches(dit, torch.nn.Module(), SpeedConfig(compile_dit=True, rope_table=True))
        assert all(block._compiled_call_impl is not None for block in dit.blocks)
        compiled = FastDenoiser(dit, SpeedConfig(rope_table=True, cond_cache=True, compile_dit=True))(
            scheduler, euler=False, motion_lengths=[2], **inputs
        )
        apply_module_switches(dit, torch.nn.Module(), SpeedConfig())
        assert all(block._compiled_call_impl is None for block in dit.blocks)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


# -- whole pipeline and engine ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite():
    pipe, _, _ = tiny_pipeline("lite")
    return pipe


def run_stream(pipe, speed: SpeedConfig, audio: np.ndarray, image: np.ndarray) -> np.ndarray:
    pipe.optimize(speed)
    try:
        engine = StreamEngine(pipe)
        session = engine.open_session(image, seed=3)
        session.push_audio(audio)
        session.end()
        chunks = engine.run_until_idle()
    finally:
        pipe.optimize(SpeedConfig())
    return np.concatenate([c.frames for c in chunks])


def test_engine_with_cpu_switches_gives_the_plain_frames(lite):
    audio = speech_16k(1.5)
    image = np.random.default_rng(0).integers(0, 256, (lite.config.height, lite.config.width, 3), dtype=np.uint8)
    plain = run_stream(lite, SpeedConfig(), audio, image)
    assert len(plain) == round(1.5 * 25)
    # Noise drawn ahead of time (pinned_memory), audio prefetch (a no-op without CUDA), cached conditioning
    # and the RoPE table: the same frames up to float rounding.
    fast = run_stream(lite, SpeedConfig(rope_table=True, cond_cache=True, pinned_memory=True, audio_stream=True),
                      audio, image)  # fmt: skip
    assert fast.shape == plain.shape
    assert psnr_uint8(fast, plain) > 50
    # Noise drawn ahead alone changes nothing at all: the same numbers in the same order.
    assert np.array_equal(run_stream(lite, SpeedConfig(pinned_memory=True), audio, image), plain)
    assert lite.speed.is_plain and lite._fast is None


def test_audio_tf32_switch_reaches_the_wav2vec2_encoder(lite):
    """`optimize` hands audio_tf32 to the pipeline's wav2vec2 encoder and takes it back with the plain path."""
    speed = SpeedConfig(audio_tf32=True)
    assert speed.to_dict()["audio_tf32"] and SpeedConfig.parse("audio_tf32=on") == speed
    assert SpeedConfig.optimized().audio_tf32
    lite.optimize(speed)
    assert lite.audio_encoder.tf32_matmuls
    lite.optimize(SpeedConfig())
    assert not lite.audio_encoder.tf32_matmuls


def test_first_chunk_noise_is_drawn_when_the_session_opens(lite, monkeypatch):
    """pinned_memory: a session's first noise is drawn at open_session, so its first launch (between the first audio
    features and the first DiT, i.e. inside the time to first frame) draws none; the frames stay the plain path's."""
    audio = speech_16k(1.0)
    image = np.random.default_rng(4).integers(0, 256, (lite.config.height, lite.config.width, 3), dtype=np.uint8)
    plain = run_stream(lite, SpeedConfig(), audio, image)
    lite.optimize(SpeedConfig(pinned_memory=True))
    try:
        engine = StreamEngine(lite)
        session = engine.open_session(image, seed=3)
        assert session.noise_ahead is not None
        events = []
        draw, chunks_of = lite.draw_noise, lite.generate_chunks
        monkeypatch.setattr(lite, "draw_noise", lambda *a, **kw: events.append("draw") or draw(*a, **kw))
        monkeypatch.setattr(lite, "generate_chunks", lambda *a, **kw: events.append("chunk") or chunks_of(*a, **kw))
        session.push_audio(audio)
        session.end()
        chunks = engine.run_until_idle()
    finally:
        lite.optimize(SpeedConfig())
    assert np.array_equal(np.concatenate([c.frames for c in chunks]), plain)
    # Each launch finds its noise drawn: the first at open_session, each later one during the launch before it.
    assert events[0] == "chunk" and events.count("chunk") == len(chunks) > 1
    assert "draw, draw" not in ", ".join(events)


def test_vae_channels_last_switch_sets_and_restores_the_layout(lite):
    convs = [m for m in lite.vae.model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs
    audio = speech_16k(1.0)
    image = np.random.default_rng(2).integers(0, 256, (lite.config.height, lite.config.width, 3), dtype=np.uint8)
    plain = run_stream(lite, SpeedConfig(), audio, image)
    lite.optimize(SpeedConfig(vae_channels_last=True))
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last_3d) for c in convs)
    assert not all(c.weight.is_contiguous() for c in convs)
    lite.optimize(SpeedConfig())
    assert all(c.weight.is_contiguous() for c in convs)
    # The same convolutions in another memory layout: the frames up to float rounding.
    assert psnr_uint8(run_stream(lite, SpeedConfig(vae_channels_last=True), audio, image), plain) > 50


def test_vae_conv_pad_keeps_the_pro_frames():
    """The Wan2.1 (Pro) VAE with spatial padding inside the conv kernels: decode and motion re-encode alike."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    from flashhead.models.vae.wan_conv import KernelPaddedCausalConv3d

    pro = tiny_pipeline("pro")[0]
    convs = [m for m in pro.vae.model.modules() if isinstance(m, WanCausalConv3d)]
    pro.optimize(SpeedConfig(vae_conv_pad=True))
    assert convs and all(type(c) is KernelPaddedCausalConv3d for c in convs)
    pro.optimize(SpeedConfig())
    assert all(type(c) is WanCausalConv3d for c in convs)
    audio = speech_16k(1.0)  # two chunks: the second one starts from re-encoded motion frames
    image = np.random.default_rng(2).integers(0, 256, (pro.config.height, pro.config.width, 3), dtype=np.uint8)
    plain = run_stream(pro, SpeedConfig(), audio, image)
    assert len(plain) == 25
    for speed in (SpeedConfig(vae_conv_pad=True), SpeedConfig(vae_conv_pad=True, vae_channels_last=True)):
        assert psnr_uint8(run_stream(pro, speed, audio, image), plain) >= 40


def assert_pro_frames_kept(seed: int, speeds: tuple[SpeedConfig, ...], installed=lambda pro: None):
    """The tiny Pro pipeline's two-chunk stream under each of `speeds` is the plain stream's (>= 40 dB); `installed`
    checks the switched pipeline before each run. Returns the pipeline, switched back to plain."""
    pro = tiny_pipeline("pro")[0]
    audio = speech_16k(1.0)
    image = np.random.default_rng(seed).integers(0, 256, (pro.config.height, pro.config.width, 3), dtype=np.uint8)
    plain = run_stream(pro, SpeedConfig(), audio, image)
    for speed in speeds:
        pro.optimize(speed)
        installed(pro)
        frames = run_stream(pro, speed, audio, image)
        assert frames.shape == plain.shape and psnr_uint8(frames, plain) >= 40
    pro.optimize(SpeedConfig())
    return pro


def test_vae_subpixel_upsample_keeps_the_pro_frames():
    """Sub-pixel upsampling in the Pro decoder, alone and with the other layout switches; Lite has no such layer."""
    from flashhead.models.vae.wan_resample import TraceableWanResample

    pro = tiny_pipeline("pro")[0]
    pro.optimize(SpeedConfig(vae_subpixel_upsample=True))
    ups = [m for m in pro.vae.model.modules() if isinstance(m, TraceableWanResample)]
    assert ups and all(m.subpixel == "transpose" for m in ups)
    pro.optimize(SpeedConfig())
    assert all(getattr(m, "subpixel", None) is None and "subpixel_weight" not in m._buffers for m in ups)
    assert_pro_frames_kept(3, (
        SpeedConfig(vae_subpixel_upsample=True),
        SpeedConfig(vae_subpixel_upsample=True, vae_conv_pad=True, vae_channels_last=True),
    ))  # fmt: skip
    lite = tiny_pipeline("lite")[0]
    lite.optimize(SpeedConfig(vae_subpixel_upsample=True))
    assert not any(getattr(m, "subpixel", None) for m in lite.vae.model.modules())
    lite.optimize(SpeedConfig())


def test_vae_conv_out_gemm_keeps_the_pro_frames():
    """The decoder's output convolution as a GEMM + tap sum, eager and compiled with the shipped VAE switches."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    from flashhead.models.vae.wan_conv import TapSumCausalConv3d

    def installed(pro) -> None:
        assert type(pro.vae.model.decoder.conv_out) is TapSumCausalConv3d

    pro = assert_pro_frames_kept(4, (
        SpeedConfig(vae_conv_out_gemm=True),
        SpeedConfig(vae_conv_out_gemm=True, vae_conv_pad=True, vae_channels_last=True, compile_vae=True,
                    vae_static_shapes=True),
    ), installed)  # fmt: skip
    assert type(pro.vae.model.decoder.conv_out) is WanCausalConv3d
    lite = tiny_pipeline("lite")[0]
    lite.optimize(SpeedConfig(vae_conv_out_gemm=True))
    assert not any(isinstance(m, TapSumCausalConv3d) for m in lite.vae.model.modules())
    lite.optimize(SpeedConfig())


def test_vae_attention_gemm_keeps_the_pro_frames():
    """The decoder's middle-block attention as two GEMMs, eager and compiled with the shipped VAE switches."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock

    from flashhead.models.vae.wan_attention import GemmWanAttentionBlock

    def installed(pro) -> None:
        assert type(pro.vae.model.decoder.mid_block.attentions[0]) is GemmWanAttentionBlock

    pro = assert_pro_frames_kept(6, (
        SpeedConfig(vae_attention_gemm=True),
        SpeedConfig(vae_attention_gemm=True, vae_conv_pad=True, vae_channels_last=True, vae_subpixel_upsample=True,
                    vae_conv_out_gemm=True, compile_vae=True, vae_static_shapes=True),
    ), installed)  # fmt: skip
    assert type(pro.vae.model.decoder.mid_block.attentions[0]) is WanAttentionBlock
    lite = tiny_pipeline("lite")[0]
    lite.optimize(SpeedConfig(vae_attention_gemm=True))
    assert not any(isinstance(m, GemmWanAttentionBlock) for m in lite.vae.model.modules())
    lite.optimize(SpeedConfig())


def test_vae_whole_chunk_keeps_the_pro_frames():
    """The Wan decoder over all latent frames at once: the stream's frames as with the per-frame loop, eager and
    compiled with the shipped VAE switches; off again, the loop is back (the two-piece decode: tests/models)."""
    call_frames = iter([0, 2, 0])

    def installed(pro) -> None:
        assert pro.vae.whole_chunk and pro.vae.call_frames == next(call_frames)

    pro = assert_pro_frames_kept(5, (
        SpeedConfig(vae_whole_chunk=True),
        SpeedConfig(vae_whole_chunk=True, vae_call_frames=2),  # bounded calls (tests/models/test_wan_whole_chunk)
        SpeedConfig(vae_whole_chunk=True, vae_conv_pad=True, vae_channels_last=True, vae_subpixel_upsample=True,
                    vae_conv_out_gemm=True, compile_vae=True, vae_static_shapes=True),
    ), installed)  # fmt: skip
    assert not pro.vae.whole_chunk and pro.vae.call_frames == 0
    lite = tiny_pipeline("lite")[0]
    lite.optimize(SpeedConfig(vae_whole_chunk=True))  # the LTX VAE decodes whole chunks already: nothing to switch
    assert not hasattr(lite.vae, "whole_chunk")
    lite.optimize(SpeedConfig())


def test_decode_new_only_keeps_the_frame_count(lite):
    """decode_new_only is approximate (docs/performance.md); here: the emitted frames are all there."""
    audio = speech_16k(1.0)
    image = np.random.default_rng(1).integers(0, 256, (lite.config.height, lite.config.width, 3), dtype=np.uint8)
    plain = run_stream(lite, SpeedConfig(), audio, image)
    tail = run_stream(lite, SpeedConfig(decode_new_only=True), audio, image)
    assert tail.shape == plain.shape
    lite.optimize(SpeedConfig(decode_new_only=True))
    try:
        reference = lite.encode_reference(image, generator=torch.Generator().manual_seed(0))
        ctx = torch.zeros(1, 33, 5, lite.dit.config.audio_layers, lite.dit.config.audio_channels)
        result = lite.generate_chunks([reference], [reference.first_motion], [ctx])[0]
        full = lite.generate_chunks([reference], [reference.first_motion], [ctx], new_only=False)[0]
    finally:
        lite.optimize(SpeedConfig())
    st = lite.temporal_stride
    assert result.first_frame == st and result.video.shape[2] == lite.config.frame_num - st
    assert full.first_frame == 0 and full.video.shape[2] == lite.config.frame_num
    assert result.frames_from(lite.motion_frames).shape[2] == lite.new_frames
    with pytest.raises(ValueError, match="not decoded"):
        result.frames_from(0)


# -- FLOPs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lite", "pro"])
def test_flop_formula_matches_torch_flop_counter(variant):
    dit = tiny_dit(variant)
    cfg = dit.config
    latent = (3, 4 * cfg.patch_size[1], 4 * cfg.patch_size[2])
    inputs = chunk_inputs(dit, batch=2)
    x = torch.randn(2, cfg.out_dim, *latent)
    context = inputs["audio_context"]
    # The math SDPA backend is made of matrix products the counter sees (the fused CPU kernel is not counted).
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        dit(x, torch.tensor([900.0, 300.0]), context, torch.randn_like(x))
    assert counter.get_total_flops() == dit_forward_flops(cfg, latent, batch=2)
    terms = dit_forward_flops(cfg, latent, batch=2, by_term=True)
    assert terms["ffn"] > 0 and math.isclose(sum(terms.values()), dit_forward_flops(cfg, latent, batch=2))


def test_full_size_flops_and_peaks():
    from flashhead.models.dit import official_config

    lite = dit_forward_flops(official_config("lite"), (5, 16, 16))
    pro = dit_forward_flops(official_config("pro"), (9, 64, 64))
    assert 3.4e12 < lite < 3.8e12 and 3.8e13 < pro < 4.1e13  # docs/performance.md quotes these
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("some other card") is None


@pytest.mark.parametrize("variant", ["lite", "pro"])
def test_vae_flops_are_counted_on_a_meta_copy_as_the_real_vae_runs_them(variant):
    """flops.vae_flops: the meta-device copy's count equals the count of the real (tiny) VAE's decode and motion
    re-encode, and it leaves the real one untouched; the full-size VAEs are counted without their weights."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from flashhead.benchmark import BenchSettings, build_pipeline
    from flashhead.pipeline.flops import vae_flops

    pipe, _, _ = tiny_pipeline(variant)
    cfg, vae = pipe.config, pipe.vae
    latent_shape = vae.latent_shape(cfg.frame_num, cfg.height, cfg.width)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    counted = vae_flops(vae, latent_shape, pipe.motion_frames, cfg.height, cfg.width)
    # The math SDPA backend (Wan's middle attention), as on the meta device: the fused CPU kernel is not counted.
    with torch.no_grad(), FlopCounterMode(display=False) as decode, sdpa_kernel([SDPBackend.MATH]):
        vae.decode(torch.randn(1, *latent_shape))
    with torch.no_grad(), FlopCounterMode(display=False) as encode, sdpa_kernel([SDPBackend.MATH]):
        vae.encode(torch.rand(1, 3, pipe.motion_frames, cfg.height, cfg.width) * 2 - 1)
    assert counted == {"vae_decode": decode.get_total_flops(), "vae_encode_motion": encode.get_total_flops()}
    assert counted["vae_decode"] > counted["vae_encode_motion"] > 0
    assert all(torch.equal(before[k], v) and v.device.type == "cpu" for k, v in vae.state_dict().items())
    # Full size, 512 x 512 (docs/performance.md quotes these): Lite's LTX decode ~7.7 TFLOP a chunk, Pro's Wan ~74.
    full, _ = build_pipeline(BenchSettings(model=variant, device="meta", dtype="bfloat16"))
    fcfg = full.config
    flops = vae_flops(full.vae, full.vae.latent_shape(fcfg.frame_num, 512, 512), full.motion_frames, 512, 512)
    low, high = {"lite": (7.0e12, 8.5e12), "pro": (6.5e13, 8.0e13)}[variant]
    assert low < flops["vae_decode"] < high and 0 < flops["vae_encode_motion"] < flops["vae_decode"] / 3


def test_cold_start_rows_split_the_start_and_a_profiled_one_leaves_its_stats(tmp_path):
    """benchmarks/speed_matrix.py's cold start in a fresh process (tiny models, CPU): its marks come in order, the
    session's opening among them, and a profiled start writes cProfile stats with the import and compile times."""
    import pstats
    from pathlib import Path

    from _util import load_benchmark

    matrix = load_benchmark("speed_matrix")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "FLASHHEAD_MATRIX_SMOKE": "1",
           "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root / "tests")])}  # fmt: skip
    profile = tmp_path / "cold_lite.pstats"
    row = matrix.spawn_cold_start("lite", {"rope_table": True}, env, 300, "cold_start (profiled)", profile)
    marks = ["python_started_s", "imports_done_s", "model_built_s", "optimized_s", "session_opened_s", "first_frame_s"]
    assert [row[m] for m in marks] == sorted(row[m] for m in marks), row
    stats = pstats.Stats(str(profile))
    assert any(name == "step" for _, _, name in stats.stats)  # the engine's first step ran under the profiler
    assert "import time:" in profile.with_suffix(".stderr.txt").read_text()


@pytest.mark.parametrize("fa3, cutlass", [(False, False), (True, True)])
def test_to_text_is_what_parse_reads_back(fa3, cutlass, monkeypatch):
    """to_text writes every switch parse understands, the whole numbers too (sp_bench passed the preset to torchrun as
    text, and a bare `cudnn_search_limit` read back as 'on' stopped its 2-GPU run on the device)."""
    from _util import load_benchmark
    from flashhead.pipeline import speed as speed_module

    monkeypatch.setattr(speed_module, "fa3_available", lambda: fa3)
    monkeypatch.setattr(speed_module, "cutlass_conv_available", lambda: cutlass)
    optimized = SpeedConfig.optimized()
    text = optimized.to_text()
    assert "cudnn_search_limit=32" in text and ("vae_call_frames=3" in text) == cutlass
    assert SpeedConfig.parse(text) == optimized
    assert SpeedConfig().to_text() == ""
    fewer = optimized.replace(cuda_graphs=False, audio_stream=False)
    assert fewer.to_text(base=optimized) == "cuda_graphs=off,audio_stream=off"
    assert SpeedConfig.parse(fewer.to_text(base=optimized), base=optimized) == fewer
    assert SpeedConfig.parse(load_benchmark("sp_bench").SPEEDS["optimized"]) == optimized
