"""Offline generation: a portrait and speech in, a lip-synced talking-head video out.

The pipeline composes the three networks and the scheduler and runs the official chunked procedure:

    reference image -> VAE latent of the image repeated `frame_num` times (y, fixed for the whole video)
    for every chunk of new audio:
        audio context (Temporal Audio Context Cache)  -> 4-step distilled sampling with the DiT
        -> VAE decode -> colour correction to the reference -> keep the new frames
        -> re-encode the last `motion_frames` frames as the next chunk's motion latents

Streaming (flashhead.pipeline.stream) reuses `encode_reference` and `generate_chunk`.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashhead.errors import AudioError, ConfigError
from flashhead.models.audio import AudioConfig, AudioContextCache, encode_offline
from flashhead.models.dit import FlashHeadDiT
from flashhead.models.vae import VideoVAE
from flashhead.parallel.runner import ChunkInputs
from flashhead.pipeline.color import reference_statistics
from flashhead.pipeline.config import GenerationConfig
from flashhead.pipeline.graphs import graphed
from flashhead.pipeline.sampling import denoise_chunk
from flashhead.pipeline.scheduler import FlashHeadScheduler
from flashhead.pipeline.speed import SpeedConfig
from flashhead.pipeline.timing import NullTimer

logger = logging.getLogger(__name__)

AudioEncoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ReferenceState:
    """What a portrait contributes to every chunk; computed once per portrait."""

    image: torch.Tensor  # (1, 3, 1, H, W) in [-1, 1]: the colour-correction reference
    latents: torch.Tensor  # (1, C, F, h, w): latent of the image repeated frame_num times (the DiT's y)
    _color_statistics: dict = field(default_factory=dict, repr=False, compare=False)  # dtype -> (1, 2, 3)

    @property
    def first_motion(self) -> torch.Tensor:
        """Motion latents of a stream's first chunk: the image's own (causal) first latent frame."""
        return self.latents[:, :, :1]

    def color_statistics(self, dtype: torch.dtype) -> torch.Tensor:
        """(1, 2, 3): the image's Lab mean and std in `dtype` (the colour correction's reference), computed once."""
        if dtype not in self._color_statistics:
            self._color_statistics[dtype] = reference_statistics(self.image.to(dtype))
        return self._color_statistics[dtype]


@dataclass
class ChunkResult:
    latents: torch.Tensor  # (1, C, F, h, w) denoised, motion frames written back
    decoded: torch.Tensor  # (1, 3, T, H, W) VAE output, the chunk's last T frames (T = frame_num unless new_only)
    video: torch.Tensor  # (1, 3, T, H, W) after colour correction, in [-1, 1]
    motion_latents: torch.Tensor | None  # (1, C, motion_latent_frames, h, w) for the next chunk (None until encoded)
    first_frame: int = 0  # index in the chunk of video's first frame (> 0 when only the new frames were decoded)

    def frames_from(self, index: int) -> torch.Tensor:
        """video from chunk frame `index` on (index >= first_frame)."""
        if index < self.first_frame:
            raise ValueError(f"frame {index} was not decoded (decoding started at frame {self.first_frame})")
        return self.video[:, :, index - self.first_frame :]


@dataclass
class ChunkNoise:
    """One stream's noise for one chunk, drawn in the official order: initial noise, then one per step."""

    initial: torch.Tensor  # (1, C, F, h, w) float32 on the host (on the device once staged: stage_noise)
    renoise: list[torch.Tensor] | None  # one like `initial` per step (None for the Euler sampler)


@dataclass
class FlashHeadOutput:
    """Frames of a generated video and what is needed to save it."""

    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, watermarked
    fps: int
    audio: np.ndarray  # (n,) float32 mono speech the frames follow
    sample_rate: int
    metadata: dict[str, Any] = field(default_factory=dict)
    video_encoder: str = "libx264"  # the pipeline's speed setting: libx264, h264_nvenc or auto

    @property
    def duration(self) -> float:
        return len(self.frames) / self.fps

    def save(self, path: str | Path, crf: int = 18, encoder: str | None = None) -> Path:
        """Write an H.264 MP4 with the speech muxed in, atomically (temporary file, then rename); `encoder`
        overrides `video_encoder`."""
        from flashhead.media.video_io import VideoWriter

        encoder = encoder or self.video_encoder
        with VideoWriter(path, fps=self.fps, crf=crf, encoder=encoder, metadata=self.metadata) as writer:
            writer.set_audio(self.audio, self.sample_rate)
            writer.write_frames(self.frames)
        return Path(path)


