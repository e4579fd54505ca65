"""Networks: the FlashHead DiT, the audio path and the VAE adapters."""

from flashhead.models.dit import FlashHeadDiT

__all__ = ["FlashHeadDiT"]
