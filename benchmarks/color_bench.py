"""The compiled colour correction of one 512x512 chunk on one GPU: its time, per variant, and its kernels.

    python3 benchmarks/color_bench.py            # prints JSON

Variants: `match_colors` as the one-GPU pipeline calls it (the reference's statistics computed on each call),
`match_colors_to` with the statistics given (as cached by ReferenceState), and the same on only the frames that
leave the chunk (the new ones; the re-rendered motion frames are neither shown nor re-encoded). Random frames in
[-1, 1], bf16, 33 frames (a Lite or Pro chunk), the new-frame counts of Lite (24) and Pro (28).
"""

from __future__ import annotations

import json

import torch
from block_bench import event_ms  # benchmarks/, the script's folder
from torch.profiler import ProfilerActivity, profile

from flashhead.pipeline.color import match_colors, match_colors_to, reference_statistics


def kernels_us(call) -> list:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            kernels[e.name[:80]] = kernels.get(e.name[:80], 0.0) + e.device_time_total
    return [[name, round(us, 1)] for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])]


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    generator = torch.Generator(dev).manual_seed(0)
    video = torch.rand(1, 3, 33, 512, 512, device=dev, dtype=dt, generator=generator) * 2 - 1
    reference = torch.rand(1, 3, 1, 512, 512, device=dev, dtype=dt, generator=generator) * 2 - 1
    stats = reference_statistics(reference)
    whole = torch.compile(match_colors, dynamic=False)
    given = torch.compile(match_colors_to, dynamic=False)
    variants = {
        "match_colors_33": lambda: whole(video, reference, 1.0),
        "match_colors_to_33": lambda: given(video, stats, 1.0),
        "match_colors_to_24": lambda: given(video[:, :, 9:], stats, 1.0),
        "match_colors_to_28": lambda: given(video[:, :, 5:], stats, 1.0),
    }
    result = {"gpu": torch.cuda.get_device_name()}
    for name, call in variants.items():
        result[name + "_ms"] = round(event_ms(call, 30, warmup=3)[0], 4)
    result["kernels_match_colors_33_us"] = kernels_us(variants["match_colors_33"])
    result["kernels_match_colors_to_24_us"] = kernels_us(variants["match_colors_to_24"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
