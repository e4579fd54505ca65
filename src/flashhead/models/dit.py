"""The FlashHead diffusion transformer: a Wan2.1-style DiT conditioned on a reference latent and audio.

One chunk of video latents (B, C, F, H, W) is concatenated on channels with the reference-image latent,
patchified into F*H'*W' tokens and run through `num_layers` blocks. Each block does full bidirectional
self-attention with 3-D RoPE over the whole chunk, then frame-local cross-attention (the tokens of latent
frame f attend only to the audio tokens of frame f), then an MLP; adaLN modulation comes from the
timestep. The head predicts the flow-matching velocity.

State-dict names match the released checkpoints (`Soul-AILab/SoulX-FlashHead-1_3B`, Model_Lite and
Model_Pro), so they load unchanged. Unlike the official forward, this one takes a batch with one timestep
per sample, which the streaming server uses to batch sessions that are at different denoising steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from flashhead.errors import CheckpointError, ConfigError
from flashhead.models.audio_projection import AudioProjModel, group_audio_windows
from flashhead.models.linear_gelu import linear_gelu
from flashhead.models.loading import build_and_load, read_json, read_safetensors, resolve_model_dir, safetensors_files
from flashhead.models.qk_norm_rope import qk_norm_rope

# Constructor configurations of the released checkpoints (config.json of Model_Lite / Model_Pro).
LITE_CONFIG: dict = dict(
    dim=1536, in_dim=256, ffn_dim=8960, out_dim=128, text_dim=4096, freq_dim=256, eps=1e-6,
    vae_stride=[8, 32, 32], patch_size=[1, 1, 1], num_heads=12, num_layers=30, has_image_input=False,
)  # fmt: skip
PRO_CONFIG: dict = {**LITE_CONFIG, "in_dim": 32, "out_dim": 16, "vae_stride": [4, 8, 8], "patch_size": [1, 2, 2]}

# How the official `AudioProjModel` keyword arguments map onto our config fields.
OFFICIAL_AUDIO_PROJ_NAMES = {
    "seq_len": "audio_window",
    "blocks": "audio_layers",
    "channels": "audio_channels",
    "intermediate_dim": "audio_intermediate_dim",
    "context_tokens": "audio_tokens",
    "norm_output_audio": "audio_norm_output",
}


def official_config(variant: str) -> dict:
    """The constructor config of a released variant: "lite" or "pro"."""
    configs = {"lite": LITE_CONFIG, "pro": PRO_CONFIG}
    if variant not in configs:
        raise ConfigError(f"unknown model variant {variant!r}; expected one of {sorted(configs)}")
    return dict(configs[variant])


def audio_config_from_official(audio_proj_kwargs: dict, config: dict) -> dict:
    """Map official `AudioProjModel` kwargs (as the fixtures' `audio_proj_override`) to our config fields."""
    out = {ours: audio_proj_kwargs[theirs] for theirs, ours in OFFICIAL_AUDIO_PROJ_NAMES.items()}
    if audio_proj_kwargs.get("output_dim", config["dim"]) != config["dim"]:
        raise ConfigError("audio projection output_dim must equal the DiT width `dim`")
    expected_vf = out["audio_window"] + config["vae_stride"][0] - 1
    if audio_proj_kwargs.get("seq_len_vf", expected_vf) != expected_vf:
        raise ConfigError(f"seq_len_vf must be audio_window + vae_stride[0] - 1 = {expected_vf}")
    return out


def sinusoidal_embedding(dim: int, timestep: torch.Tensor) -> torch.Tensor:
    """[cos | sin] timestep embedding computed in float64, returned in the timestep's dtype."""
    freqs = torch.pow(10000, -torch.arange(dim // 2, dtype=torch.float64, device=timestep.device) / (dim // 2))
    angles = torch.outer(timestep.double(), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=1).to(timestep.dtype)


def rope_frequencies(head_dim: int, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """Complex 3-D RoPE phasors (L, 1, head_dim // 2) for a (frames, height, width) token grid.

    The head dimension is split as Wan2.1 does: height and width parts of 2 * (head_dim // 6) channels
    each and a time part of the rest; each part rotates by its own integer grid index.
    """

    def axis(dim: int, n: int) -> torch.Tensor:
        inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device)[: dim // 2] / dim)
        angles = torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv)
        return torch.polar(torch.ones_like(angles), angles)  # (n, dim // 2) complex128

    f, h, w = grid
    d_hw = 2 * (head_dim // 6)
    ft, fh, fw = axis(head_dim - 2 * d_hw, f), axis(d_hw, h), axis(d_hw, w)
    table = torch.cat(
        [
            ft[:, None, None].expand(f, h, w, -1),
            fh[None, :, None].expand(f, h, w, -1),
            fw[None, None, :].expand(f, h, w, -1),
        ],
        dim=-1,
    )
    return table.reshape(f * h * w, 1, -1)


def rope_table(
    head_dim: int, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The RoPE phasors of `rope_frequencies` as a real table (L, 1, head_dim // 2, 2, 2), float64 unless `dtype`.

    Per channel pair (re, im): [..., 0, :] = (cos, cos) multiplies (re, im), [..., 1, :] = (-sin, sin) multiplies
    (im, re). So the rotation is two products and a sum per channel, with no interleaving stack: compiled, the
    stack made Inductor write the rotated pairs out in float64 and read them back (4x the bytes of the bf16
    result, twice per layer). Real instead of complex so that a compiled graph can use it; float64 like the
    official arithmetic, because a float32 rotation flips enough bf16 roundings to move random-weight outputs by
    ~35 dB PSNR. The results are bit-identical to the complex product's. A float32 table (the rope_fp32 switch)
    rotates in float32: the same products rounded otherwise, checked as a reassociating switch.
    """
    cos, sin = torch.view_as_real(rope_frequencies(head_dim, grid, device)).unbind(-1)  # (L, 1, head_dim // 2)
    table = torch.stack([torch.stack([cos, cos], -1), torch.stack([-sin, sin], -1)], -2)
    return table.to(dtype).contiguous()


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B, L, heads, head_dim) by freqs.

    freqs is either the complex128 table of `rope_frequencies` (L, 1, head_dim // 2), the official float64
    arithmetic, or the real table of `rope_table` (L, 1, head_dim // 2, 2, 2), the same arithmetic without complex
    dtypes (the fast path): re' = re * cos + im * (-sin), im' = im * cos + re * sin, bit-identical.
    """
    if freqs.is_complex():
        xc = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * freqs).flatten(-2).to(x.dtype)
    pairs = x.to(freqs.dtype).unflatten(-1, (-1, 2))  # (..., head_dim // 2, 2): (re, im)
    return (pairs * freqs[..., 0, :] + pairs.flip(-1) * freqs[..., 1, :]).flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    """RMS normalisation over the last dim, computed in float32 and scaled by a learned weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(x, self.inverse_rms(x), self.weight)

    # Split out for callers that normalise x in parts (the sequence-parallel q, per rank's block of heads).
    def inverse_rms(self, x: torch.Tensor) -> torch.Tensor:
        """1 / RMS of x over the last dim (float32, keepdim)."""
        return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)

    @staticmethod
    def scale(x: torch.Tensor, inverse_rms: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x times its 1 / RMS, in x's dtype, times the weight (or the part of it for x's channels)."""
        return (x.float() * inverse_rms).to(x.dtype) * weight


# An attention kernel on (B, L, heads, d) tensors returning (B, L, heads, d), e.g. FlashAttention-3.
AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch SDPA as an AttentionKernel: (B, L, heads, d) in and out."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head SDPA on (B, L, heads * d) projections (q, k may already be split as (B, L, heads, d))."""
    q, k, v = (t.unflatten(-1, (heads, -1)) if t.dim() == 3 else t for t in (q, k, v))
    return sdpa_kernel(q, k, v).flatten(2)


def _attend(q, k, v, heads: int, kernel: AttentionKernel | None) -> torch.Tensor:
    if kernel is None:
        return attention(q, k, v, heads)
    q, k, v = (t.unflatten(-1, (heads, -1)) if t.dim() == 3 else t for t in (q, k, v))
    return kernel(q, k, v).flatten(2)


def folded_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: nn.Linear, heads: int):
    """`out(attention(q, k, v))` for few keys (the 32 audio tokens of a frame) as two dense GEMMs, the same maths.

    A fused attention kernel spends most of its time on per-tile overhead when there are 32 keys. Here the scores of
    all heads come from one GEMM against a block-diagonal key matrix (head h's keys on block h), and the output
    projection is folded into the values (per head, v_h @ W_o[:, h]^T is a keys x dim block), so the weighted sum and
    the projection are one GEMM with an inner size of heads * keys instead of two. q (N, Lq, D); k, v (N, keys, D).
    """
    n, keys, dim = k.shape
    d = dim // heads
    eye = torch.eye(heads, dtype=k.dtype, device=k.device).view(1, heads, 1, heads, 1)
    k_blocks = (k.view(n, keys, heads, d).permute(0, 2, 3, 1).unsqueeze(3) * eye).reshape(n, dim, heads * keys)
    scores = (q @ k_blocks).unflatten(-1, (heads, keys))  # (N, Lq, heads, keys)
    wide = torch.promote_types(scores.dtype, torch.float32)  # the softmax in float32 at least, as attention kernels
    probs = torch.softmax(scores.to(wide) * d**-0.5, dim=-1).to(q.dtype).flatten(2)
    v_out = torch.einsum("njhi,ohi->nhjo", v.view(n, keys, heads, d), out.weight.view(-1, heads, d))
    return torch.baddbmm(out.bias, probs, v_out.reshape(n, heads * keys, -1))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.kernel: AttentionKernel | None = None  # None: torch SDPA (see FlashHeadDiT.set_attention_kernel)
        self.fused_qk_rope = False  # see FlashHeadDiT.set_fused_qk_rope

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        if self.fused_qk_rope:  # each of q, k normalised and rotated by one kernel that reads its rows once
            q = qk_norm_rope(self.q(x), self.norm_q.weight, rope, self.num_heads, self.norm_q.eps)
            k = qk_norm_rope(self.k(x), self.norm_k.weight, rope, self.num_heads, self.norm_k.eps)
        else:
            q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1)), rope)
            k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1)), rope)
        return self.o(_attend(q, k, self.v(x), self.num_heads, self.kernel))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.kernel: AttentionKernel | None = None
        self.folded = False  # see FlashHeadDiT.set_cross_attn_fold

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k = self.norm_q(self.q(x)), self.norm_k(self.k(context))
        if self.folded:
            return folded_cross_attention(q, k, self.v(context), self.o, self.num_heads)
        return self.o(_attend(q, k, self.v(context), self.num_heads, self.kernel))


