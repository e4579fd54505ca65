"""Speed switches: every optimisation of the inference path, off by default, each one reported by the benchmark.

All switches off is the plain eager path, which computes exactly what the official model does. Each switch
keeps the output (frames within PSNR >= 40 dB of the plain bf16 path for the same seed, checked on the GPU
by tests/pipeline/test_gpu_speed.py) except `fp8`, whose error is reported, and `decode_new_only`, which is
approximate by construction (see docs/performance.md) and therefore not part of the `optimized` preset.

    pipe.optimize(SpeedConfig.optimized())            # or SpeedConfig.parse("compile_dit=on,attention=cudnn")
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

from flashhead.errors import ConfigError

ATTENTION_BACKENDS = ("sdpa", "cudnn", "flash", "efficient", "math", "fa3")
VIDEO_ENCODERS = ("libx264", "h264_nvenc", "auto")  # also what flashhead.media.video_io.VideoWriter takes
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
TORCH_CUDNN_BENCHMARK_LIMIT = 10  # torch's default number of cuDNN algorithms timed per shape
WIDE_CUDNN_SEARCH_LIMIT = 32  # the optimized preset's: as fast as all of them, a third of the search (H200)
RENAMED = {"cudnn_search_all": "cudnn_search_limit (0: every algorithm, as cudnn_search_all=on was)"}


@dataclass(frozen=True)
class SpeedConfig:
    """Which optimisations run. Defaults: none (the plain eager path).

    Attributes:
        rope_table: RoPE as a real float64 (cos, sin) table computed once per token grid, instead of complex
            phasors rebuilt at every forward (same float64 arithmetic; no complex dtypes, so it compiles).
        rope_fp32: with rope_table, the table and the rotation in float32 instead of float64. The official model
            rotates q and k in float64; in the compiled block that rotation sits in the q / k norm kernel, which runs
            well below the memory bandwidth (~63 us per tensor and layer of Pro, session 16). float32 rounds ~0.5 %
            of the rotated bf16 values differently (random weights: ~35 dB from the float64 path), so it is
            checked as a reassociating switch (GPU cases: Pro 55.6 dB against float32, as the float64 path).
            Session 30, one compiled Pro block on an H200: that kernel 91.4 -> 70.4 us. In the `optimized` preset.
        cond_cache: timestep embeddings (t, adaLN t_mod) precomputed once for the fixed sampling steps, and
            the audio tokens projected once per chunk instead of once per step.
        attention: SDPA backend forced for every attention: "sdpa" lets torch choose, "cudnn" / "flash" /
            "efficient" / "math" force one, "fa3" calls FlashAttention-3 (`flash_attn_interface`) for
            self-attentions over at least 4,096 tokens (Pro's) and cuDNN for the rest (H100: FA3 850 against cuDNN
            870 us at Pro's 9,216 tokens, but 101 against 62 us at Lite's 1,280 and 108 against 64 us for the
            cross-attention's 32 audio keys; benchmarks/build_fa3.py). In the compiled Pro stream FA3 saves more
            than that: DiT 283.8 -> 273.5 ms per chunk, 56.4 -> 57.4 FPS (H100). The `optimized` preset takes
            "fa3" where `fa3_available()`, else "cudnn".
        cudnn_benchmark: let cuDNN time its convolution algorithms (VAE 3-D convolutions).
        cudnn_search_limit: with cudnn_benchmark, how many convolution algorithms cuDNN times per shape, in its
            heuristics' order (torch.backends.cudnn.benchmark_limit; torch's default 10, 0 times every one). For
            the Wan2.1 decode's 96-channel 512x512 convolutions the first 10 miss the fastest kernel (H100: 1.27
            against 1.70 ms per call; a Pro chunk's convolutions 180 against 206 ms). The first 32 find kernels as
            fast as the whole search's (H200: 181.7 against 180.0 ms per chunk, within the timing noise) in a third
            of its time (4.2 against 12.7 s for the decode's 30 shapes), which every new process pays before its
            first frame: the `optimized` preset takes 32. Process-wide, and torch keeps cuDNN's first choice per
            shape for the life of the thread that searched (its benchmark cache is thread-local; the server warms
            up in its engine thread for that): set it before the first decode.
        vae_channels_last: VAE weights in channels-last 3-D layout, so cuDNN runs the 3-D convolutions
            channels-last (NDHWC), the layout Hopper tensor-core kernels prefer (H100, Wan2.1 decode 562 -> 466 ms).
        vae_conv_pad: the Wan2.1 (Pro) VAE's causal convolutions pad only in time; the spatial zero padding is
            done inside the convolution kernel instead of by a padded copy of every activation (H200, Pro chunk
            decode 465 -> 425 ms, 375 ms with vae_channels_last). No effect on the LTX (Lite) VAE.
        vae_subpixel_upsample: each Wan2.1 (Pro) decoder upsampling (nearest 2x, then a 3x3 convolution at the
            doubled size) as one stride-2 transposed convolution with the taps that read the same input pixel summed
            (flashhead.models.vae.wan_resample): 4/9 of its multiply-adds, no 4x upsampled copy (H100, compiled Pro
            chunk decode 187.6 -> 179.7 ms; in the whole stream 186.8 -> 177.2 ms, 55.2 -> 56.2 FPS). Only the
            summed weights round differently. No effect on the LTX (Lite) VAE.
        vae_conv_out_gemm: the Wan2.1 (Pro) decoder's last convolution (96 -> 3 channels at 512x512, which cuDNN
            ran at ~17 TFLOP/s: no kernel of its fits 3 output channels) as one GEMM of each input pixel with its
            81 taps and a sum of the shifted tap planes (flashhead.models.vae.wan_conv.TapSumCausalConv3d; fused
            into one kernel with compile_vae). The same products, summed in another order. Pays only compiled (H200,
            one call: cuDNN 0.86 ms, compiled 0.49, eager 1.39; compiled Pro chunk decode 172.2 -> 169.1 ms, stream
            59.12 -> 59.48 FPS on one machine). No effect on the LTX (Lite) VAE.
        vae_cutlass_conv: the Wan2.1 (Pro) VAE's convolutions (with vae_conv_pad) through CUTLASS's Hopper
            implicit-GEMM kernels where they beat cuDNN: each shape is timed once per process against cuDNN and the
            fastest kept (flashhead.models.vae.cutlass_conv). cuDNN's best kernels for the decoder's 96-channel
            layers tile 128 channels wide; CUTLASS's can tile 96, and its clusters of two tiles load the tiles they
            share once (TMA multicast). Needs the library built (`python -m flashhead.models.vae.cutlass_conv
            build`) and an sm_90 GPU; elsewhere it changes nothing. H200: with the 8 tiles of session 28 Pro decode
            166.9 -> 164.4 ms per chunk (60.36 -> 60.51 FPS); with session 29's clusters the compiled chunk decode
            171.6 -> 161.4 ms. Since session 31 the kernels pad time themselves (a causal layer's zero frames in
            front: no padded copy; stream decode 161.4 -> 155.1 ms). In the `optimized` preset where the library is
            built and the GPU is a Hopper.
        vae_attention_gemm: the Wan2.1 (Pro) decoder's middle-block self-attention (one head of 384 channels over a
            latent frame's 4,096 pixels: too wide a head for the flash kernels, so PyTorch ran its memory-efficient
            kernel at ~90 TFLOP/s, 2.65 ms per Pro chunk on an H200) as two GEMMs with float32 scores and softmax
            (flashhead.models.vae.wan_attention): the attention's 2.7 ms become ~1.3 ms of GEMMs and softmax (H200,
            compiled decode's GPU time 154.3 -> 153.9 ms, session 31). No effect on the LTX (Lite) VAE.
        vae_whole_chunk: the Wan2.1 (Pro) decoder and encoder run each layer once over all of a call's frames
            instead of once per latent frame (decode) or frame group (encode) with caches of the frames before
            (diffusers' loops): the convolutions are causal in time and the rest acts per frame, so the values are
            the same, from ~10x fewer, larger kernels and without the cache copies (flashhead.models.vae.wan.
            WanVideoVAE.set_whole_chunk). Pays with vae_cutlass_conv, whose kernels pad time themselves: H200,
            compiled Pro chunk decode 153.5 -> 140.3 ms (fused Triton kernels 36.9 -> 26.3 ms), stream 62.34 -> 64.40
            FPS with vae_attention_gemm (session 31). With cuDNN's convolutions each layer's zero frames are a padded
            copy and the compiled decode was no faster (session 29). In the `optimized` preset where vae_cutlass_conv
            is. Needs memory for a chunk's activations at full resolution (Pro stream peak 10.4 -> 29.5 GiB;
            vae_call_frames bounds it). The sequence-parallel strip decoder decodes its rows in the same calls; the
            strip encoder keeps its loop. No effect on the LTX (Lite) VAE.
        vae_call_frames: with vae_whole_chunk, the most latent frames one decoder call takes, counted over a batch's
            streams (0, the default: one stream's decode, 9 latent frames for a Pro chunk). Activation memory grows
            with them: one Pro stream 26.3 GiB at the decode's peak against 10.4 for the per-frame loop (H200, session
            32), so without a bound B batched streams would need about B times that. With it B streams decode in
            calls of at most call_frames // B frames each, of near-equal lengths (a Pro chunk's 9: three calls of 3
            for 2 or 3 streams, five of at most 2 for 4, the per-frame loop's nine from 5 streams on). A smaller
            value trades some of the whole chunk's speed for memory: 3, in the `optimized` preset with
            vae_whole_chunk, decodes one Pro stream's chunk in three calls of 3 frames (bit-identical frames; H200,
            session 33: stream peak 29.5 -> 20.3 GiB, decode +2.7 ms, 64.47 FPS) and batched streams one frame per
            call.
        fused_gelu: each DiT block's first FFN layer as one cuBLASLt GEMM with a bias + tanh-GELU epilogue, instead
            of a GEMM and a separate GELU kernel over the (tokens x 8960) activation (flashhead.models.linear_gelu).
            Rounds the activation once instead of twice. Ignored with fp8.
        fused_qk_rope: each DiT self-attention's q and k RMS norm and RoPE rotation as one Triton kernel per tensor
            that reads a row once and splits its channel pairs in registers (flashhead.models.qk_norm_rope), instead
            of Inductor's fused kernel, which ran at ~1.6 of an H200's 4.8 TB/s (Lite at batch 20: 191 us per block,
            session 35). H200, one compiled block in a CUDA graph: Lite at batch 20 those kernels 200.7 -> 107.3 us,
            the block 4.309 -> 4.229 ms; Pro 71.6 -> 46.1 us, 2.288 -> 2.264 ms. Needs rope_fp32 (the kernel's table
            is float32) and Triton; off CUDA it is the plain composition. The row's sum of squares is added in
            another order, so the odd value lands an ulp or two away (GPU cases: Pro bf16 30.68 / float32 55.63 dB
            compiled, as rope_fp32's). Not used by the sequence-parallel attention. In the `optimized` preset since
            session 36 (the whole preset's GPU cases with it: Lite bf16 36.19 / float32 58.48 dB, Pro 31.29 / 54.68).
        cross_attn_fold: each DiT block's audio cross-attention and its output projection as two dense GEMMs
            (flashhead.models.dit.folded_cross_attention): the scores of all heads against a block-diagonal key
            matrix, then the probabilities against the values with the output projection folded in (per head a
            32 x 1536 block), instead of a fused attention kernel over 32 keys plus the projection GEMM. Fewer FLOPs
            (Pro per block and step: the 43.5 GFLOP projection and the attention call become 2 x 10.9 GFLOP), the
            same maths; the values' product with the projection is rounded once where the attention output was
            (float64 on the CPU: equal to 1e-14). Why: a fused kernel's per-tile overhead dominates at 32 keys (Pro's
            cross-attention ~86 us per block on an H100, session 16, against ~12 us of memory traffic). Measured
            in session 39 (one compiled block in a CUDA graph, H200): Pro batch 1 -0.6 %, Lite batch 20 +2.5 %
            (cuDNN's cross-attention now ~38 us per Pro block; the fold's softmax, copies and launches cost most
            of what it saves), so not in the `optimized` preset. GPU cases `cross_attn_fold*`: at the bf16 floor.
            Ignored with fp8.
        persistent_norms: compiled kernels reduce rows of up to 2,048 values in one pass (Inductor's limit: 1,024),
            so the DiT's five 1,536-channel norms per block read their rows once (flashhead.pipeline.
            inductor_heuristics; H100, Pro DiT 290.4 -> 283.8 ms per chunk; since session 28 also the one norm
            Inductor hints DEFAULT, not INNER: H200, a compiled Pro block 2.350 -> 2.331 ms). Process-wide (applied
            per thread, see `apply_thread_settings`); a change drops the process's compiled graphs, which then
            compile anew.
        compile_dit: torch.compile every DiT block (one compiled graph shared by all 30).
        compile_vae: torch.compile the VAE decoder and encoder (the encoder re-encodes each chunk's motion frames).
        vae_static_shapes: with compile_vae, a single stream's VAE calls (batch 1) compile with static shapes. The
            Wan2.1 VAE runs one latent frame at a time with caches of 0-2 frames, so Dynamo meets several shapes per
            decode and by default recompiles them with symbolic sizes, which trace slowly (a profiled Pro cold start
            spent 15 of its 69 s of Dynamo tracing in symbolic-size arithmetic). Batched streams keep the default
            (one dynamic batch dimension instead of a compile per batch size). The same computation, in kernels
            specialised to their sizes. Such a call's input and caches also get one layout per shape, since
            Dynamo's guards compare strides (flashhead.pipeline.fast_path; Pro cold start 33.2 s on an H200).
        compile_color: torch.compile the colour correction (fused elementwise Lab conversion) and, in the streaming
            engine, the frames' conversion to uint8 with the watermark and the layout change for the host (one
            kernel instead of seven: ~7 ms of a 20-stream Lite round on an H200, session 34's trace; exact).
        compile_mode: torch.compile mode for the switches above.
        cuda_graphs: capture the whole 4-step denoising loop of a chunk in one CUDA graph per batch size
            and replay it (no per-kernel launch cost).
        vae_cuda_graphs: the same for the VAE decode and the motion re-encode (on several GPUs: each rank's
            strips), one graph per shape. Launching a compiled Wan decode costs the host more than the GPU's
            decode takes on two GPUs (flashhead.pipeline.graphs).
        cublaslt_no_workspace: cuBLASLt GEMMs without a workspace (CUBLASLT_WORKSPACE_SIZE=0, unless the variable
            is already set). cuBLAS then picks kernels that need no cleared workspace: no memset before each GEMM,
            which inside a CUDA graph is a node of its own with launch gaps around it (2 x H200, Pro on 2 GPUs:
            DiT 171 -> 165 ms per chunk, per layer 1,439 -> 1,368 us; one GPU within +-1 %). Process-wide, and
            torch reads it once, at the process's first cuBLASLt GEMM: it takes effect where the switches are
            applied before any GEMM ran (`apply_process_settings`; pipelines apply theirs at `optimize`).
        pinned_memory: draw each chunk's noise ahead, while the GPU works, into pinned host memory, copy it
            without blocking, and bring frames back through one pinned transfer per round, queued before the motion
            re-encode (which only the next chunk needs), so frames reach the host without waiting for it. A new
            session's portrait goes up from pinned memory too: opening one does not wait for the GPU.
        copy_stream: with pinned_memory, the streaming engine's frame copies to the host run on a CUDA stream of
            their own, so the motion re-encode queued after them does not wait for the transfer (a 20-stream Lite
            round's 377 MB: 6.8 ms of the stream's time on an H200, session 34's trace). Exact.
        early_first_frames: a new stream's first chunk is decoded in two pieces where the VAE decodes causally in
            time (Wan2.1, Pro, one GPU): the latent frames up to the first new frame, whose frames the streaming
            engine colour-corrects and hands out at once, then the rest. The same frames, the first of them
            earlier by most of a decode (needs pinned_memory: the frames' copy must not block the host).
        audio_tf32: wav2vec2's GEMMs (its linear layers and attention products; 12 layers over the 8 s audio cache per
            chunk) on TF32 tensor cores instead of float32 FMA units: products of 10-bit mantissas, summed in
            float32 (flashhead.models.audio.tf32_matmuls; its convolutions use TF32 already, torch's default). The
            pass runs beside the DiT on the audio stream, and its float32 FFMA GEMMs (~8 ms per Pro chunk) take SMs
            from it: H200, Pro 60.0 -> 60.3-60.4 FPS, Lite 432.2 -> 434.5 FPS. Changes the features' rounding
            (relative L2 4.9e-4 from float32), so it is checked as a reassociating switch (Pro frames 55.4 dB from
            plain in float32). Process-wide while the pass is launched: another thread's float32 GEMMs launched
            meanwhile run in TF32 too. No effect on a mel encoder (flashhead-tiny).
        audio_stream: compute the next round's audio features on a side CUDA stream while the current
            round's DiT runs (streaming engine). Where rounds are launched ahead (launch_ahead, sequence parallel)
            they are queued before the chunk, beside the previous round's decode.
        launch_ahead: the streaming engine queues the next round on the GPU before it waits for the current
            round's frames, so the GPU goes from one chunk to the next without waiting for the host (and, with
            sequence parallelism, for the followers). Exact, but measured slower for Lite on one GPU (327 against
            334 FPS without it on an H100, 355 against 432 on an H200) and +0.5 % for Pro, so not in the
            `optimized` preset; a sequence-parallel pipeline's engine launches ahead regardless (Pro on 2 H200s:
            326.0 against 334.2 ms per chunk).
        decode_new_only: VAE-decode only the latent frames that hold emitted frames, plus one of context.
            Approximate (the decoders see less temporal context); off in the `optimized` preset.
        fp8: DiT linear layers in float8 (torchao, dynamic per-row scales); error reported against bf16 (Lite
            33.3 dB, Pro 29.3 dB). On top of the `optimized` preset (H200, session 39): Pro 68.6 against 65.1 FPS,
            Lite unchanged (451.8 against 452.0); not in the preset.
        video_encoder: the H.264 encoder of the MP4s written from this pipeline (its outputs' `save`, the server's
            jobs): "libx264" on the CPU, "h264_nvenc" on the GPU's video encoder, or "auto", NVENC where it opens
            (GPUs with the encoder block: not H100, H200 or A100) and x264 elsewhere. The frames are the same; only
            their compression differs.
    """

    rope_table: bool = False
    rope_fp32: bool = False
    cond_cache: bool = False
    attention: Literal["sdpa", "cudnn", "flash", "efficient", "math", "fa3"] = "sdpa"
    cudnn_benchmark: bool = False
    cudnn_search_limit: int = TORCH_CUDNN_BENCHMARK_LIMIT
    vae_channels_last: bool = False
    vae_conv_pad: bool = False
    vae_subpixel_upsample: bool = False
    vae_conv_out_gemm: bool = False
    vae_cutlass_conv: bool = False
    vae_attention_gemm: bool = False
    vae_whole_chunk: bool = False
    vae_call_frames: int = 0
    fused_gelu: bool = False
    fused_qk_rope: bool = False
    cross_attn_fold: bool = False
    persistent_norms: bool = False
    compile_dit: bool = False
    compile_vae: bool = False
    vae_static_shapes: bool = False
    compile_color: bool = False
    compile_mode: str = "default"
    cuda_graphs: bool = False
    vae_cuda_graphs: bool = False
    cublaslt_no_workspace: bool = False
    pinned_memory: bool = False
    copy_stream: bool = False
    early_first_frames: bool = False
    audio_tf32: bool = False
    audio_stream: bool = False
    launch_ahead: bool = False
    decode_new_only: bool = False
    fp8: bool = False
    video_encoder: Literal["libx264", "h264_nvenc", "auto"] = "libx264"

    def __post_init__(self) -> None:
        if self.video_encoder not in VIDEO_ENCODERS:
            raise ConfigError(f"video_encoder must be one of {', '.join(VIDEO_ENCODERS)}, got {self.video_encoder!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.cudnn_search_limit < 0:
            raise ConfigError(f"cudnn_search_limit must be 0 (every algorithm) or more, got {self.cudnn_search_limit}")
        if self.cudnn_search_limit != TORCH_CUDNN_BENCHMARK_LIMIT and not self.cudnn_benchmark:
            raise ConfigError(
                f"cudnn_search_limit={self.cudnn_search_limit} needs cudnn_benchmark on "
                f"(or set cudnn_search_limit={TORCH_CUDNN_BENCHMARK_LIMIT}, torch's default, with it off)"
            )
        if self.vae_call_frames < 0:
            raise ConfigError(f"vae_call_frames must be 0 (one stream's decode) or more, got {self.vae_call_frames}")
        if self.rope_fp32 and not self.rope_table:
            raise ConfigError("rope_fp32 is the dtype of rope_table's table: switch rope_table on too")
        if self.vae_cutlass_conv and not self.vae_conv_pad:
            raise ConfigError("vae_cutlass_conv replaces vae_conv_pad's convolutions: switch vae_conv_pad on too")
        if self.fused_qk_rope and not self.rope_fp32:
            raise ConfigError("fused_qk_rope rotates with rope_fp32's float32 table: switch rope_table, rope_fp32 on")
        if self.copy_stream and not self.pinned_memory:
            raise ConfigError("copy_stream puts pinned_memory's frame copies on a stream of their own: switch that on")
        if self.cuda_graphs and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ConfigError("cuda_graphs captures the chunk itself; use compile_mode default with it")

    # -- presets ------------------------------------------------------------------------------------

    @classmethod
    def plain(cls) -> SpeedConfig:
        return cls()

    @classmethod
    def optimized(cls) -> SpeedConfig:
        """Every output-preserving switch that was measured to help (not decode_new_only, fp8, launch_ahead).
        Attention: FlashAttention-3 where it is installed and the GPU is a Hopper, else cuDNN; vae_cutlass_conv, and
        with it vae_whole_chunk (which pays only where the CUTLASS kernels pad time themselves) in calls of at most 3
        latent frames (vae_call_frames: a third less memory for ~2 % of the decode), where its library is built and
        the GPU is a Hopper."""
        cutlass = cutlass_conv_available()
        return cls(
            rope_table=True, rope_fp32=True, cond_cache=True, attention="fa3" if fa3_available() else "cudnn",
            vae_cutlass_conv=cutlass, vae_whole_chunk=cutlass, vae_call_frames=3 if cutlass else 0,
            vae_attention_gemm=True,
            cudnn_benchmark=True, cudnn_search_limit=WIDE_CUDNN_SEARCH_LIMIT,
            vae_channels_last=True, vae_conv_pad=True, vae_subpixel_upsample=True, vae_conv_out_gemm=True,
            fused_gelu=True, fused_qk_rope=True, persistent_norms=True, compile_dit=True, compile_vae=True,
            vae_static_shapes=True, compile_color=True, cuda_graphs=True, vae_cuda_graphs=True,
            cublaslt_no_workspace=True, pinned_memory=True, copy_stream=True, early_first_frames=True,
            audio_stream=True, audio_tf32=True, video_encoder="auto",
        )  # fmt: skip

    @property
    def is_plain(self) -> bool:
        return self == SpeedConfig()

    @property
    def fast_denoiser(self) -> bool:
        """Whether the chunk's denoising loop runs through the fast denoiser instead of the plain loop."""
        return (
            self.rope_table or self.cond_cache or self.cuda_graphs or self.compile_dit or self.fp8
            or self.attention != "sdpa"
        )  # fmt: skip

    # -- (de)serialisation --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes: object) -> SpeedConfig:
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict) -> SpeedConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        renamed = [f"{name} is now {RENAMED[name]}" for name in unknown if name in RENAMED]
        if renamed:
            raise ConfigError("; ".join(renamed))
        if unknown:
            raise ConfigError(f"unknown speed switch(es): {', '.join(unknown)}; known: {', '.join(known)}")
        values = {}
        for name, value in data.items():
            if known[name].type in ("bool", bool):
                values[name] = _as_bool(name, value)
            elif known[name].type in ("int", int):
                values[name] = _as_int(name, value)
            else:
                values[name] = str(value)
        return cls(**values)

    @classmethod
    def parse(cls, text: str, base: SpeedConfig | None = None) -> SpeedConfig:
        """`name=on,name=off,attention=cudnn` (also `name` alone for on) over `base` (default: plain)."""
        changes: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, value = item.partition("=")
            changes[name.strip()] = value.strip() if sep else "on"
        merged = {**(base or cls()).to_dict(), **changes}
        return cls.from_dict(merged)

    def to_text(self, base: SpeedConfig | None = None) -> str:
        """The switches that differ from `base` (default: plain) in `parse`'s form, so parse(to_text()) == self."""
        base_values = (base or SpeedConfig()).to_dict()
        return ",".join(
            f"{name}={('on' if value else 'off') if isinstance(value, bool) else value}"
            for name, value in self.to_dict().items()
            if value != base_values[name]
        )

    @classmethod
    def from_file(cls, path: str | Path) -> SpeedConfig:
        """A YAML (.yaml/.yml) or JSON mapping of switches."""
        from flashhead.config_files import read_mapping

        return cls.from_dict(read_mapping(path))


def cutlass_conv_available() -> bool:
    """Whether vae_cutlass_conv can run here: its library built (flashhead.models.vae.cutlass_conv), a Hopper GPU."""
    from flashhead.models.vae import cutlass_conv

    return cutlass_conv.available()


def fa3_available() -> bool:
    """Whether attention=fa3 can run here: FlashAttention-3 (`flash_attn_interface`) installed, a Hopper GPU."""
    import importlib.util

    import torch

    if importlib.util.find_spec("flash_attn_interface") is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() == (9, 0)


def _as_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("on", "true", "1", "yes"):
        return True
    if text in ("off", "false", "0", "no"):
        return False
    raise ConfigError(f"speed switch {name} must be on or off, got {value!r}")


def _as_int(name: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ConfigError(f"speed switch {name} must be a whole number, got {value!r}") from None


CUBLASLT_WORKSPACE_ENV = "CUBLASLT_WORKSPACE_SIZE"  # KiB; torch reads it at the first cuBLASLt GEMM of a process


# A compiled Wan decoder is called once per latent frame and recompiles for each cache state it meets (empty,
# the "Rep" marker, one frame, two frames): about 4 variants per decode shape, and the strip decoder adds its
# row counts. Dynamo's default limit of 8 variants per frame sent the rest of the decode back to eager (the
# device log's "hit config.recompile_limit (8)", together with the graph break that wan_resample removes).
VAE_RECOMPILE_LIMIT = 128


def apply_process_settings(speed: SpeedConfig) -> None:
    """The process-wide part of `speed` (cublaslt_no_workspace: set in the environment unless a value is there),
    then `apply_thread_settings` for the calling thread.

    Call before the process's first GEMM; later calls change nothing that torch has already read.
    """
    if speed.cublaslt_no_workspace:
        os.environ.setdefault(CUBLASLT_WORKSPACE_ENV, "0")
    apply_thread_settings(speed)


def apply_thread_settings(speed: SpeedConfig) -> None:
    """The compiler settings of `speed` (Dynamo's recompile limits for compile_vae, Inductor's heuristic for
    persistent_norms). torch >= 2.12 keeps these per thread, so every thread that runs compiled models, and may
    compile a new shape, calls this (pipelines at `optimize`, the server's engine thread when it starts)."""
    if speed.compile_vae:
        import torch

        # Process-wide in older torch, and Dynamo has no per-function limit: only ever raised.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, VAE_RECOMPILE_LIMIT)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * VAE_RECOMPILE_LIMIT)
    if speed.persistent_norms or "flashhead.pipeline.inductor_heuristics" in sys.modules:  # the plain path: no Inductor
        from flashhead.pipeline.inductor_heuristics import set_persistent_norms

        set_persistent_norms(speed.persistent_norms)
