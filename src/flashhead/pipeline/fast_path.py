"""The fast inference path behind `SpeedConfig`: a fixed-shape denoiser, CUDA graphs, compile, attention, FP8.

`FastDenoiser` computes what `sampling.denoise_chunk` computes (distilled or Euler steps, motion frames
pinned, no guidance) with every per-chunk constant hoisted out of the loop: RoPE table, timestep
embeddings for the fixed steps, audio tokens. Its loop body is pure tensor work with no host
synchronisation, so with `cuda_graphs` the whole chunk is captured once per batch size and replayed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence

import torch

from flashhead.errors import ConfigError
from flashhead.models.dit import FlashHeadDiT, sdpa_kernel
from flashhead.models.vae.wan_attention import set_attention_gemm
from flashhead.models.vae.wan_conv import set_cutlass_conv, set_kernel_padding, set_tap_sum
from flashhead.models.vae.wan_resample import set_subpixel_upsample, set_traceable_resample
from flashhead.pipeline.graphs import CapturedGraph
from flashhead.pipeline.scheduler import FlashHeadScheduler
from flashhead.pipeline.speed import (  # noqa: F401 (the two limits: re-exported)
    TORCH_CUDNN_BENCHMARK_LIMIT,
    VAE_RECOMPILE_LIMIT,
    SpeedConfig,
    apply_process_settings,
    apply_thread_settings,
)

logger = logging.getLogger(__name__)


def attention_context(backend: str) -> contextlib.AbstractContextManager:
    """A context that forces one torch SDPA backend ("sdpa": no constraint on torch's choice; "fa3": cuDNN for the
    cross-attention, which FA3 does not run)."""
    if backend == "sdpa":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend
    from torch.nn.attention import sdpa_kernel as sdpa_backends

    choice = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "fa3": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend]
    return sdpa_backends([choice])


# FA3 against cuDNN on an H100 (benchmarks/build_fa3.py, heads 12, head dim 128): 850 against 870 us at Pro's 9,216
# tokens, but 101 against 62 us at Lite's 1,280. Shorter self-attentions stay with torch SDPA (cuDNN under fa3).
FA3_MIN_TOKENS = 4096


def fa3_kernel() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """FlashAttention-3 on (B, L, heads, d) for L >= FA3_MIN_TOKENS, torch SDPA below; ConfigError when the package
    is not installed."""
    try:
        import flash_attn_interface
    except ImportError:
        raise ConfigError("attention=fa3 needs FlashAttention-3 (the flash_attn_interface package, Hopper)") from None

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.shape[1] < FA3_MIN_TOKENS:  # static under torch.compile: one branch per traced shape
            return sdpa_kernel(q, k, v)
        out = flash_attn_interface.flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out

    return kernel


class FastDenoiser:
    """The 4-step chunk loop with constants hoisted, optionally captured as one CUDA graph per batch size.

    Args:
        dit: the DiT (possibly with compiled blocks or FP8 linears).
        speed: the switches (rope_table, cond_cache, attention, cuda_graphs are read here).
    """

    def __init__(self, dit: FlashHeadDiT, speed: SpeedConfig):
        self.dit = dit
        self.speed = speed
        self._rope: dict[tuple, torch.Tensor] = {}
        self._time: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._timesteps: dict[tuple, torch.Tensor] = {}
        self._graphs: dict[tuple, CapturedGraph] = {}
        self._pool = None
        self.capture_seconds = 0.0

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        dtype = torch.float32 if self.speed.rope_fp32 else torch.float64
        key = (grid, str(device), self.speed.rope_table, dtype)
        if key not in self._rope:
            self._rope[key] = self.dit.rope(grid, device, table=self.speed.rope_table, dtype=dtype)
        return self._rope[key]

    def time_table(self, timesteps: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(t, t_mod) of batch 1 for each fixed timestep; they broadcast over the batch."""
        key = (tuple(timesteps.tolist()), dtype)
        if key not in self._time:
            self._time[key] = [self.dit.embed_time(t.reshape(1), 1, dtype) for t in timesteps]
        return self._time[key]

    def timesteps_on(self, timesteps: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The timesteps on the device, copied once (a host copy cannot be captured in a CUDA graph)."""
        key = (tuple(timesteps.tolist()), str(device))
        if key not in self._timesteps:
            self._timesteps[key] = timesteps.to(device)
        return self._timesteps[key]

    def grid(self, latents: torch.Tensor) -> tuple[int, int, int]:
        pt, ph, pw = self.dit.config.patch_size
        f, h, w = latents.shape[2:]
        return f // pt, h // ph, w // pw

    @torch.no_grad()
    def __call__(
        self,
        scheduler: FlashHeadScheduler,
        latents: torch.Tensor,
        motion_latents: torch.Tensor,
        ref_latents: torch.Tensor,
        audio_context: torch.Tensor,
        renoise: Sequence[torch.Tensor] | None,
        euler: bool,
        motion_lengths: Sequence[int],
    ) -> torch.Tensor:
        """Same contract as `denoise_chunk` (without guidance); returns the denoised latents."""
        B, F = latents.shape[0], latents.shape[2]
        # Motion frames padded to the chunk length and a per-sample mask: one graph serves any mix of
        # first chunks (1 motion frame) and later chunks (2) in a batch. torch.where writes the same values
        # as the plain loop's slice assignment.
        motion = torch.zeros_like(latents)
        motion[:, :, : motion_latents.shape[2]] = motion_latents
        mask = torch.zeros((B, 1, F, 1, 1), dtype=torch.bool, device=latents.device)
        for b, n in enumerate(motion_lengths):  # fills on the device: no host-to-device copy, no sync
            mask[b, :, :n] = True
        noises = list(renoise) if renoise is not None else [torch.zeros_like(latents)] * scheduler.num_steps
        inputs = [latents, motion, mask, ref_latents, audio_context, *noises]
        with attention_context(self.speed.attention):
            if not (self.speed.cuda_graphs and latents.is_cuda):
                return self._loop(scheduler, euler, *inputs)
            key = (tuple(latents.shape), tuple(audio_context.shape), latents.dtype, euler,
                   tuple(scheduler.timesteps.tolist()), tuple(scheduler.sigmas.tolist()))  # fmt: skip
            if key not in self._graphs:
                start = time.perf_counter()
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                self._graphs[key] = CapturedGraph(lambda *a: self._loop(scheduler, euler, *a), inputs, self._pool)
                self.capture_seconds += time.perf_counter() - start
            return self._graphs[key].replay(inputs)

    def _loop(
        self,
        scheduler: FlashHeadScheduler,
        euler: bool,
        latents: torch.Tensor,
        motion: torch.Tensor,
        mask: torch.Tensor,
        ref: torch.Tensor,
        context: torch.Tensor,
        *noises: torch.Tensor,
    ) -> torch.Tensor:
        dit = self.dit
        tokens_dtype = latents.dtype
        rope = self.rope(self.grid(latents), latents.device)
        audio = dit.embed_audio(context, tokens_dtype)  # once per chunk (the plain loop: once per step)
        table = self.time_table(scheduler.timesteps, tokens_dtype) if self.speed.cond_cache else None
        timesteps = self.timesteps_on(scheduler.timesteps, latents.device)
        x = latents
        B = x.shape[0]
        for i in range(scheduler.num_steps):
            x = torch.where(mask, motion, x)
            if table is not None:
                t, t_mod = table[i]
            else:
                t, t_mod = dit.embed_time(timesteps[i].expand(B), B, tokens_dtype)
            v = dit.forward_embedded(x, ref, t, t_mod, audio, rope)
            x = scheduler.euler_step(v, i, x) if euler else scheduler.step(v, i, x, noises[i].to(x))
        return torch.where(mask, motion, x)

    def reset(self) -> None:
        self._graphs.clear()
        self._time.clear()
        self._timesteps.clear()
        self._rope.clear()


# -- module-level switches ------------------------------------------------------------------------------


def _compile(module: torch.nn.Module, mode: str) -> None:
    # dynamic=None: static shapes first; a second batch size makes the batch dimension dynamic (one
    # recompile) instead of one compile per batch size.
    module.compile(mode=None if mode == "default" else mode)


def _static_shapes_for_one_stream(module: torch.nn.Module, channels_last: bool = False) -> None:
    """Calls of a compiled `module` whose first argument has batch 1 compile with static shapes (Dynamo's automatic
    dynamic shapes off while they run); other batch sizes keep the default, a dynamic batch dimension.

    Dynamo's guards compare strides too, so the tensors such a call gets are first given one layout per shape: the
    input the VAE's (`channels_last`: channels-last 3-D, as its weights), whether it is the reference's clip or a
    chunk's decoded motion frames, and each tensor of the Wan VAE's `feat_cache` list the strides a new tensor of
    its shape has (a cached slice keeps those of the 3- or 4-frame activation it was cut from). Otherwise each
    variant is traced again (tiny Pro: 10 VAE graphs to the first frame, 6 with this). Only a tensor that is not dense
    in the layout it gets is copied; the others get a view of the same memory.
    """
    compiled = module._compiled_call_impl
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format

    def call(*args, **kwargs):
        first = args[0] if args else None
        if isinstance(first, torch.Tensor) and first.shape[0] == 1:
            args = (canonical_strides(first, layout if first.dim() == 5 else None), *args[1:])
            cache = kwargs.get("feat_cache")
            if isinstance(cache, list):  # the caller keeps the list: its entries are replaced in place
                cache[:] = [canonical_strides(c) if isinstance(c, torch.Tensor) else c for c in cache]
            with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
                return compiled(*args, **kwargs)
        return compiled(*args, **kwargs)

    module._compiled_call_impl = call


def canonical_strides(t: torch.Tensor, layout: torch.memory_format | None = None) -> torch.Tensor:
    """`t` with the strides of a new tensor of its shape in `layout` (default: channels-last 3-D where `t` is dense
    that way and not row-major, else row-major): the same values, a copy only where `t` is not dense in it."""
    if layout is None:
        layout = torch.contiguous_format
        if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
            layout = torch.channels_last_3d
    t = t.contiguous(memory_format=layout)
    strides = torch.empty(t.shape, device="meta", memory_format=layout).stride()  # a new tensor's
    return t if t.stride() == strides else t.as_strided(t.shape, strides, t.storage_offset())


def _uncompile(module: torch.nn.Module) -> None:
    if getattr(module, "_compiled_call_impl", None) is not None:
        module._compiled_call_impl = None


def apply_module_switches(dit: FlashHeadDiT, vae: torch.nn.Module, speed: SpeedConfig) -> None:
    """Set attention kernel, FP8, compile state and cuDNN autotuning on the networks (undoing earlier ones)."""
    apply_process_settings(speed)
    torch.backends.cudnn.benchmark = speed.cudnn_benchmark
    torch.backends.cudnn.benchmark_limit = speed.cudnn_search_limit
    dit.set_attention_kernel(fa3_kernel() if speed.attention == "fa3" else None, cross=False)
    if speed.fp8 and not getattr(dit, "_flashhead_fp8", False):
        quantize_fp8(dit)
    elif not speed.fp8 and getattr(dit, "_flashhead_fp8", False):
        raise ConfigError("fp8 cannot be switched off again on this pipeline: reload the model")
    dit.set_fused_gelu(speed.fused_gelu and not speed.fp8)  # float8 weights go through torchao's own linear
    dit.set_fused_qk_rope(speed.fused_qk_rope)
    dit.set_cross_attn_fold(speed.cross_attn_fold and not speed.fp8)  # it reads o's weights, which fp8 quantises
    for block in dit.blocks:
        _compile(block, speed.compile_mode) if speed.compile_dit else _uncompile(block)
    apply_vae_switches(vae, speed)


def apply_vae_switches(vae: torch.nn.Module, speed: SpeedConfig) -> None:
    """Convolution layout, Wan convolution padding and decoder compile on a VideoVAE (undoing earlier ones)."""
    model = getattr(vae, "model", None)
    if isinstance(model, torch.nn.Module):
        # Channels-last weights make cuDNN pick NDHWC kernels, and their outputs carry the layout onwards.
        layout = torch.channels_last_3d if speed.vae_channels_last else torch.contiguous_format
        for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv3d)):
            conv.weight.data = conv.weight.data.contiguous(memory_format=layout)
        # Per convolution instance: another pipeline's VAE in this process keeps its own. Wan VAE only.
        set_tap_sum(model, speed.vae_conv_out_gemm)  # first: kernel padding leaves a tap-sum layer alone
        set_cutlass_conv(model, False)  # back to kernel-padded layers, which set_kernel_padding switches
        set_kernel_padding(model, speed.vae_conv_pad)
        set_cutlass_conv(model, speed.vae_cutlass_conv)
        set_subpixel_upsample(model, speed.vae_subpixel_upsample, channels_last=speed.vae_channels_last)
        set_attention_gemm(model, speed.vae_attention_gemm)
        # A compiled decoder needs resamples Dynamo traces in one graph (see wan_resample), and so does a decoder
        # given several frames at once; eager keeps diffusers' (sub-pixel upsampling keeps its own).
        set_traceable_resample(model, speed.compile_vae or speed.vae_whole_chunk)
    if hasattr(vae, "set_whole_chunk"):
        vae.set_whole_chunk(speed.vae_whole_chunk, call_frames=speed.vae_call_frames)
    # The encoder too: every chunk re-encodes its motion frames (Pro 44 ms, Lite 17 ms per chunk eager on an H100).
    for net in (getattr(model, "decoder", None), getattr(model, "encoder", None)):
        if net is None:
            continue
        if not speed.compile_vae:
            _uncompile(net)
            continue
        _compile(net, speed.compile_mode)
        if speed.vae_static_shapes:
            _static_shapes_for_one_stream(net, channels_last=speed.vae_channels_last)
    # vae_cuda_graphs: a store for the graphed decode / encode calls (flashhead.pipeline.graphs.graphed); graphs
    # captured under other switches are dropped with it.
    vae._graphed_calls = {} if speed.vae_cuda_graphs else None
    apply_thread_settings(speed)  # compile_vae's recompile limits (also where only the VAE is switched)


def quantize_fp8(dit: FlashHeadDiT) -> None:
    """Float8 weights and dynamically scaled float8 activations for the DiT blocks' linears (torchao)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise ConfigError("fp8 needs a CUDA GPU with float8 matrix units (Ada or Hopper)")
    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError:
        raise ConfigError("fp8 needs torchao: pip install 'flashhead[fp8]'") from None
    # set_inductor_config=False: by default torchao sets process-wide Inductor options (coordinate-descent tuning in
    # every direction, which kept the compiled VAEs' warm-up autotuning for over 9 minutes) and TF32 float32 matmuls,
    # which would change wav2vec2's output too. FP8 needs neither.
    quantize_(dit.blocks, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
    dit._flashhead_fp8 = True


_compiled_color: dict[str, Callable] = {}


def color_function(speed: SpeedConfig, to_statistics: bool = False) -> Callable:
    """match_colors (or, with `to_statistics`, match_colors_to: the reference given by its statistics), compiled
    when `compile_color` is on (one fused kernel chain instead of ~40 kernels)."""
    from flashhead.pipeline import color

    name = "match_colors_to" if to_statistics else "match_colors"
    if not speed.compile_color:
        return getattr(color, name)
    if name not in _compiled_color:
        _compiled_color[name] = torch.compile(getattr(color, name), dynamic=False)
    return _compiled_color[name]