class DiTAudioBlock(nn.Module):
    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads, eps)
        self.cross_attn = CrossAttention(dim, num_heads, eps)
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.fused_gelu = False  # see FlashHeadDiT.set_fused_gelu

    def forward(self, x: torch.Tensor, audio: torch.Tensor, t_mod: torch.Tensor, rope: torch.Tensor):
        # x: (B, L, D) tokens in (f, h, w) order; audio: (B, F, tokens, D); t_mod: (B, 6, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + t_mod).chunk(6, dim=1)
        x = x + self.self_attn(self.norm1(x) * (1 + scale1) + shift1, rope) * gate1
        B, n_frames = audio.shape[:2]
        frame_tokens = self.norm3(x).unflatten(1, (n_frames, -1)).flatten(0, 1)  # (B*F, L/F, D)
        x = x + self.cross_attn(frame_tokens, audio.flatten(0, 1)).unflatten(0, (B, n_frames)).flatten(1, 2)
        return x + self.feed_forward(self.norm2(x) * (1 + scale2) + shift2) * gate2

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_gelu:  # the first layer's bias and GELU in its GEMM's epilogue: one kernel instead of two
            return self.ffn[2](linear_gelu(x, self.ffn[0].weight, self.ffn[0].bias))
        return self.ffn(x)


