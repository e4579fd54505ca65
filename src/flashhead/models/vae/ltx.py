"""Lite variant's VAE: the LTX-Video 0.9.0 autoencoder through diffusers' `AutoencoderKLLTXVideo`.

Official behaviour reproduced here (flash_head/ltx_video/ltx_vae.py):
- the released `VAE_LTX/` folder is a diffusers checkpoint whose config must be the 0.9.0 one;
- encode returns a *sample* of the posterior, mean + exp(logvar / 2) * eps, where the encoder predicts a
  single log-variance channel shared by all 128 latent channels (`latent_log_var="uniform"`; diffusers'
  encoder repeats that channel, so its `latent_dist` is already the official distribution);
- latents are normalised per channel, z = (latent - latents_mean) / latents_std, with the statistics
  stored in the checkpoint (native names `per_channel_statistics.mean-of-means` / `std-of-means`);
- decode has no timestep (0.9.0 has no timestep-conditioned decoder) and no clamp.

LTX's own `CausalVideoAutoencoder` layout (the "native" one, used by LTX single-file checkpoints and by
our tiny parity fixture) is converted with `ltx_native_config_to_diffusers` and
`convert_ltx_native_state_dict`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLLTXVideo
from diffusers.loaders.single_file_utils import convert_ltx_vae_checkpoint_to_diffusers
from diffusers.utils.torch_utils import randn_tensor

from flashhead.errors import CheckpointError, ConfigError
from flashhead.models.loading import build_and_load, is_hub_id, read_json, read_safetensors, resolve_model_dir

from .base import VideoVAE

# config.json of the released VAE_LTX/ folder (the diffusers LTX-Video 0.9.0 VAE); SPEC section 2.
LTX_VIDEO_090_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKLLTXVideo",
    "_diffusers_version": "0.32.0.dev0",
    "block_out_channels": [128, 256, 512, 512],
    "decoder_causal": False,
    "encoder_causal": True,
    "in_channels": 3,
    "latent_channels": 128,
    "layers_per_block": [4, 3, 3, 3, 4],
    "out_channels": 3,
    "patch_size": 4,
    "patch_size_t": 1,
    "resnet_norm_eps": 1e-6,
    "scaling_factor": 1.0,
    "spatio_temporal_scaling": [True, True, True, False],
}

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# Native block layout of the 0.9.0 family; the numbers of layers per block may differ.
_NATIVE_BLOCKS = (
    "res_x", "compress_all", "res_x_y",
    "res_x", "compress_all", "res_x_y",
    "res_x", "compress_all",
    "res_x",
    "res_x",
)  # fmt: skip
_NATIVE_RES_X = (0, 3, 6, 8, 9)  # positions of the res_x blocks: diffusers' 4 down blocks + mid block


def _effective_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Every constructor argument of AutoencoderKLLTXVideo: `config`'s values over the defaults."""
    params = inspect.signature(AutoencoderKLLTXVideo.__init__).parameters
    out = {name: p.default for name, p in params.items() if name != "self"}
    out.update((k, v) for k, v in config.items() if k in out)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def check_ltx_video_090_config(config: Mapping[str, Any], source: str = "VAE config") -> None:
    """Raise CheckpointError unless `config` builds exactly the LTX-Video 0.9.0 VAE.

    The official loader compares the JSON file to the 0.9.0 one verbatim; we compare the network it
    builds (every constructor argument, defaults filled in), so a config re-saved by a newer diffusers
    still passes while any change of architecture is refused.
    """
    cls_name = config.get("_class_name", "AutoencoderKLLTXVideo")
    if cls_name != "AutoencoderKLLTXVideo":
        raise CheckpointError(f"{source}: _class_name is {cls_name!r}, expected 'AutoencoderKLLTXVideo'")
    got, want = _effective_config(config), _effective_config(LTX_VIDEO_090_VAE_CONFIG)
    for key, value in want.items():
        if got[key] != value:
            raise CheckpointError(
                f"{source}: not the LTX-Video 0.9.0 VAE config ({key}={got[key]!r}, expected {value!r}); "
                "pass strict_config=False to load another size"
            )


def _native_layers(blocks: Any, field: str) -> list[int]:
    """Layers per res_x block of a native 0.9.0-style block list; ConfigError for any other layout."""
    names = tuple(b[0] for b in blocks) if isinstance(blocks, list | tuple) else ()
    if names != _NATIVE_BLOCKS:
        raise ConfigError(f"native LTX VAE config: {field}={names} is not the LTX-Video 0.9.0 layout")
    layers = []
    for i, (name, params) in enumerate(blocks):
        if name == "res_x" and isinstance(params, dict) and set(params) == {"num_layers"}:
            params = params["num_layers"]
        if not isinstance(params, int):  # multipliers, injected noise, ...: later LTX versions
            raise ConfigError(f"native LTX VAE config: block {i} {name} {params!r} is not supported")
        if i in _NATIVE_RES_X:
            layers.append(params)
    return layers


