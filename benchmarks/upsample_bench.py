"""The Wan2.1 decoder's upsampling layers, stock against sub-pixel (`vae_subpixel_upsample`), alone and in decodes.

    PYTHONPATH=src python benchmarks/upsample_bench.py --json upsample.json     # one GPU, full size, bf16

1. Every upsampling convolution of a Pro chunk's decode (shapes recorded from one eager decode in the shipped
   layout), timed alone (median of `--repeat`, cuDNN's whole algorithm search): nearest 2x upsampling + 3x3
   convolution (stock), the folded stride-2 transposed convolution ("transpose"), and one 2x2 convolution of the
   four output phases followed by their interleaving ("phases"); eager and compiled.
2. The compiled Pro chunk decode (compile_vae with the shipped layout switches) without sub-pixel upsampling and
   with each method: ms, GPU ms by kernel kind, PSNR against the decode without it.

Prediction (session 22): the upsampling convolutions are ~6 of the decode's 74 TFLOP and ~18 ms per chunk on an
H100; folded they do 4/9 of the multiply-adds, so ~8-10 ms less per chunk, plus the 4x upsampled copies.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

sys.path.insert(0, str(Path(__file__).parent))
from conv_algos import median_ms  # noqa: E402
from wan_decode_bench import (  # noqa: E402
    layer_bench_parser,
    psnr_db,
    random_wan_vae,
    time_decode_variants,
    write_report,
)

from flashhead.models.vae import WanVideoVAE  # noqa: E402
from flashhead.models.vae.wan_resample import (  # noqa: E402
    SUBPIXEL_METHODS,
    phase_weight,
    set_subpixel_upsample,
    subpixel_weight,
    upsample_conv_phases,
    upsample_conv_transposed,
)
from flashhead.pipeline.fast_path import apply_vae_switches  # noqa: E402
from flashhead.pipeline.speed import WIDE_CUDNN_SEARCH_LIMIT, SpeedConfig  # noqa: E402

WAYS = ("stock", "transpose", "phases")
SHIPPED = SpeedConfig(
    cudnn_benchmark=True, cudnn_search_limit=WIDE_CUDNN_SEARCH_LIMIT, vae_conv_pad=True, vae_channels_last=True
)


def upsampling_calls(model: AutoencoderKLWan, z: torch.Tensor) -> list[dict]:
    """The (low-resolution input shape, conv) of every upsampling convolution call in one eager decode."""
    calls: dict[tuple, dict] = {}
    hooks = []
    for module in model.decoder.modules():
        if isinstance(module, WanResample) and module.mode.startswith("upsample"):
            conv = module.resample[1]

            def record(_mod, args, conv=conv):
                n, c, h, w = args[0].shape  # the upsampled frames
                key = (n, c, h // 2, w // 2, conv.out_channels)
                calls.setdefault(key, {"conv": conv, "calls": 0})["calls"] += 1

            hooks.append(conv.register_forward_pre_hook(record))
    with torch.no_grad():
        model.decode(z)
    for hook in hooks:
        hook.remove()
    return [{"input": list(key[:4]), "out_channels": key[4], **value} for key, value in calls.items()]


def stock(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    up = F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)  # as WanUpsample
    return conv(up)


def time_layers(calls: list[dict], repeat: int, compile: bool = True) -> list[dict]:
    rows = []
    for call in calls:
        conv, (n, c, h, w) = call["conv"], call["input"]
        x = torch.randn(n, c, h, w, device=conv.weight.device, dtype=conv.weight.dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        folded = subpixel_weight(conv).contiguous(memory_format=torch.channels_last)
        phases = phase_weight(conv).contiguous(memory_format=torch.channels_last)
        ways = {
            "stock": lambda x=x, conv=conv: stock(x, conv),
            "transpose": lambda x=x, conv=conv, wt=folded: upsample_conv_transposed(x, wt, conv.bias),
            "phases": lambda x=x, conv=conv, wt=phases: upsample_conv_phases(x, wt, conv.bias),
        }
        row = {"input": call["input"], "out_channels": call["out_channels"], "calls": call["calls"]}
        with torch.no_grad():
            ref = ways["stock"]().float()
            for name, fn in ways.items():
                row[f"{name}_ms"] = round(median_ms(fn, repeat), 4)
                if compile:
                    row[f"{name}_compiled_ms"] = round(median_ms(torch.compile(fn), repeat), 4)
                if name != "stock":
                    row[f"{name}_psnr_db"] = psnr_db(fn(), ref)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def time_decodes(vae: WanVideoVAE, z: torch.Tensor, repeat: int, profile: bool, compile: bool = True) -> dict:
    def switch(method: str) -> None:
        apply_vae_switches(vae, SHIPPED.replace(compile_vae=compile))
        if method != "off":
            set_subpixel_upsample(vae.model, True, channels_last=True, method=method)

    methods = ("off", *SUBPIXEL_METHODS)
    return time_decode_variants(vae, z, {m: lambda m=m: switch(m) for m in methods}, repeat, profile)


def main() -> None:
    parser = layer_bench_parser(__doc__.split("\n\n")[0], "the layers")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    args = parser.parse_args()
    vae, header = random_wan_vae(args.device, SHIPPED.cudnn_search_limit)
    model = vae.model
    dev, dtype = model.device, model.dtype
    z = torch.randn(1, *map(int, args.latent.split(",")), generator=torch.Generator().manual_seed(0))
    z = z.to(dev, dtype)
    apply_vae_switches(vae, SHIPPED)
    report = {**header, "latent": args.latent}
    layers = time_layers(upsampling_calls(model, z), args.repeat, not args.no_compile)
    report["layers"] = layers
    ways = [f"{way}{suffix}" for suffix in ("", "" if args.no_compile else "_compiled") for way in WAYS]
    report["per_chunk_ms"] = {
        way: round(sum(r["calls"] * r[f"{way}_ms"] for r in layers), 2) for way in dict.fromkeys(ways)
    }
    print("per chunk", json.dumps(report["per_chunk_ms"]), flush=True)
    if not args.no_decode:
        report["decodes"] = time_decodes(vae, z, max(3, args.repeat // 5), args.profile, not args.no_compile)
    write_report(report, args.json)


if __name__ == "__main__":
    main()
