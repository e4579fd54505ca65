"""Audio tokens for the DiT: per-latent-frame window selection and the audio projection MLP.

The DiT receives, for each of the 33 pixel frames of a chunk, a 5-frame window of wav2vec features
(`context`, shape (B, 33, window, layers, channels)). A causal video VAE packs pixel frame 0 alone into
latent frame 0 and every following group of `vae_scale` pixel frames into one latent frame, so the audio
is regrouped the same way before projection:

- latent frame 0 keeps the full window of pixel frame 0;
- latent frame j >= 1 takes, from its group of `vae_scale` pixel frames, the left half of the first
  frame's window (offsets -2..0), the centre of each middle frame (offset 0) and the right half of the
  last frame's window (offsets 0..+2): window + vae_scale - 1 rows, contiguous in time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_audio_windows(context: torch.Tensor, vae_scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a chunk's windowed audio into the first latent frame's rows and the later frames' rows.

    Args:
        context: (B, 1 + vae_scale * (F - 1), window, layers, channels) windowed wav2vec features.
        vae_scale: pixel frames per later latent frame (the VAE's temporal stride).

    Returns:
        first: (B, 1, window, layers, channels)
        later: (B, F - 1, window + vae_scale - 1, layers, channels)
    """
    if vae_scale < 2:
        raise ValueError(f"vae_scale must be >= 2, got {vae_scale}")
    n_frames, window = context.shape[1], context.shape[2]
    if (n_frames - 1) % vae_scale:
        raise ValueError(f"context has {n_frames} frames; expected 1 + {vae_scale} * k")
    mid = window // 2
    first = context[:, :1]
    groups = context[:, 1:].unflatten(1, (-1, vae_scale))  # (B, F-1, vae_scale, window, layers, C)
    later = torch.cat(
        [
            groups[:, :, 0, : mid + 1],  # first frame of the group: offsets -2..0
            groups[:, :, 1:-1, mid],  # middle frames: offset 0 each
            groups[:, :, -1, mid:],  # last frame of the group: offsets 0..+2
        ],
        dim=2,
    )
    return first, later


class AudioProjModel(nn.Module):
    """Projects grouped wav2vec windows to `tokens` audio tokens of width `output_dim` per latent frame.

    State-dict names (`proj1`, `proj1_vf`, `proj2`, `proj3`, `norm`) follow the official checkpoint.
    """

    def __init__(
        self,
        window: int = 5,
        window_vf: int = 12,
        layers: int = 12,
        channels: int = 768,
        intermediate_dim: int = 512,
        output_dim: int = 1536,
        tokens: int = 32,
        norm_output: bool = True,
    ):
        super().__init__()
        self.tokens, self.output_dim = tokens, output_dim
        self.proj1 = nn.Linear(window * layers * channels, intermediate_dim)
        self.proj1_vf = nn.Linear(window_vf * layers * channels, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim) if norm_output else nn.Identity()

    def forward(self, first: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
        """first: (B, 1, window, layers, C); later: (B, F-1, window_vf, layers, C) -> (B, F, tokens, dim)."""
        h = torch.cat(
            [F.relu(self.proj1(first.flatten(2))), F.relu(self.proj1_vf(later.flatten(2)))], dim=1
        )  # (B, F, intermediate)
        h = F.relu(self.proj2(h))
        tokens = self.proj3(h).unflatten(-1, (self.tokens, self.output_dim))  # (B, F, tokens, dim)
        if isinstance(self.norm, nn.LayerNorm):
            # The official model normalises these tokens in float32 even when the rest runs in bf16.
            n = self.norm
            w = None if n.weight is None else n.weight.float()
            b = None if n.bias is None else n.bias.float()
            tokens = F.layer_norm(tokens.float(), n.normalized_shape, w, b, n.eps).to(tokens.dtype)
        return tokens
