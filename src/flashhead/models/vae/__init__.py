"""VAE adapters: the Lite (LTX-Video 0.9.0) and Pro (Wan2.1) autoencoders behind one interface.

Both wrap a diffusers model and hand the DiT normalised latents:

    vae = LTXVideoVAE.from_pretrained("models/SoulX-FlashHead-1_3B")   # or WanVideoVAE
    z = vae.encode(video)    # (B, 3, T, H, W) in [-1, 1] -> (B, C, T', H', W')
    video = vae.decode(z)

See docs/vae.md for the conversions, the normalisation and the posterior choice.
"""

from .base import VideoVAE
from .ltx import (
    LTX_VIDEO_090_VAE_CONFIG,
    LTXVideoVAE,
    check_ltx_video_090_config,
    convert_ltx_native_state_dict,
    ltx_native_config_to_diffusers,
)
from .wan import (
    WAN21_LATENTS_MEAN,
    WAN21_LATENTS_STD,
    WAN21_VAE_CONFIG,
    WanVideoVAE,
    convert_wan_vae_state_dict,
    wan_config_to_diffusers,
)

__all__ = [
    "LTX_VIDEO_090_VAE_CONFIG",
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "WAN21_VAE_CONFIG",
    "LTXVideoVAE",
    "VideoVAE",
    "WanVideoVAE",
    "check_ltx_video_090_config",
    "convert_ltx_native_state_dict",
    "convert_wan_vae_state_dict",
    "ltx_native_config_to_diffusers",
    "wan_config_to_diffusers",
]