class Head(nn.Module):
    def __init__(self, dim: int, out_features: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.head = nn.Linear(dim, out_features)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation + t.unsqueeze(1)).chunk(2, dim=1)  # each (B, 1, D)
        return self.head(self.norm(x) * (1 + scale) + shift)


class MLP(nn.Module):
    """Kept only so that official checkpoints load strictly: `audio_emb` is never called in forward."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, in_dim),
            nn.GELU(),
            nn.Linear(in_dim, out_dim),
            nn.LayerNorm(out_dim),
        )


class FlashHeadDiT(ModelMixin, ConfigMixin):
    """Audio-conditioned video DiT of SoulX-FlashHead (official class name: `WanModelAudioProject`).

    Config fields are the official constructor arguments plus the audio-projection sizes that the official
    constructor hard-codes (`audio_*`, official values as defaults). Defaults give the Lite variant.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTAudioBlock"]
    _keys_to_ignore_on_load_unexpected = None

    @register_to_config
    def __init__(
        self,
        dim: int = 1536,
        in_dim: int = 256,
        ffn_dim: int = 8960,
        out_dim: int = 128,
        text_dim: int = 4096,
        freq_dim: int = 256,
        eps: float = 1e-6,
        vae_stride: tuple[int, int, int] = (8, 32, 32),
        patch_size: tuple[int, int, int] = (1, 1, 1),
        num_heads: int = 12,
        num_layers: int = 30,
        has_image_input: bool = False,
        audio_window: int = 5,
        audio_layers: int = 12,
        audio_channels: int = 768,
        audio_intermediate_dim: int = 512,
        audio_tokens: int = 32,
        audio_norm_output: bool = True,
    ):
        super().__init__()
        if has_image_input:
            raise ConfigError("has_image_input=True (CLIP image branch) is not supported; released models use False")
        if dim % num_heads:
            raise ConfigError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if in_dim != 2 * out_dim:
            raise ConfigError(f"in_dim must be 2 * out_dim (noisy latent ‖ reference latent), got {in_dim}, {out_dim}")
        self.gradient_checkpointing = False
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=tuple(patch_size), stride=tuple(patch_size))
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(DiTAudioBlock(dim, ffn_dim, num_heads, eps) for _ in range(num_layers))
        self.head = Head(dim, out_dim * math.prod(patch_size), eps)
        self.audio_emb = MLP(audio_channels, dim)  # unused (vestigial in the official model), see MLP
        self.audio_proj = AudioProjModel(
            window=audio_window,
            window_vf=audio_window + vae_stride[0] - 1,
            layers=audio_layers,
            channels=audio_channels,
            intermediate_dim=audio_intermediate_dim,
            output_dim=dim,
            tokens=audio_tokens,
            norm_output=audio_norm_output,
        )

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predict the flow-matching velocity of one chunk.

        Args:
            x: noisy latents (B, out_dim, F, H, W); their first latent frames may hold clean motion latents.
            timestep: (B,) or (1,) diffusion time in [0, 1000], one value per sample.
            context: windowed wav2vec features (B, 1 + vae_stride[0] * (F - 1), window, layers, channels).
            y: reference-image latent, same shape as x.

        Returns:
            velocity (B, out_dim, F, H, W).
        """
        tokens, grid = self.patchify(x, y)
        t, t_mod = self.embed_time(timestep, x.shape[0], tokens.dtype)
        audio = self.embed_audio(context, tokens.dtype)
        return self.forward_tokens(tokens, grid, t, t_mod, audio, self.rope(grid, tokens.device))

    def patchify(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Noisy and reference latents -> tokens (B, L, D) in (f, h, w) order, and the token grid."""
        x = self.patch_embedding(torch.cat([x, y], dim=1))  # (B, D, F, H', W')
        # Contiguous (B, L, D): a transposed view would carry its channel-major layout through every block's
        # residual stream (elementwise outputs keep their input's strides), so each norm reduced over a strided
        # dim and each GEMM read a transposed operand (Lite on an H100: 314 against 273 us per block).
        return x.flatten(2).transpose(1, 2).contiguous(), tuple(x.shape[2:])

    def embed_time(
        self, timestep: torch.Tensor, batch: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(t (B, D), t_mod (B, 6, D)) for timesteps (B,) or (1,); depends only on the timestep values."""
        cfg = self.config
        # Like the official code, the timestep is rounded to the activation dtype before embedding.
        timestep = timestep.reshape(-1).to(device=self.patch_embedding.weight.device, dtype=dtype).expand(batch)
        t = self.time_embedding(sinusoidal_embedding(cfg.freq_dim, timestep))  # (B, D)
        return t, self.time_projection(t).unflatten(1, (6, cfg.dim))

    def embed_audio(self, context: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Audio tokens (B, F, tokens, D) of a chunk's windowed wav2vec features; the same at every step."""
        return self.audio_proj(*group_audio_windows(context.to(dtype), self.config.vae_stride[0]))

    def rope(
        self, grid: tuple[int, int, int], device: torch.device, table: bool = False, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """RoPE for a token grid: the official complex128 phasors, or with table=True the real table (`dtype`)."""
        head_dim = self.config.dim // self.config.num_heads
        return rope_table(head_dim, grid, device, dtype) if table else rope_frequencies(head_dim, grid, device)

    def forward_embedded(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        t: torch.Tensor,
        t_mod: torch.Tensor,
        audio: torch.Tensor,
        rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The forward with the timestep and audio embeddings given (the fast path computes them once)."""
        tokens, grid = self.patchify(x, y)
        return self.forward_tokens(tokens, grid, t, t_mod, audio, self.rope(grid, x.device) if rope is None else rope)

    def forward_tokens(
        self,
        x: torch.Tensor,
        grid: tuple[int, int, int],
        t: torch.Tensor,
        t_mod: torch.Tensor,
        audio: torch.Tensor,
        rope: torch.Tensor,
    ) -> torch.Tensor:
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, audio, t_mod, rope)
            else:
                x = block(x, audio, t_mod, rope)
        x = self.head(x, t)  # (B, L, pt*ph*pw*out_dim)
        return self.unpatchify(x, grid)

    def set_attention_kernel(self, kernel: AttentionKernel | None, cross: bool = True) -> None:
        """Use `kernel` ((B, L, heads, d) q, k, v -> out) for the self-attentions, and the cross-attentions unless
        `cross` is False (those then use torch SDPA); None restores torch SDPA."""
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.kernel = kernel
            elif isinstance(module, CrossAttention):
                module.kernel = kernel if cross else None

    def set_fused_gelu(self, on: bool) -> None:
        """Run each block's FFN as one GEMM with a bias + GELU epilogue and one plain GEMM (same weights)."""
        for block in self.blocks:
            block.fused_gelu = on

    def set_fused_qk_rope(self, on: bool) -> None:
        """Normalise and rotate each self-attention's q and k with one kernel each (flashhead.models.qk_norm_rope;
        inference only, with a float32 RoPE table: the fast path's rope_fp32)."""
        for block in self.blocks:
            block.self_attn.fused_qk_rope = on

    def set_cross_attn_fold(self, on: bool) -> None:
        """Run each audio cross-attention and its output projection as two dense GEMMs (folded_cross_attention)."""
        for block in self.blocks:
            block.cross_attn.folded = on

    # Parameters the forward never uses; a checkpoint may omit them (they are then zero-filled).
    _unused_prefixes = ("audio_emb.", "text_embedding.")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        subfolder: str | None = None,
        *,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
    ) -> FlashHeadDiT:
        """Load a checkpoint folder (`config.json` + `diffusion_pytorch_model.safetensors`).

        Accepts the released `Model_Lite` / `Model_Pro` folders as they are, a hub id with `subfolder`
        (e.g. `("Soul-AILab/SoulX-FlashHead-1_3B", "Model_Lite")`), and `save_pretrained` output. Names and
        shapes are checked before anything is loaded; `torch_dtype` casts on load (the released files are
        float32, inference runs in bfloat16).
        """
        folder = resolve_model_dir(
            pretrained_model_name_or_path, subfolder, revision=revision, cache_dir=cache_dir,
            local_files_only=local_files_only,
        )  # fmt: skip
        config = read_json(folder / "config.json")
        files = safetensors_files(folder)
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(read_safetensors(file)[0])
        if torch_dtype is not None:
            state = {k: v.to(torch_dtype) for k, v in state.items()}
        source = str(files[0] if len(files) == 1 else folder)
        try:
            model = build_and_load(cls, config, state, source, optional_prefixes=cls._unused_prefixes, frozen=False)
        except (TypeError, ValueError, ConfigError) as e:
            raise CheckpointError(f"{folder / 'config.json'}: unusable model config ({e})") from e
        return model.to(device).eval()

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, f*h*w, pt*ph*pw*C) with patch position major, channel minor -> (B, C, f*pt, h*ph, w*pw)."""
        (f, h, w), (pt, ph, pw) = grid, self.config.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(x.shape[0], x.shape[1], f * pt, h * ph, w * pw).contiguous()
