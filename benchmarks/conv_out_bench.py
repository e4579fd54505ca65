"""The Wan2.1 decoder's output convolution (96 -> 3 channels), cuDNN against the GEMM + tap sum (`vae_conv_out_gemm`).

    PYTHONPATH=src python benchmarks/conv_out_bench.py --json conv_out.json     # one GPU, full size, bf16

1. The layer alone at a Pro chunk's shapes (a later latent frame: 4 frames + 2 cached; the first: 1 frame + 2 zero
   frames), median of `--repeat`: cuDNN's kernel (`cudnn_search_limit` 32, as shipped), the tap sum eager and
   compiled; max abs difference from cuDNN's output.
2. The compiled Pro chunk decode (compile_vae with the shipped layout switches) without and with the switch: ms,
   GPU ms by kernel kind, PSNR against the decode without it.

Why (session 21, H100): cuDNN ran this layer at 0.96 ms a call (~17 TFLOP/s), 8-9 calls per chunk; reading its
input once takes ~0.1 ms. The GEMM writes 81 tap planes (27 taps x 3 outputs) that one fused kernel sums.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

sys.path.insert(0, str(Path(__file__).parent))
from conv_algos import median_ms  # noqa: E402
from wan_decode_bench import (  # noqa: E402
    kernel_profile,
    layer_bench_parser,
    random_wan_vae,
    time_decode_variants,
    write_report,
)

from flashhead.models.vae import WanVideoVAE  # noqa: E402
from flashhead.models.vae.wan_conv import KernelPaddedCausalConv3d, TapSumCausalConv3d  # noqa: E402
from flashhead.pipeline.fast_path import apply_vae_switches  # noqa: E402
from flashhead.pipeline.speed import WIDE_CUDNN_SEARCH_LIMIT, SpeedConfig  # noqa: E402

SHIPPED = SpeedConfig(
    cudnn_benchmark=True, cudnn_search_limit=WIDE_CUDNN_SEARCH_LIMIT, vae_conv_pad=True, vae_channels_last=True,
    vae_subpixel_upsample=True,
)  # fmt: skip


def time_layer(conv: WanCausalConv3d, frames: int, cached: int, size: int, repeat: int) -> dict:
    """One output convolution call: `frames` new frames after `cached` cached ones, size x size."""
    dev, dtype = conv.weight.device, conv.weight.dtype
    layout = torch.channels_last_3d

    def randn(t: int) -> torch.Tensor:
        return torch.randn(1, conv.in_channels, t, size, size, device=dev, dtype=dtype).contiguous(memory_format=layout)

    x, cache = randn(frames), (randn(cached) if cached else None)
    row = {"frames": frames, "cached": cached, "size": size}
    with torch.no_grad():
        conv.__class__ = KernelPaddedCausalConv3d
        ref = conv(x, cache).float()
        row["cudnn_ms"] = round(median_ms(lambda: conv(x, cache), repeat), 4)
        conv.__class__ = TapSumCausalConv3d
        row["tap_sum_eager_ms"] = round(median_ms(lambda: conv(x, cache), repeat), 4)
        row["tap_sum_eager_max_abs"] = float((conv(x, cache).float() - ref).abs().max())
        torch._dynamo.reset()
        compiled = torch.compile(conv)
        row["tap_sum_compiled_ms"] = round(median_ms(lambda: compiled(x, cache), repeat), 4)
        row["tap_sum_compiled_max_abs"] = float((compiled(x, cache).float() - ref).abs().max())
        row["ref_abs_max"] = float(ref.abs().max())
        if dev.type == "cuda":
            row["compiled_kernels"] = kernel_profile(lambda: compiled(x, cache), top=6)
    conv.__class__ = WanCausalConv3d
    print(json.dumps(row), flush=True)
    return row


def time_decodes(vae: WanVideoVAE, z: torch.Tensor, repeat: int, profile: bool) -> dict:
    def switch(on: bool) -> None:
        apply_vae_switches(vae, SHIPPED.replace(compile_vae=True, vae_conv_out_gemm=on))

    variants = {"off": lambda: switch(False), "on": lambda: switch(True)}
    return time_decode_variants(vae, z, variants, repeat, profile)


def main() -> None:
    parser = layer_bench_parser(__doc__.split("\n\n")[0], "the layer")
    args = parser.parse_args()
    vae, header = random_wan_vae(args.device, SHIPPED.cudnn_search_limit)
    model = vae.model
    dev, dtype = model.device, model.dtype
    c, t, h, w = map(int, args.latent.split(","))
    size = 8 * h  # the decoder's output size
    conv = model.decoder.conv_out
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    report = {**header, "latent": args.latent}
    layers = [time_layer(conv, 4, 2, size, args.repeat), time_layer(conv, 1, 0, size, args.repeat)]
    report["layers"] = layers
    calls = {(4, 2): t - 1, (1, 0): 1}  # per chunk decode: one first latent frame, then 4 frames each
    report["per_chunk_ms"] = {
        way: round(sum(calls[(r["frames"], r["cached"])] * r[f"{way}_ms"] for r in layers), 2)
        for way in ("cudnn", "tap_sum_eager", "tap_sum_compiled")
    }
    print("per chunk", json.dumps(report["per_chunk_ms"]), flush=True)
    if not args.no_decode:
        z = torch.randn(1, c, t, h, w, generator=torch.Generator().manual_seed(0)).to(dev, dtype)
        report["decodes"] = time_decodes(vae, z, max(3, args.repeat // 5), args.profile)
    write_report(report, args.json)


if __name__ == "__main__":
    main()