def reference_generator(seed: int) -> torch.Generator:
    """Noise for the reference encode (LTX posterior); apart from the sampling and re-encode streams."""
    return torch.Generator().manual_seed(seed + 2)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, rounding to the nearest level."""
    return frames_to_host([video])[0]


def frames_to_host(videos: Sequence[torch.Tensor], pinned: bool = False, watermark: bool = False) -> list[np.ndarray]:
    """Several (1, 3, T, H, W) videos in [-1, 1] -> uint8 (T, H, W, 3) arrays, converted on the device.

    With `pinned`, all of them come back in one non-blocking copy into pinned memory and one wait. With
    `watermark`, the flashhead watermark is added where the frames are (the GPU: an elementwise add before the
    copy), with the same integer arithmetic as `embed_watermark`, so the result is identical to marking on the host.
    """
    return HostFrames.start(videos, pinned=pinned, watermark=watermark).wait()


@dataclass
class HostFrames:
    """Frames on their way to the host: `start` queues the conversion and copy, `wait` returns the arrays.

    With pinned memory on a GPU the copy is queued without blocking and `wait` waits for that copy only (an event),
    not for work queued after it, such as the next round the streaming engine launched meanwhile. With
    `side_stream` (the copy_stream switch) the copy runs on a stream of its own, so the work queued after it (the
    motion re-encode) does not wait for the transfer either. `compiled` (the compile_color switch): the conversion
    to uint8, the watermark and the layout change in one compiled kernel instead of a chain of eager ones.
    """

    host: torch.Tensor
    lengths: list[int]
    copied: torch.cuda.Event | None = None

    @classmethod
    def start(
        cls,
        videos: Sequence[torch.Tensor],
        pinned: bool = False,
        watermark: bool = False,
        compiled: bool = False,
        side_stream: bool = False,
    ) -> HostFrames:
        if not videos:
            return cls(torch.empty(0, dtype=torch.uint8), [])
        lengths = [v.shape[2] for v in videos]
        video = torch.cat(list(videos), dim=2)[0] if len(videos) > 1 else videos[0][0]
        delta = _watermark_delta(video.shape[2], video.shape[3], video.device) if watermark else None
        frames = (_compiled_uint8_frames() if compiled else uint8_frames)(video, delta)  # (sum T, H, W, 3)
        if not (pinned and frames.is_cuda):
            return cls(frames.cpu(), lengths)
        host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
        stream = _copy_stream(frames.device) if side_stream else torch.cuda.current_stream(frames.device)
        if side_stream:
            stream.wait_stream(torch.cuda.current_stream(frames.device))  # the frames are written on the main stream
            frames.record_stream(stream)  # their memory is not reused before the copy has read them
        with torch.cuda.stream(stream):
            host.copy_(frames, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        return cls(host, lengths, copied)

    def wait(self) -> list[np.ndarray]:
        if self.copied is not None:
            self.copied.synchronize()
        return [chunk.numpy() for chunk in self.host.split(self.lengths)] if self.lengths else []


def uint8_frames(video: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, rounding to the nearest level; plus the watermark's
    (H, W, 1) integer `delta` where given (the same integer arithmetic as `embed_watermark`)."""
    frames = ((video.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)
    if delta is not None:
        frames = (frames.to(torch.int16) + delta).clamp(0, 255).to(torch.uint8)
    return frames.contiguous()


@functools.cache
def _compiled_uint8_frames() -> Callable:
    # Sizes symbolic: a chunk's frame count varies (a first chunk's early pieces, a stream's last chunk, batches),
    # and a pointwise kernel needs no specialisation, so one compile serves them all.
    return torch.compile(uint8_frames, dynamic=True)


@functools.cache
def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


@functools.lru_cache(maxsize=8)
def _watermark_delta(height: int, width: int, device: torch.device) -> torch.Tensor:
    from flashhead.media.watermark import watermark_delta

    return torch.from_numpy(np.array(watermark_delta(height, width))).to(device)[:, :, None]  # (H, W, 1)


class FlashHeadPipeline:
    """Portrait + speech -> talking-head video, chunk by chunk, with the released or our own models.

    Args:
        dit: the FlashHead DiT.
        vae: the VAE adapter matching the DiT's latent space (LTX for Lite, Wan2.1 for Pro).
        audio_encoder: 16 kHz waveform (n,) -> per-frame features (n * fps / 16000, layers, hidden).
        scheduler: timesteps and update rule (default: shift 5).
        config: generation settings (default: the official ones).
    """

    def __init__(
        self,
        dit: FlashHeadDiT,
        vae: VideoVAE,
        audio_encoder: AudioEncoder,
        scheduler: FlashHeadScheduler | None = None,
        config: GenerationConfig | None = None,
    ):
        self.dit, self.vae, self.audio_encoder = dit, vae, audio_encoder
        self.config = config or GenerationConfig()
        self.scheduler = scheduler or FlashHeadScheduler(shift=self.config.shift)
        if tuple(dit.config.vae_stride) != tuple(vae.stride):
            raise ConfigError(f"DiT vae_stride {tuple(dit.config.vae_stride)} != VAE stride {vae.stride}")
        if dit.config.out_dim != vae.latent_channels:
            raise ConfigError(f"DiT out_dim {dit.config.out_dim} != VAE latent channels {vae.latent_channels}")
        self.name = "custom"
        self.timer = NullTimer()  # set a StageTimer to measure where the time goes
        self.speed = SpeedConfig()
        self._fast = None  # FastDenoiser when a DiT switch is on
        self._sp = None  # SequenceParallelRunner after parallelize()
        self._sp_idle = None  # the group, where parallelize() chose not to split

    def optimize(self, speed: SpeedConfig | str | None = None) -> FlashHeadPipeline:
        """Switch optimisations on or off (`SpeedConfig`, or a string like "compile_dit=on,attention=cudnn").

        None or `SpeedConfig()` restores the plain eager path (except fp8, which needs a reload).
        Compilation and CUDA-graph capture happen lazily, at the first chunk of each batch size.
        """
        from flashhead.pipeline.fast_path import FastDenoiser, apply_module_switches

        if isinstance(speed, str):
            speed = SpeedConfig.parse(speed)
        speed = speed or SpeedConfig()
        apply_module_switches(self.dit, self.vae, speed)
        if hasattr(self.audio_encoder, "tf32_matmuls"):  # wav2vec2 (the official models), not a mel encoder
            self.audio_encoder.tf32_matmuls = speed.audio_tf32
        if self._sp is not None:  # the switches reset the attention kernels
            self._sp.model.install()
        self.speed = speed
        self._fast = FastDenoiser(self._velocity_model, speed) if speed.fast_denoiser else None
        return self

    # -- sequence parallel ----------------------------------------------------------------------------

    def parallelize(
        self,
        group,
        halo: int | None = None,
        force: bool = False,
        head_groups: int | None = None,
        attention: str | None = None,
    ) -> FlashHeadPipeline:
        """Split every chunk's DiT tokens and VAE decode over the ranks of `group` (a SequenceParallelGroup).

        Call on every rank, after moving the pipeline to the rank's device. The leader (rank 0) then uses the
        pipeline as usual (offline or through the streaming engine) and ends with `release_followers()`;
        every other rank calls `follow()`. `parallelize(None)` goes back to single-process inference.

        Only where the split pays (flashhead.parallel.policy: enough tokens per rank, e.g. Pro on 2 GPUs, not
        Lite): otherwise the leader runs alone and `follow()` returns at once; `force=True` splits anyway.
        `halo`: latent rows of context per decode strip for VAEs without an exact split (LTX).
        `head_groups`: Ulysses all-to-alls pipelined over that many head groups (None: the default, see
        flashhead.parallel.attention.default_head_groups; 1: not overlapped).
        `attention`: how self-attention is split: "ulysses", "ulysses_own_first" (Ulysses that attends this
        rank's own block of the first head group while the group is in flight), "ulysses_kv_first" (Ulysses
        with k / v sent before q is projected), "x_gather" (Ulysses with the block input gathered
        and the q / k / v projections split by heads), "kv_gather" (one all-gather of keys / values, overlapped
        with the local block's attention) or "ring"; None: Ulysses where the heads divide, else ring.
        """
        from flashhead.parallel.policy import MIN_TOKENS_PER_RANK, chunk_tokens, split_pays
        from flashhead.parallel.runner import SequenceParallelRunner
        from flashhead.parallel.vae import DEFAULT_HALO

        if self._sp is not None:
            self._sp.model.uninstall()
        self._sp = self._sp_idle = None
        if group is not None:
            shape = self.vae.latent_shape(self.config.frame_num, self.config.height, self.config.width)
            tokens = chunk_tokens(shape, tuple(self.dit.config.patch_size))
            if force or split_pays(tokens, group.world_size):
                halo = DEFAULT_HALO if halo is None else halo
                self._sp = SequenceParallelRunner(self.dit, self.vae, group, halo, head_groups, attention)
            else:
                self._sp_idle = group
                if group.is_leader:
                    logger.warning(
                        "%s: %d tokens per chunk over %d GPUs (< %d per GPU) would run slower split; running on "
                        "one GPU (for more streams, run one replica per GPU)",
                        self.name, tokens, group.world_size, MIN_TOKENS_PER_RANK,
                    )  # fmt: skip
        return self.optimize(self.speed)

    @property
    def sequence_parallel(self) -> bool:
        """Whether chunks are split over several ranks (after `parallelize`, where the split pays)."""
        return self._sp is not None

    @property
    def _velocity_model(self):
        return self.dit if self._sp is None else self._sp.model

    @torch.no_grad()  # as the leader's generate_chunks
    def follow(self) -> None:
        """On a follower rank: run the DiT and decode shards of each chunk the leader announces, until released.

        Returns at once where `parallelize` chose not to split (the leader then works alone).
        """
        if self._sp_idle is not None and not self._sp_idle.is_leader:
            return
        if self._sp is None or self._sp.group.is_leader:
            raise ConfigError("follow() runs on the follower ranks of a parallelized pipeline")
        while (chunk := self._sp.receive()) is not None:
            _, video = self._denoise_and_decode(chunk)
            if chunk.color is not None:  # this rank's block of the colour correction
                from flashhead.pipeline.fast_path import color_function

                video = self._sp.color(video, chunk.color, chunk.color_strength, color_function(self.speed, True))
            if chunk.encode is not None and chunk.color is not None:  # the motion re-encode, split by rows (Wan)
                self._sp.encode_own(video[:, :, -chunk.encode[2] :])
            elif chunk.encode is not None:
                self._sp.encode(None, chunk.encode)

    def release_followers(self) -> None:
        """On the leader: let the followers' `follow()` return (call once, when no chunk will follow)."""
        if self._sp is not None and self._sp.group.is_leader:
            self._sp.release()

    def draw_noise(self, generator: torch.Generator | None, pinned: bool | None = None) -> ChunkNoise:
        """One chunk's noise from a CPU generator (pinned host memory with the pinned_memory switch)."""
        cfg = self.config
        shape = (1, *self.vae.latent_shape(cfg.frame_num, cfg.height, cfg.width))
        pinned = (self.speed.pinned_memory and torch.cuda.is_available()) if pinned is None else pinned

        def randn() -> torch.Tensor:
            if not pinned:
                return torch.randn(shape, generator=generator)
            return torch.randn(shape, generator=generator, out=torch.empty(shape, pin_memory=True))

        initial = randn()
        renoise = None if cfg.use_euler else [randn() for _ in range(cfg.num_inference_steps)]
        return ChunkNoise(initial, renoise)

    def stage_noise(self, noise: ChunkNoise) -> ChunkNoise:
        """Start copying drawn (pinned) noise to the device now, e.g. during the chunk before the one it is for.

        The copies queue behind the work already launched, so the next chunk finds its noise on the device
        instead of the host copying it piece by piece between the chunks, while the GPU waits.
        """
        if not (self.device.type == "cuda" and noise.initial.is_pinned()):
            return noise

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, non_blocking=True)

        return ChunkNoise(move(noise.initial), None if noise.renoise is None else [move(r) for r in noise.renoise])

    # -- loading and saving ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = "auto",
        *,
        weights: str | Path | None = None,
        wav2vec: str | Path | None = None,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        config: GenerationConfig | None = None,
        local_files_only: bool | None = None,
    ) -> FlashHeadPipeline:
        """Load a pipeline.

        Args:
            model: "lite" or "pro" (the released SoulX-FlashHead checkpoints), "tiny" (the small model
                shipped inside the package), a folder written by `save_pretrained`, or "auto": official
                Lite when its files are under `weights` or in the local Hugging Face cache, else "tiny".
            weights: folder (or hub id) of the release, laid out as `SoulX-FlashHead-1_3B/` with
                `Model_Lite/`, `Model_Pro/`, `VAE_LTX/`, `VAE_Wan/`; default: the hub id, cache first.
            wav2vec: wav2vec2-base-960h folder or hub id; default: `wav2vec2-base-960h/` next to or inside
                `weights`, else the hub id `facebook/wav2vec2-base-960h` (cache first).
            device, torch_dtype: where and in which precision the DiT and VAE run (the audio encoder
                stays float32). Default: CUDA in bfloat16 when available, else CPU in float32.
            config: generation settings (default: the official ones, or the folder's own).
        """
        from flashhead.pipeline import registry

        return registry.load_pipeline(
            cls, model, weights=weights, wav2vec=wav2vec, device=device, torch_dtype=torch_dtype, config=config,
            local_files_only=local_files_only,
        )  # fmt: skip

    def save_pretrained(self, folder: str | Path, *, weights_dtype: torch.dtype | None = None) -> Path:
        """Write a self-contained folder (model_index.json, dit/, vae/, audio_encoder/, generation_config.json).

        `weights_dtype=torch.float16` halves the files (how flashhead-tiny ships); loading casts back.
        """
        from flashhead.pipeline import registry

        return registry.save_pipeline(self, Path(folder), weights_dtype=weights_dtype)

    # -- geometry -----------------------------------------------------------------------------------

    @property
    def temporal_stride(self) -> int:
        return self.vae.stride[0]

    @property
    def motion_frames(self) -> int:
        return self.config.motion_frames(self.temporal_stride)

    @property
    def new_frames(self) -> int:
        return self.config.new_frames(self.temporal_stride)

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.dit.parameters()).dtype

    def audio_config(self) -> AudioConfig:
        c = self.config
        return AudioConfig(
            sample_rate=c.sample_rate, fps=c.fps, frame_num=c.frame_num, window=self.dit.config.audio_window,
            cache_seconds=int(c.audio_cache_seconds),
        )  # fmt: skip

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> FlashHeadPipeline:
        """Move the DiT and VAE (and cast them to `dtype`); the audio encoder stays float32."""
        # nn.Module.to, not ModelMixin.to: the latter warns about fp32 modules this model does not have.
        torch.nn.Module.to(self.dit, device=device, dtype=dtype)
        self.vae.to(device=device, dtype=dtype)
        if isinstance(self.audio_encoder, torch.nn.Module):
            self.audio_encoder.to(device=device)
        return self

    # -- the two steps everything is made of ---------------------------------------------------------

    @torch.no_grad()
    def encode_reference(
        self,
        image: np.ndarray | torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> ReferenceState:
        """Encode a prepared portrait (H, W, 3) uint8, already at the output size.

        `generator` / `noise` feed the LTX posterior sample (the Wan VAE returns the mean and ignores them).
        """
        pixels = torch.from_numpy(np.array(image, dtype=np.float32))
        if pixels.ndim != 3 or pixels.shape[-1] != 3:
            raise ConfigError(f"reference image must be (H, W, 3), got {tuple(pixels.shape)}")
        if self.speed.pinned_memory and self.device.type == "cuda":  # no host sync for the upload: a server opens
            pixels = pixels.pin_memory().to(self.device, non_blocking=True)  # sessions between others' rounds
        ref = (pixels / 255 * 2 - 1).permute(2, 0, 1)[None, :, None].to(self.device, self.dtype)  # (1,3,1,H,W)
        clip = ref.expand(-1, -1, self.config.frame_num, -1, -1)
        latents = self._encode(clip, generators=[generator], noise=noise)
        return ReferenceState(image=ref, latents=latents)

    @torch.no_grad()
    def generate_chunk(
        self,
        reference: ReferenceState,
        motion_latents: torch.Tensor,
        audio_context: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        renoise: Sequence[torch.Tensor] | None = None,
        encode_noise: torch.Tensor | None = None,
        encode_generator: torch.Generator | None = None,
    ) -> ChunkResult:
        """Generate one chunk of `frame_num` frames (the first `motion_frames` re-render the motion context).

        Noise comes from `generator` (CPU generator: the same numbers on every device) in the official
        order, initial noise then one re-noise per step, unless given explicitly.
        """
        return self.generate_chunks(
            [reference], [motion_latents], [audio_context], generators=[generator],
            encode_generators=[encode_generator], noises=None if noise is None else [noise],
            renoises=None if renoise is None else [renoise],
            encode_noises=None if encode_noise is None else [encode_noise],
        )[0]  # fmt: skip

    @torch.no_grad()
    def generate_chunks(
        self,
        references: Sequence[ReferenceState],
        motion_latents: Sequence[torch.Tensor],
        audio_contexts: Sequence[torch.Tensor],
        *,
        generators: Sequence[torch.Generator | None] | None = None,
        encode_generators: Sequence[torch.Generator | None] | None = None,
        noises: Sequence[torch.Tensor] | None = None,
        renoises: Sequence[Sequence[torch.Tensor]] | None = None,
        encode_noises: Sequence[torch.Tensor | None] | None = None,
        new_only: bool | None = None,
        while_denoising: Callable[[], None] | None = None,
        before_encode: Callable[[list[ChunkResult]], None] | None = None,
        first_frames: Callable[[list[ChunkResult]], None] | None = None,
    ) -> list[ChunkResult]:
        """Generate one chunk for each of several streams in one batch (one DiT call per step for all).

        Each stream keeps its own portrait, motion latents (1 frame on its first chunk, 2 afterwards),
        audio and noise generators, so a stream's frames do not depend on which others share its batch.
        `new_only=False` decodes every frame even when the decode_new_only switch is on.
        `while_denoising`: host work to run once the chunk's DiT is queued on the device and before its decode
        is, i.e. while the GPU is busy for the longest (the streaming engine queues the next round's audio here).
        `before_encode`: called with the results once their colour-corrected frames are queued and before the
        motion re-encode is (their `motion_latents` are None until then): the streaming engine queues the frames'
        copy to the host here, so that it does not wait for the re-encode, which only the next chunk needs.
        `first_frames`: where the VAE decodes causally in time (Wan2.1, one GPU), the decode pauses once the first
        new frame is decoded, colour-corrects those frames and calls this with results whose `video` holds them
        (`latents` final, `motion_latents` None), then decodes the rest: the streaming engine hands a new stream's
        first frames out while the rest of its chunk decodes. The results returned hold every frame, as without it.
        """
        cfg = self.config
        B = len(references)
        shape = (1, *self.vae.latent_shape(cfg.frame_num, cfg.height, cfg.width))
        generators = list(generators or [None] * B)
        for ref in references:
            if ref.latents.shape[-2:] != shape[-2:]:
                raise ConfigError(f"reference latents {tuple(ref.latents.shape)} do not fit {cfg.height}x{cfg.width}")
        distinct = all(g is not None for g in generators) and len({id(g) for g in generators}) == B
        if noises is None and renoises is None and self.speed.pinned_memory and distinct:
            # Per stream (each has its own generator, so the numbers equal the plain path's) into pinned memory.
            drawn = [self.draw_noise(g) for g in generators]
            noises = [d.initial for d in drawn]
            renoises = None if cfg.use_euler else [d.renoise for d in drawn]
        if noises is None:
            noises = [torch.randn(shape, generator=g) for g in generators]
        if renoises is None and not cfg.use_euler:
            renoises = [[torch.randn(shape, generator=g) for _ in range(cfg.num_inference_steps)] for g in generators]
        dev, dt = self.device, self.dtype
        lengths = [m.shape[2] for m in motion_latents]
        motion = torch.zeros((B, shape[1], max(lengths), *shape[3:]), device=dev, dtype=dt)
        for b, m in enumerate(motion_latents):
            motion[b, :, : lengths[b]] = m[0].to(dev, dt)
        step_noise = None
        if renoises is not None:
            step_noise = [self._to_device([r[i] for r in renoises]) for i in range(cfg.num_inference_steps)]
        initial = self._to_device(list(noises))
        ref_latents = torch.cat([r.latents for r in references])
        context = torch.cat(list(audio_contexts)).to(dev)
        # decode_new_only: skip the leading latent frames that only hold re-rendered motion frames, keeping
        # one of them as context; both VAEs map the last k latent frames to the last 1 + st * (k - 1) frames.
        skip = max(cfg.motion_latent_frames - 1, 0) if (self.speed.decode_new_only and new_only is not False) else 0
        first_frame = skip * self.temporal_stride
        split_encode = None  # the motion frames' shape, where the followers help to encode them
        if self._sp is not None and self._sp.split_encode:
            split_encode = (B, 3, self.motion_frames, shape[3] * self.vae.stride[1], shape[4] * self.vae.stride[2])
        strength = cfg.color_correction_strength
        split_color = None  # the reference's colour statistics, where the ranks colour-correct a block of frames each
        if self._sp is not None and strength > 0:
            split_color = torch.cat([r.color_statistics(self.vae.dtype) for r in references])
        head_video = []  # the colour-corrected first piece, when the decode came in two

        def color(decoded: torch.Tensor) -> torch.Tensor:
            from flashhead.pipeline.fast_path import color_function

            if strength == 0:
                return decoded
            if split_color is not None:
                return self._sp.color(decoded, split_color, strength, color_function(self.speed, True))
            return color_function(self.speed)(decoded, torch.cat([r.image for r in references]), strength)

        def head_decoded(latents: torch.Tensor, head: torch.Tensor) -> None:
            head_video.append(color(head))  # per frame, so the same as correcting the whole chunk
            first_frames([ChunkResult(latents=latents[b : b + 1], decoded=head[b : b + 1],
                                      video=head_video[0][b : b + 1], motion_latents=None, first_frame=first_frame)
                          for b in range(B)])  # fmt: skip

        # The first new frame is chunk frame `motion_frames`: decoded frame `ahead` of the tail that starts at
        # `first_frame`; latent frames 0..k of the tail decode to its first 1 + st * k frames.
        ahead = self.motion_frames - first_frame
        head = 1 + -(-ahead // self.temporal_stride) if first_frames is not None else None
        latents, decoded = self._denoise_and_decode(
            ChunkInputs(initial, motion, ref_latents, context, step_noise, lengths, skip, split_encode, split_color,
                        strength),
            while_denoising, (head, head_decoded) if head is not None else None,
        )  # fmt: skip
        video = decoded
        if strength > 0:
            with self.timer("color_correction"):
                if head_video:
                    video = torch.cat([head_video[0], color(decoded[:, :, head_video[0].shape[2] :])], dim=2)
                else:
                    video = color(decoded)
        results = [
            ChunkResult(latents=latents[b : b + 1], decoded=decoded[b : b + 1], video=video[b : b + 1],
                        motion_latents=None, first_frame=first_frame)
            for b in range(B)
        ]  # fmt: skip
        if before_encode is not None:
            before_encode(results)
        with self.timer("vae_encode_motion"):
            tail = video[:, :, -self.motion_frames :]
            if split_encode is not None and split_color is not None:  # every rank holds the corrected frames
                motion_out = self._sp.encode_own(tail)
            elif split_encode is not None:
                motion_out = self._sp.encode(tail, split_encode)
            elif encode_noises is not None and all(n is not None for n in encode_noises):
                motion_out = self._encode(tail, noise=torch.cat(list(encode_noises)))
            else:
                motion_out = self._encode(tail, generators=list(encode_generators or [None] * B))
        for b, result in enumerate(results):
            result.motion_latents = motion_out[b : b + 1]
        return results

    def _denoise_and_decode(
        self,
        chunk: ChunkInputs,
        while_denoising: Callable[[], None] | None = None,
        head: tuple[int, Callable[[torch.Tensor, torch.Tensor], None]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Denoised latents and their decode; the part of a chunk that all sequence-parallel ranks run.

        `head` = (k, callback): on one GPU, with a VAE that decodes causally, decode the first k latent frames,
        call `callback(latents, their pixels)`, then decode the rest (the callback's work, colour correction and
        a queued copy, is counted in vae_decode).
        """
        cfg = self.config
        if self._sp is not None and self._sp.group.is_leader:
            self._sp.announce(chunk)
        self.scheduler.set_timesteps(cfg.num_inference_steps, dtype=self.dtype)
        args = (chunk.initial, chunk.motion, chunk.ref_latents, chunk.context)
        with self.timer("dit"):
            if self._fast is not None and cfg.guidance_scale == 1.0:
                latents = self._fast(self.scheduler, *args, chunk.step_noise, cfg.use_euler, chunk.lengths)
            else:
                latents = denoise_chunk(
                    self._velocity_model, self.scheduler, *args, renoise=chunk.step_noise,
                    guidance_scale=cfg.guidance_scale, euler=cfg.use_euler, motion_lengths=chunk.lengths,
                    guidance_steps=cfg.guidance_steps,
                )  # fmt: skip
        if while_denoising is not None:
            while_denoising()
        with self.timer("vae_decode"):
            tail = latents[:, :, chunk.skip :]
            if self._sp is not None:
                decoded = self._sp.decode(tail)
            elif head is not None:
                pieces = []
                for piece in self.vae.decode_in_pieces(tail, head[0]):
                    if not pieces and piece.shape[2] < 1 + self.temporal_stride * (tail.shape[2] - 1):
                        head[1](latents, piece)  # the first of two pieces
                    pieces.append(piece)
                decoded = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
            else:
                decoded = graphed(self.vae, "decode", self.vae.decode)(tail)
        return latents, decoded

    def _to_device(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate host tensors and move them to the pipeline's device and dtype.

        With pinned_memory the concatenation is written into pinned memory and copied without blocking
        the host (the caching host allocator keeps the buffer alive until the copy has run).
        """
        if any(t.device == self.device for t in tensors):  # staged ahead (stage_noise), maybe with fresh ones
            return torch.cat([t.to(self.device, non_blocking=True) for t in tensors]).to(self.dtype)
        if self.speed.pinned_memory and self.device.type == "cuda":
            shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
            staged = torch.cat(tensors, out=torch.empty(shape, dtype=tensors[0].dtype, pin_memory=True))
            return staged.to(self.device, non_blocking=True).to(self.dtype)
        return torch.cat(tensors).to(self.device, self.dtype)

    def _encode(
        self,
        video: torch.Tensor,
        generators: Sequence[torch.Generator | None] | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """VAE-encode a batch; a sampling VAE (LTX) gets float32 CPU noise from each stream's generator."""
        if not getattr(self.vae, "sample_posterior", False):
            return graphed(self.vae, "encode", self.vae.encode)(video)
        if noise is None:
            shape = (1, *self.vae.latent_shape(video.shape[2], video.shape[3], video.shape[4]))
            noise = torch.cat([torch.randn(shape, generator=g) for g in (generators or [None] * video.shape[0])])
        if self.speed.pinned_memory and video.is_cuda and noise.device.type == "cpu":
            noise = noise.pin_memory().to(video.device, non_blocking=True)  # no host sync before the encode
        return graphed(self.vae, "encode_sampled", lambda v, n: self.vae.encode(v, noise=n))(video, noise.to(video))

    # -- whole videos --------------------------------------------------------------------------------

    def audio_contexts(self, waveform: torch.Tensor) -> Iterator[torch.Tensor]:
        """Per-chunk audio contexts for a whole 16 kHz waveform, in the configured audio mode."""
        if self.config.audio_mode == "once":
            with self.timer("audio_features"):
                contexts = encode_offline(self.audio_encoder, waveform, self.new_frames, self.audio_config())
            yield from contexts
            return
        cache = AudioContextCache(self.audio_encoder, self.new_frames, self.audio_config())
        contexts = cache.iter_chunks(waveform)
        while True:
            with self.timer("audio_features"):
                context = next(contexts, None)
            if context is None:
                return
            yield context

    def num_chunks(self, num_samples: int) -> int:
        spf = self.config.sample_rate // self.config.fps
        frames = math.ceil(num_samples / spf)
        if self.config.audio_mode == "once":
            return max(1, math.ceil(max(frames - self.config.frame_num, 0) / self.new_frames) + 1)
        return math.ceil(frames / self.new_frames)

    def iter_frames(self, reference: ReferenceState, waveform: torch.Tensor, *, seed: int = 42) -> Iterator[np.ndarray]:
        """Yield each chunk's new frames, (n, H, W, 3) uint8, as soon as the chunk is generated."""
        generator = torch.Generator().manual_seed(seed)
        encode_generator = torch.Generator().manual_seed(seed + 1)
        motion = reference.first_motion
        for index, context in enumerate(self.audio_contexts(waveform)):
            # Stream mode drops the re-rendered motion frames of every chunk (also the first, whose
            # motion context is the reference); once mode keeps the first chunk whole, as upstream.
            keep_from = 0 if (self.config.audio_mode == "once" and index == 0) else self.motion_frames
            chunk = self.generate_chunks(
                [reference], [motion], [context], generators=[generator], encode_generators=[encode_generator],
                new_only=keep_from > 0,
            )[0]  # fmt: skip
            motion = chunk.motion_latents
            yield to_uint8(chunk.frames_from(keep_from))

    def __call__(
        self,
        image: str | Path | np.ndarray,
        audio: str | Path | np.ndarray | torch.Tensor,
        *,
        sample_rate: int | None = None,
        seed: int = 42,
        crop: bool = True,
        watermark: bool = True,
        progress: bool = True,
        allow_silent: bool = False,
    ) -> FlashHeadOutput:
        """Generate a talking-head video.

        Args:
            image: portrait path, or a prepared (H, W, 3) uint8 array at the output size.
            audio: speech file (any format PyAV reads, also a video's audio track) or a mono waveform.
            sample_rate: the waveform's rate when `audio` is an array (resampled to 16 kHz).
            seed: noise seed; the same seed gives the same frames.
            crop: detect the largest face and crop around it as the official preprocessing does.
            watermark: embed the invisible flashhead watermark (on by default; see docs/media.md).
            progress: show a progress bar.
            allow_silent: render silent audio (an idle avatar) instead of refusing it as a likely mistake.

        Returns:
            FlashHeadOutput with exactly round(audio seconds * fps) frames.
        """
        from tqdm.auto import tqdm

        portrait = self.prepare_image(image, crop=crop)
        waveform = self.prepare_audio(audio, sample_rate, check_silence=not allow_silent)
        num_frames = round(len(waveform) * self.config.fps / self.config.sample_rate)
        reference = self.encode_reference(portrait, generator=reference_generator(seed))
        chunks = []
        bar = tqdm(total=num_frames, unit="frame", desc="generating", disable=not progress)
        for frames in self.iter_frames(reference, torch.from_numpy(waveform), seed=seed):
            chunks.append(frames)
            bar.update(min(len(frames), num_frames - bar.n))
            if sum(map(len, chunks)) >= num_frames:
                break
        bar.close()
        frames = np.concatenate(chunks)[:num_frames]
        if watermark:
            from flashhead.media.watermark import embed_watermark

            frames = embed_watermark(frames)
        metadata = {"model": self.name, "seed": seed, "steps": self.config.num_inference_steps}
        return FlashHeadOutput(
            frames, self.config.fps, waveform, self.config.sample_rate, metadata, self.speed.video_encoder
        )

    def prepare_image(self, image: str | Path | np.ndarray, crop: bool = True) -> np.ndarray:
        size = (self.config.height, self.config.width)
        if isinstance(image, np.ndarray) and image.shape[:2] == size:
            return image
        from flashhead.media.face import prepare_portrait

        return prepare_portrait(image, crop=crop, size=size)

    def prepare_audio(
        self, audio: str | Path | np.ndarray | torch.Tensor, sample_rate: int | None, check_silence: bool = True
    ) -> np.ndarray:
        from flashhead.media.audio_io import check_not_silent, load_audio

        if isinstance(audio, (str, Path)):
            waveform, _ = load_audio(audio, target_sr=self.config.sample_rate)
        else:
            from flashhead.models.audio import prepare_waveform

            if sample_rate is None:
                raise AudioError("sample_rate is required when audio is given as an array")
            waveform = prepare_waveform(audio, sample_rate, self.config.sample_rate).numpy()
        if check_silence:
            check_not_silent(
                waveform, self.config.sample_rate, source=audio if isinstance(audio, (str, Path)) else None
            )
        return np.ascontiguousarray(waveform, dtype=np.float32)