def ltx_native_config_to_diffusers(native: Mapping[str, Any]) -> dict[str, Any]:
    """Map a native `CausalVideoAutoencoder` config (LTX's own repo) to `AutoencoderKLLTXVideo` kwargs.

    Only the 0.9.0 family is supported: 3-D, pixel norm, uniform log-variance, no quant conv, no
    timestep-conditioned decoder, blocks res_x / compress_all / res_x_y in the 0.9.0 order. Base
    channel counts, layers per block, patch size and latent channels are free (for tiny test models).
    Native defaults are those of LTX's `CausalVideoAutoencoder.from_config`.
    """
    required = {  # field: (native default, the only value diffusers' 0.9.0 path implements)
        "dims": (None, 3),
        "norm_layer": ("group_norm", "pixel_norm"),
        "latent_log_var": ("per_channel", "uniform"),
        "use_quant_conv": (True, False),
        "timestep_conditioning": (False, False),
        "normalize_latent_channels": (False, False),
        "spatial_padding_mode": ("zeros", "zeros"),
    }
    for key, (default, value) in required.items():
        got = native.get(key, default)
        if got != value and got != [value]:
            raise ConfigError(f"native LTX VAE config: {key}={got!r} is not supported (need {value!r})")
    blocks = native.get("blocks")
    enc_layers = _native_layers(native.get("encoder_blocks", blocks), "encoder_blocks")
    dec_layers = _native_layers(native.get("decoder_blocks", blocks), "decoder_blocks")
    enc_base = native.get("encoder_base_channels", 128)
    dec_base = native.get("decoder_base_channels", 128)
    scaling = [True, True, True, False]  # three compress_all blocks, then none
    return {
        "_class_name": "AutoencoderKLLTXVideo",
        "in_channels": native.get("in_channels", 3),
        "out_channels": native.get("out_channels", 3),
        "latent_channels": native["latent_channels"],
        # each res_x_y doubles the width; the last compress_all keeps it
        "block_out_channels": [enc_base, 2 * enc_base, 4 * enc_base, 4 * enc_base],
        "decoder_block_out_channels": [dec_base, 2 * dec_base, 4 * dec_base, 4 * dec_base],
        "layers_per_block": enc_layers,
        "decoder_layers_per_block": dec_layers,
        "spatio_temporal_scaling": scaling,
        "decoder_spatio_temporal_scaling": scaling,
        "patch_size": native.get("patch_size", 1),
        "patch_size_t": 1,
        "resnet_norm_eps": 1e-6,
        "scaling_factor": native.get("scaling_factor", 1.0),
        "encoder_causal": True,
        "decoder_causal": native.get("causal_decoder", False),
        "timestep_conditioning": False,
    }


