"""Floating-point operations of one DiT forward, counted from the architecture (for MFU).

Every matrix product counts 2 * M * N * K (one multiply and one add per term); normalisations,
activations, RoPE and the adaLN arithmetic are elementwise and left out, as MFU conventions do. With L
tokens (F latent frames of H' x W' after patching), width D, FFN width D_ff, A audio tokens per latent
frame, N blocks:

    per block   self-attention projections  8 L D^2      attention (QK^T, AV)   4 L^2 D
                cross-attention q, o        4 L D^2      cross k, v             4 F A D^2
                cross attention (per frame) 4 L A D      FFN                    4 L D D_ff
    once        patch embedding, head, timestep MLPs, audio projection (small; counted too)

docs/performance.md gives the numbers for Lite and Pro at 512 x 512.

The VAEs' FLOPs (`vae_flops`) are counted by torch's FlopCounterMode on a meta-device copy of the VAE (its stock
layers: no memory, no arithmetic): per chunk, the decode of the whole latent and the motion frames' re-encode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# Dense bf16 tensor-core peaks (no sparsity) from the vendors' datasheets, FLOP/s.
BF16_PEAK_FLOPS = {
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,  # the SXM part's device name
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989e12,
    "A100": 312e12,
    "RTX 4090": 165e12,
    "L40S": 362e12,
}


def dit_forward_flops(
    config: Mapping, latent_shape: tuple[int, int, int], batch: int = 1, by_term: bool = False
) -> float | dict[str, float]:
    """FLOPs of one `FlashHeadDiT.forward` on `batch` chunks whose latents are (F, H, W) before patching.

    Args:
        config: the DiT config (dim, ffn_dim, num_heads, num_layers, in_dim, out_dim, patch_size, vae_stride,
            freq_dim, audio_* fields).
        latent_shape: latent frames, height, width of one chunk (Lite (5, 16, 16), Pro (9, 64, 64) at 512 px).
        by_term: return {term: FLOPs} instead of the total.
    """
    c = dict(config)
    D, Dff, N = c["dim"], c["ffn_dim"], c["num_layers"]
    pt, ph, pw = c["patch_size"]
    f, h, w = latent_shape[0] // pt, latent_shape[1] // ph, latent_shape[2] // pw
    L, P = f * h * w, pt * ph * pw
    A = c.get("audio_tokens", 32)
    window, layers, channels = c.get("audio_window", 5), c.get("audio_layers", 12), c.get("audio_channels", 768)
    inter, stride_t = c.get("audio_intermediate_dim", 512), c["vae_stride"][0]
    window_vf = window + stride_t - 1
    terms = {
        "self_attention_projections": N * 8 * L * D * D,
        "self_attention_scores": N * 4 * L * L * D,
        "cross_attention_q_o": N * 4 * L * D * D,
        "cross_attention_k_v": N * 4 * f * A * D * D,
        "cross_attention_scores": N * 4 * L * A * D,
        "ffn": N * 4 * L * D * Dff,
        "patch_embedding": 2 * L * c["in_dim"] * P * D,
        "head": 2 * L * D * c["out_dim"] * P,
        "timestep_mlps": 2 * (c.get("freq_dim", 256) * D + D * D + D * 6 * D),
        "audio_projection": 2 * (
            window * layers * channels * inter + (f - 1) * window_vf * layers * channels * inter
            + f * inter * inter + f * inter * A * D
        ),
    }  # fmt: skip
    terms = {k: float(v * batch) for k, v in terms.items()}
    return terms if by_term else math.fsum(terms.values())


def vae_flops(vae, latent_shape: tuple[int, int, int, int], motion_frames: int, height: int, width: int) -> dict:
    """FLOPs of one chunk's VAE work: {"vae_decode": the (C, F, h, w) latent's decode, "vae_encode_motion": the
    re-encode of `motion_frames` frames of height x width}, counted on a meta-device copy of `vae` (a VideoVAE
    adapter around a diffusers model), so nothing is allocated or computed. The stock layers' count: switches that
    compute a layer with fewer operations (vae_subpixel_upsample) leave it as it is, as MFU conventions do."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = vae.model
    with torch.device("meta"):
        copy = type(vae)(type(model).from_config(model.config)).to(vae.dtype)
    latent = torch.zeros((1, *latent_shape), device="meta", dtype=vae.dtype)
    video = torch.zeros((1, 3, motion_frames, height, width), device="meta", dtype=vae.dtype)
    counts = {}
    for name, work in (("vae_decode", lambda: copy.decode(latent)), ("vae_encode_motion", lambda: copy.encode(video))):
        with FlopCounterMode(display=False) as counter:
            work()
        counts[name] = float(counter.get_total_flops())
    return counts


def peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak of a GPU by its torch device name (longest matching key), None when unknown."""
    if not device_name:
        return None
    matches = [key for key in BF16_PEAK_FLOPS if key.lower() in device_name.lower()]
    return BF16_PEAK_FLOPS[max(matches, key=len)] if matches else None
