"""The interface both VAE adapters share.

A `VideoVAE` wraps one diffusers autoencoder (`self.model`) and adds what FlashHead needs around it:
latent normalisation, the posterior choice (sample or mean), the output clamp, and input checks.
Shapes are always batched: video (B, 3, T, H, W) in [-1, 1] <-> latent (B, C, T', H', W') with
T = 1 + st * (T' - 1) (the first frame is encoded alone: both VAEs are causal in time), H = sh * H',
W = sw * W'.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


class VideoVAE(nn.Module, ABC):
    """A video autoencoder whose latents are already normalised for the DiT.

    Subclasses set `latent_channels` and `stride` (t, h, w) and implement `encode`, `decode` and
    `from_pretrained`. Move and cast with the usual `.to(device, dtype)`. Weights are frozen and the
    module is in eval mode; wrap calls in `torch.no_grad()` (or `inference_mode`) when no gradient is
    wanted, as at inference.
    """

    latent_channels: int
    stride: tuple[int, int, int]

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, **kwargs: Any) -> VideoVAE:
        """Load released weights from a local path or a Hugging Face Hub repo id."""

    @abstractmethod
    def encode(
        self,
        video: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> normalised latent (B, C, T', H', W').

        `generator` / `noise` feed a stochastic posterior sample (LTX); a VAE that returns the
        posterior mean (Wan) accepts and ignores them, so callers need not know which VAE they hold.
        """

    @abstractmethod
    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> the DiT's latent space."""

    @abstractmethod
    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`."""

    @abstractmethod
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent (B, C, T', H', W') -> video (B, 3, T, H, W)."""

    def decode_in_pieces(self, latent: torch.Tensor, head: int) -> Iterator[torch.Tensor]:
        """`decode(latent)` in two pieces, the pixels of latent frames [0, head) and then of the rest, each piece
        yielded as soon as its work is queued; concatenated along time they equal `decode(latent)` exactly.

        A VAE whose decode is causal in time can hand out its first frames before the later ones are decoded (a
        new stream's first frame earlier). This default, for decoders whose every frame sees later latent
        frames (LTX), yields the whole decode as one piece; callers must accept one piece or two.
        """
        yield self.decode(latent)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, T', H', W') of the latent of a `num_frames` x `height` x `width` clip."""
        st, sh, sw = self.stride
        return self.latent_channels, 1 + (num_frames - 1) // st, height // sh, width // sw

    def _check_video(self, video: torch.Tensor) -> torch.Tensor:
        st, sh, sw = self.stride
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be (B, 3, T, H, W), got {tuple(video.shape)}")
        _, _, t, h, w = video.shape
        if (t - 1) % st or h % sh or w % sw:
            raise ValueError(
                f"video (T, H, W) = {(t, h, w)} does not fit the VAE stride {self.stride}: "
                f"need T = 1 + {st}k, H % {sh} == 0, W % {sw} == 0"
            )
        return video.to(device=self.device, dtype=self.dtype)

    def _check_latent(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim != 5 or latent.shape[1] != self.latent_channels:
            raise ValueError(f"latent must be (B, {self.latent_channels}, T', H', W'), got {tuple(latent.shape)}")
        return latent.to(device=self.device, dtype=self.dtype)
