"""Pro variant's VAE: the Wan2.1 video VAE through diffusers' `AutoencoderKLWan`.

Official behaviour reproduced here (flash_head/wan/modules/vae.py, class `WanVAE`):
- weights come from `VAE_Wan/Wan2.1_VAE.pth`, a plain `torch.save` of the original `WanVAE_` state dict,
  built with dim 96, z_dim 16, dim_mult [1, 2, 4, 4], 2 res blocks, temporal downsample [F, T, T];
- encode is causal in time (frame 0 alone, then groups of 4 frames, with feature caches; diffusers'
  `_encode` does the same) and returns the posterior *mean*, normalised as (mu - mean) * (1 / std) with
  fixed per-channel constants;
- decode inverts the normalisation (z / (1 / std) + mean), decodes latent frames one at a time, and
  clamps to [-1, 1].
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from flashhead.errors import ConfigError
from flashhead.models.loading import (
    build_and_load,
    hub_download,
    is_hub_id,
    read_json,
    read_safetensors,
    read_torch_state_dict,
)

from .base import VideoVAE
from .wan_resample import set_traceable_resample

# Constructor arguments of the official WanVAE_ as FlashHead builds it (SPEC section 5.6).
WAN21_VAE_CONFIG: dict[str, Any] = {
    "dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],  # sic: the official spelling, kept by diffusers
    "dropout": 0.0,
}

# Per-channel latent statistics of the Wan2.1 VAE, hard-coded in the official wrapper.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

WAN21_FILENAME = "Wan2.1_VAE.pth"


def wan_config_to_diffusers(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`AutoencoderKLWan` kwargs for an official `WanVAE_` config (missing fields: FlashHead's values).

    Attention inside the down/up levels (`attn_scales`) is refused: diffusers' Wan2.1 decoder has no
    such blocks. z_dim must be 16, the size of the fixed latent statistics.
    """
    cfg = {**WAN21_VAE_CONFIG, **(config or {})}
    unknown = sorted(set(cfg) - set(WAN21_VAE_CONFIG))
    if unknown:
        raise ConfigError(f"Wan VAE config: unknown fields {unknown}")
    if cfg["attn_scales"]:
        raise ConfigError(f"Wan VAE config: attn_scales={cfg['attn_scales']} is not supported (need [])")
    if cfg["z_dim"] != len(WAN21_LATENTS_MEAN):
        raise ConfigError(f"Wan VAE config: z_dim={cfg['z_dim']}; the Wan2.1 latent statistics need 16")
    down = list(cfg["temperal_downsample"])
    return {
        "base_dim": cfg["dim"],
        "z_dim": cfg["z_dim"],
        "dim_mult": list(cfg["dim_mult"]),
        "num_res_blocks": cfg["num_res_blocks"],
        "attn_scales": [],
        "temperal_downsample": down,
        "dropout": cfg["dropout"],
        "latents_mean": list(WAN21_LATENTS_MEAN),
        "latents_std": list(WAN21_LATENTS_STD),
        "scale_factor_temporal": 2 ** sum(down),
        "scale_factor_spatial": 2 ** len(down),
    }


_RESBLOCK_PARTS = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}


def _decoder_upsample_key(key: str, num_res_blocks: int) -> str:
    # Official: one flat list, per level (num_res_blocks + 1) res blocks then one resample (none after
    # the last level). Diffusers: up_blocks[level].resnets[i] and up_blocks[level].upsamplers[0].
    match = re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key)
    if match is None:
        return key  # left as is: the strict load reports it as unexpected
    level, i = divmod(int(match[1]), num_res_blocks + 2)
    part = match[2]
    if i <= num_res_blocks:
        if part not in _RESBLOCK_PARTS:
            return key  # left as is: the strict load reports it as unexpected
        return f"decoder.up_blocks.{level}.resnets.{i}.{_RESBLOCK_PARTS[part]}"
    return f"decoder.up_blocks.{level}.upsamplers.0.{part}"


def convert_wan_vae_state_dict(
    state_dict: Mapping[str, torch.Tensor], num_res_blocks: int = 2
) -> dict[str, torch.Tensor]:
    """Rename an official `WanVAE_` state dict (e.g. Wan2.1_VAE.pth) to `AutoencoderKLWan` names.

    Everything but the decoder's up-sampling stack goes through diffusers'
    `convert_wan_vae_to_diffusers`. That function hard-codes the decoder indices for
    num_res_blocks=2 (the released VAE), so `decoder.upsamples.*` is renamed here for any count;
    for num_res_blocks=2 both give the same names (checked in the tests).
    """
    upsamples = {k: v for k, v in state_dict.items() if k.startswith("decoder.upsamples.")}
    rest = {k: v for k, v in state_dict.items() if k not in upsamples}
    out = convert_wan_vae_to_diffusers(rest)
    for key, value in upsamples.items():
        out[_decoder_upsample_key(key, num_res_blocks)] = value
    return out


