"""Wan2.1 temporal upsampling that torch.compile traces in one graph.

diffusers' `WanResample` marks "the previous chunk was the first one" by storing the string "Rep" in the
feature cache, and tests for it with `feat_cache[idx] != "Rep"` / `== "Rep"`. When the entry is a tensor that
is a tensor-vs-string comparison, which returns NotImplemented: on torch 2.11 Dynamo breaks the graph there
("torch.* op returned non-Tensor", measured on the device). The break sits inside the decoder's loop, so
Dynamo skips the whole decoder frame and compiles every nested block forward on its own, one variant per
shape, until the recompile limit sends the rest to eager. Testing the marker by type (`isinstance(.., str)`)
is the same decision without the comparison.

Like `wan_conv`, the switch changes the class of module instances only (`set_traceable_resample`), so other
models in the process keep diffusers' forward and state dicts are unchanged.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import CACHE_T, WanResample
from torch import nn

from flashhead.models.vae.wan_conv import swap_class


class TraceableWanResample(WanResample):
    """`WanResample` whose upsample3d cache logic has no tensor-vs-string comparison; same arithmetic."""

    def forward(self, x: torch.Tensor, feat_cache: list | None = None, feat_idx: list[int] = [0]) -> torch.Tensor:  # noqa: B006 (diffusers' signature)
        if self.mode != "upsample3d" or feat_cache is None:
            return super().forward(x, feat_cache, feat_idx)
        b, c, t, h, w = x.shape
        idx = feat_idx[0]
        cached = feat_cache[idx]
        feat_idx[0] += 1
        if cached is None:  # the first chunk: no time upsampling, remember that it was seen
            feat_cache[idx] = "Rep"
        else:
            after_first = isinstance(cached, str)  # the "Rep" marker
            cache_x = x[:, :, -CACHE_T:].clone()
            if cache_x.shape[2] < 2:  # too short a chunk: the frame before it comes from the cache (or zeros)
                before = torch.zeros_like(cache_x) if after_first else cached[:, :, -1:].to(cache_x.device)
                cache_x = torch.cat([before, cache_x], dim=2)
            x = self.time_conv(x) if after_first else self.time_conv(x, cached)
            feat_cache[idx] = cache_x
            # time_conv doubles the channels: the two halves are the even and odd output frames.
            x = torch.stack((x[:, :c], x[:, c:]), dim=3).reshape(b, c, 2 * t, h, w)
        t = x.shape[2]
        frames = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        return frames.view(b, t, *frames.shape[1:]).transpose(1, 2)


def set_traceable_resample(model: nn.Module, on: bool) -> int:
    """Turn every Wan resample layer of `model` into the traceable one (`on`) or back; returns how many."""
    return swap_class(model, WanResample, TraceableWanResample, on)