def convert_ltx_native_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a native `CausalVideoAutoencoder` state dict to `AutoencoderKLLTXVideo` names.

    Accepts checkpoint names (`per_channel_statistics.mean-of-means`), the names of a loaded native
    module (`mean_of_means` / `std_of_means` buffers) and LTX single files (keys prefixed `vae.`,
    other models' keys ignored). The block renaming itself is diffusers'
    `convert_ltx_vae_checkpoint_to_diffusers`, which expects the `vae.` prefix.
    """
    module_names = {
        "mean_of_means": "per_channel_statistics.mean-of-means",
        "std_of_means": "per_channel_statistics.std-of-means",
    }
    if any(k.startswith("vae.") for k in state_dict):
        items = [(k.removeprefix("vae."), v) for k, v in state_dict.items() if k.startswith("vae.")]
    else:
        items = list(state_dict.items())
    prefixed = {"vae." + module_names.get(k, k): v for k, v in items}
    return convert_ltx_vae_checkpoint_to_diffusers(prefixed)


class LTXVideoVAE(VideoVAE):
    """LTX-Video 0.9.0 VAE (Lite): 128 latent channels, stride (8, 32, 32).

    Args:
        model: a loaded `AutoencoderKLLTXVideo` without timestep conditioning.
        sample_posterior: encode returns a posterior sample (official) rather than its mean.
    """

    def __init__(self, model: AutoencoderKLLTXVideo, *, sample_posterior: bool = True) -> None:
        super().__init__(model)
        if model.config.timestep_conditioning:
            raise ConfigError("LTXVideoVAE: timestep-conditioned decoders (LTX >= 0.9.1) are not supported")
        self.latent_channels = model.config.latent_channels
        s = model.spatial_compression_ratio
        self.stride = (model.temporal_compression_ratio, s, s)
        self.sample_posterior = sample_posterior

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        *,
        subfolder: str = "VAE_LTX",
        strict_config: bool = True,
        sample_posterior: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
    ) -> LTXVideoVAE:
        """Load the Lite VAE.

        `path_or_repo_id` is one of: the FlashHead checkpoint folder (holding `VAE_LTX/`), the
        `VAE_LTX/` folder itself (config.json + diffusion_pytorch_model.safetensors), a native LTX
        single-file `.safetensors` (config in its metadata), or a Hub repo id laid out like the
        FlashHead release (`subfolder` is fetched). `strict_config=False` accepts other sizes than
        the 0.9.0 VAE (tiny test models).
        """
        if is_hub_id(path_or_repo_id):
            folder = resolve_model_dir(
                str(path_or_repo_id),
                subfolder,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        else:
            path = Path(path_or_repo_id)
            if not path.exists():
                raise CheckpointError(f"{path}: no such file or folder")
            if path.is_file():
                vae = cls._from_native_file(path, strict_config, sample_posterior)
                return vae.to(device=device, dtype=dtype)
            folder = path / subfolder if (path / subfolder).is_dir() else path
        config_path = folder / "config.json"
        config = read_json(config_path)
        if strict_config:
            check_ltx_video_090_config(config, source=str(config_path))
        weights = folder / WEIGHTS_NAME
        state_dict, _ = read_safetensors(weights)
        model = build_and_load(AutoencoderKLLTXVideo, config, state_dict, source=str(weights))
        return cls(model, sample_posterior=sample_posterior).to(device=device, dtype=dtype)

    @classmethod
    def from_native_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        native_config: Mapping[str, Any],
        *,
        strict_config: bool = True,
        sample_posterior: bool = True,
        source: str = "native LTX VAE state dict",
    ) -> LTXVideoVAE:
        """Build from a native `CausalVideoAutoencoder` state dict and config (dtype as stored)."""
        config = ltx_native_config_to_diffusers(native_config)
        if strict_config:
            check_ltx_video_090_config(config, source=source)
        state = convert_ltx_native_state_dict(state_dict)
        model = build_and_load(AutoencoderKLLTXVideo, config, state, source=source)
        return cls(model, sample_posterior=sample_posterior)

    @classmethod
    def _from_native_file(cls, path: Path, strict_config: bool, sample_posterior: bool) -> LTXVideoVAE:
        state_dict, metadata = read_safetensors(path)
        try:
            native_config = json.loads(metadata["config"])["vae"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: no native LTX VAE config in the file's metadata") from exc
        return cls.from_native_state_dict(
            state_dict, native_config, strict_config=strict_config, sample_posterior=sample_posterior, source=str(path)
        )

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> the DiT's latent space, per channel."""
        mean = self.model.latents_mean.to(latent.dtype).view(1, -1, 1, 1, 1)
        std = self.model.latents_std.to(latent.dtype).view(1, -1, 1, 1, 1)
        return (latent - mean) / std

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`."""
        mean = self.model.latents_mean.to(latent.dtype).view(1, -1, 1, 1, 1)
        std = self.model.latents_std.to(latent.dtype).view(1, -1, 1, 1, 1)
        return latent * std + mean

    def encode(
        self,
        video: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        sample_posterior: bool | None = None,
    ) -> torch.Tensor:
        """Encode (B, 3, T, H, W) in [-1, 1] to a normalised latent (B, 128, 1 + (T-1)/8, H/32, W/32).

        Args:
            video: pixels in [-1, 1], T = 1 + 8k.
            generator: source of the posterior noise; None uses the global torch RNG, as upstream.
            noise: the posterior noise eps itself, shaped like the latent (replaces `generator`).
            sample_posterior: override the instance default; False returns the posterior mean.
        """
        video = self._check_video(video)
        posterior = self.model.encode(video).latent_dist
        sample = self.sample_posterior if sample_posterior is None else sample_posterior
        if not sample:
            if noise is not None:
                raise ValueError("noise was given but sample_posterior is False")
            return self.normalize(posterior.mean)
        if noise is None:
            noise = randn_tensor(
                posterior.mean.shape, generator=generator, device=posterior.mean.device, dtype=posterior.mean.dtype
            )
        elif noise.shape != posterior.mean.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(posterior.mean.shape)}")
        # posterior.std is exp(logvar / 2) with logvar clamped to [-30, 20], as in LTX's own sampler
        latent = posterior.mean + posterior.std * noise.to(posterior.mean)
        return self.normalize(latent)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode a normalised latent to pixels (B, 3, T, H, W); not clamped (upstream does not clamp)."""
        latent = self._check_latent(latent)
        return self.model.decode(self.denormalize(latent)).sample