class WanVideoVAE(VideoVAE):
    """Wan2.1 VAE (Pro): 16 latent channels, stride (4, 8, 8); deterministic encode, clamped decode.

    Args:
        model: a loaded `AutoencoderKLWan`; its config's `latents_mean` / `latents_std` normalise.
    """

    def __init__(self, model: AutoencoderKLWan) -> None:
        super().__init__(model)
        cfg = model.config
        self.latent_channels = cfg.z_dim
        s = 2 ** len(cfg.temperal_downsample) * (cfg.patch_size or 1)
        self.stride = (2 ** sum(cfg.temperal_downsample), s, s)
        # Not persistent: they belong to the config, not to the weights; `.to(dtype)` casts them, so
        # in bf16 the constants are rounded to bf16 exactly as the official wrapper does.
        self.register_buffer("latents_mean", torch.tensor(cfg.latents_mean), persistent=False)
        self.register_buffer("latents_std", torch.tensor(cfg.latents_std), persistent=False)
        self.whole_chunk = False  # set_whole_chunk
        self.call_frames = 0  # set_whole_chunk: latent frames per decoder call over the batch (0: a stream's decode)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        *,
        config: Mapping[str, Any] | None = None,
        subfolder: str = "VAE_Wan",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
    ) -> WanVideoVAE:
        """Load the Pro VAE.

        `path_or_repo_id` is one of: the FlashHead checkpoint folder (holding
        `VAE_Wan/Wan2.1_VAE.pth`), the `VAE_Wan/` folder, the `.pth` file itself (official `WanVAE_`
        state dict; `.safetensors` with the same names also works), a diffusers `AutoencoderKLWan`
        folder (config.json + diffusion_pytorch_model.safetensors), or a Hub repo id laid out like the
        FlashHead release. `config` holds official `WanVAE_` constructor fields that differ from
        `WAN21_VAE_CONFIG` (tiny test models); it is ignored for a diffusers folder.
        """
        if is_hub_id(path_or_repo_id):
            file = hub_download(
                str(path_or_repo_id),
                f"{subfolder}/{WAN21_FILENAME}",
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        else:
            path = Path(path_or_repo_id)
            if path.is_dir() and (path / "config.json").is_file():
                return cls._from_diffusers_folder(path).to(device=device, dtype=dtype)
            candidates = [path / subfolder / WAN21_FILENAME, path / WAN21_FILENAME]
            file = path if not path.is_dir() else next((c for c in candidates if c.is_file()), candidates[0])
        if file.suffix == ".safetensors":
            state_dict, _ = read_safetensors(file)
        else:
            state_dict = read_torch_state_dict(file)
        vae = cls.from_official_state_dict(state_dict, config, source=str(file))
        return vae.to(device=device, dtype=dtype)

    @classmethod
    def from_official_state_dict(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        config: Mapping[str, Any] | None = None,
        *,
        source: str = "Wan VAE state dict",
    ) -> WanVideoVAE:
        """Build from an official `WanVAE_` state dict (dtype as stored); `config` as in from_pretrained."""
        dcfg = wan_config_to_diffusers(config)
        state = convert_wan_vae_state_dict(state_dict, dcfg["num_res_blocks"])
        return cls(build_and_load(AutoencoderKLWan, dcfg, state, source=source))

    @classmethod
    def _from_diffusers_folder(cls, folder: Path) -> WanVideoVAE:
        config = read_json(folder / "config.json")
        weights = folder / "diffusion_pytorch_model.safetensors"
        state_dict, _ = read_safetensors(weights)
        return cls(build_and_load(AutoencoderKLWan, config, state_dict, source=str(weights)))

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw posterior mean -> the DiT's latent space: (mu - mean) * (1 / std), as upstream."""
        mean = self.latents_mean.to(latent.dtype).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / self.latents_std.to(latent.dtype).view(1, -1, 1, 1, 1)
        return (latent - mean) * inv_std

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`: z / (1 / std) + mean, as upstream."""
        mean = self.latents_mean.to(latent.dtype).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / self.latents_std.to(latent.dtype).view(1, -1, 1, 1, 1)
        return latent / inv_std + mean

    def encode(
        self,
        video: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode (B, 3, T, H, W) in [-1, 1] to a normalised latent (B, 16, 1 + (T-1)/4, H/8, W/8).

        The posterior mean is returned, so the result is deterministic; `generator` and `noise` are
        accepted only so both VAEs can be called alike, and are unused.
        """
        video = self._check_video(video)
        if not self.whole_chunk or not self._causal_by_hand(video, pixels=True):
            return self.normalize(self.model.encode(video).latent_dist.mean)
        # whole_chunk: one encoder call over every frame instead of the first frame, then groups of 4 (the same
        # causal context; see set_whole_chunk)
        model = self.model
        model.clear_cache()
        try:
            model._enc_conv_idx = [0]
            out = model.encoder(video, feat_cache=model._enc_feat_map, feat_idx=model._enc_conv_idx)
            mu = model.quant_conv(out)[:, : self.latent_channels]  # the posterior's mean: the first half
        finally:
            model.clear_cache()
        return self.normalize(mu)

    def set_whole_chunk(self, on: bool, call_frames: int = 0) -> None:
        """The `vae_whole_chunk` switch: each decode (encode) runs its frames through every layer at once.

        diffusers' decode loops over the latent frames, running the whole decoder on one frame at a time with a
        cache of each causal convolution's last input frames. The convolutions are causal in time and the norms,
        attention and spatial upsampling act per frame, so one pass over all frames, with the convolutions' zero
        padding in place of the empty cache, computes the same values in a tenth of the calls: larger kernels, no
        cache copies (H200, Pro chunk: eager 331 -> 309 ms; compiled 153.5 -> 140.3 ms where the CUTLASS convolutions
        pad time themselves, no faster where each layer's zero frames are a padded copy). The encode likewise
        (diffusers: the first frame, then groups of 4). Only the time resampling treats the first frame apart;
        `TraceableWanResample` does that for several frames at once, so the resamples become traceable ones (the same
        arithmetic per frame).

        `call_frames` bounds a decoder call's latent frames, counted over the batch's streams, since activation
        memory grows with them (Pro, one stream: 10.4 GiB for the per-frame loop, 26.3 GiB for a chunk's 9 latent
        frames at once, H200 session 32). 0: as many as one stream's decode, so that B batched streams decode in
        calls of 1/B of their frames each and need about the memory of one stream's whole decode (not B times it).
        """
        if call_frames < 0:
            raise ValueError(f"call_frames must be 0 (a stream's whole decode) or more, got {call_frames}")
        self.whole_chunk = on
        self.call_frames = call_frames
        if on:
            set_traceable_resample(self.model, True)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode a normalised latent to pixels (B, 3, T, H, W), clamped to [-1, 1]."""
        latent = self._check_latent(latent)
        if not self.whole_chunk or not self._causal_by_hand(latent):
            return self.model.decode(self.denormalize(latent)).sample.clamp(-1.0, 1.0)
        (video,) = self._causal_pieces(latent, [latent.shape[2]])  # run to the end: the caches are cleared
        return video

    def decode_in_pieces(self, latent: torch.Tensor, head: int) -> Iterator[torch.Tensor]:
        """Causal in time: the decoder runs one latent frame at a time with feature caches of the frames before,
        as diffusers' `AutoencoderKLWan._decode` does (or all frames of a piece at once, `set_whole_chunk`), so
        the decode can pause after `head` frames and yield them.
        """
        latent = self._check_latent(latent)
        if not 0 < head < latent.shape[2] or not self._causal_by_hand(latent):
            yield self.decode(latent)  # the layouts diffusers decodes otherwise: one piece
            return
        yield from self._causal_pieces(latent, [head, latent.shape[2]])

    def _causal_by_hand(self, x: torch.Tensor, pixels: bool = False) -> bool:
        """Whether this latent (or video, `pixels`) goes through diffusers' plain causal loop, not tiled, sliced or
        patched."""
        model = self.model
        ratio = 1 if pixels else model.spatial_compression_ratio
        tiled = model.use_tiling and (
            x.shape[-1] > model.tile_sample_min_width // ratio or x.shape[-2] > model.tile_sample_min_height // ratio
        )
        sliced = model.use_slicing and x.shape[0] > 1
        return not (tiled or sliced or model.config.patch_size is not None)

    def _causal_pieces(self, latent: torch.Tensor, ends: list[int]) -> Iterator[torch.Tensor]:
        """The pixels of latent frames [0, ends[0]), [ends[0], ends[1]), ..., one piece at a time, clamped."""
        model = self.model
        z = model.post_quant_conv(self.denormalize(latent))  # pointwise in time: once for every frame
        model.clear_cache()
        try:
            start = 0
            for end in ends:
                calls = self.decoder_calls(start, end, batch=latent.shape[0], frames=latent.shape[2])
                piece = []
                for a, b in calls:
                    model._conv_idx = [0]
                    piece.append(model.decoder(z[:, :, a:b], feat_cache=model._feat_map,
                                               feat_idx=model._conv_idx, first_chunk=a == 0))  # fmt: skip
                yield (torch.cat(piece, dim=2) if len(piece) > 1 else piece[0]).clamp(-1.0, 1.0)
                start = end
        finally:
            model.clear_cache()

    def decoder_calls(self, start: int, end: int, batch: int, frames: int) -> list[tuple[int, int]]:
        """The latent frame spans [a, b) of the decoder calls that decode [start, end): diffusers' loop one frame
        per call; whole_chunk as few calls as `call_frames` allows (for B streams, call_frames // B frames per
        call), of near-equal lengths, so a piece compiles to at most two shapes."""
        if not self.whole_chunk:
            return [(i, i + 1) for i in range(start, end)]
        step = max(1, (self.call_frames or frames) // batch)
        calls = -(-(end - start) // step)
        size, longer = divmod(end - start, calls)
        spans, a = [], start
        for i in range(calls):
            b = a + size + (i < longer)
            spans.append((a, b))
            a = b
        return spans
