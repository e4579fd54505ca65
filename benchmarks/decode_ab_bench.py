"""The Pro chunk's Wan2.1 decode with and without one VAE switch, eager and compiled, with its GPU kernels.

    PYTHONPATH=src python benchmarks/decode_ab_bench.py --switch vae_whole_chunk --profile --json dec.json
    PYTHONPATH=src python benchmarks/decode_ab_bench.py --switch vae_call_frames --base vae_whole_chunk=on \
        --variants compiled-0,compiled-3,compiled-1    # a whole-number switch: its values
    FLASHHEAD_CONV3D_LIB=... PYTHONPATH=src python benchmarks/decode_ab_bench.py --switch vae_cutlass_conv --profile

Each decode runs the preset's VAE switches (layout, kernel padding, sub-pixel upsampling, the output GEMM; compiled:
compile_vae); `on` adds `--switch` (vae_cutlass_conv's first decode times every CUTLASS tile against cuDNN per
shape). The decode is the pipeline's (`WanVideoVAE.decode`: de-normalise, decode, clamp). Per variant: ms (median;
not graph-captured, so the host's launches count where they outlast the GPU's work), PSNR against the first variant,
the GiB one decode allocates at its peak, and
with --profile the GPU ms by kernel kind and the top kernels (vae_cutlass_conv: whether CUTLASS's kernels replaced
cuDNN's, and the layout copies that came with them). Session 28 ran it as benchmarks/cutlass_decode_bench.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conv_out_bench import SHIPPED  # noqa: E402
from wan_decode_bench import random_wan_vae, time_decode_variants, write_report  # noqa: E402

from flashhead.models.vae import cutlass_conv  # noqa: E402
from flashhead.pipeline.fast_path import apply_vae_switches  # noqa: E402
from flashhead.pipeline.speed import SpeedConfig  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", default="16,9,64,64", help="C,T,H,W of the latent (Pro chunk: 16,9,64,64)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--top", type=int, default=12, help="with --profile: how many kernels to list")
    parser.add_argument("--variants", default="eager-off,eager-on,compiled-off,compiled-on")
    parser.add_argument("--switch", default="vae_cutlass_conv", help="the VAE switch that `on` adds")
    parser.add_argument("--base", default="", help="switches of every variant, over the preset's: name=on,...")
    parser.add_argument("--search-limit", type=int, default=SHIPPED.cudnn_search_limit,
                        help="cuDNN algorithms timed per shape (0: all)")  # fmt: skip
    parser.add_argument("--device", default="cuda", help="cuda (bf16), or cpu (float32: a smoke run)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    vae, header = random_wan_vae(args.device, args.search_limit)
    c, t, h, w = map(int, args.latent.split(","))
    z = torch.randn(1, c, t, h, w, generator=torch.Generator().manual_seed(0)).to(vae.model.device, vae.model.dtype)
    report = {**header, "latent": args.latent, "switch": args.switch, "base": args.base}
    base = SpeedConfig.parse(args.base, SHIPPED.replace(vae_conv_out_gemm=True))
    cutlass = args.switch == "vae_cutlass_conv" or base.vae_cutlass_conv
    if cutlass:
        report["library"] = cutlass_conv.available()

    copies: dict[str, int] = {}  # inputs reaching the op in another layout than channels-last, per variant
    last = [None]

    def switch(name: str) -> None:
        if last[0] is not None:
            copies[last[0]] = cutlass_conv.layout_copies
        cutlass_conv.layout_copies, last[0] = 0, name
        mode, value = name.split("-")
        # on / off, or a number for a whole-number switch (vae_call_frames: compiled-0,compiled-3,compiled-1)
        setting = value == "on" if value in ("on", "off") else int(value)
        apply_vae_switches(vae, base.replace(compile_vae=mode == "compiled", **{args.switch: setting}))

    variants = {name: (lambda name=name: switch(name)) for name in args.variants.split(",")}
    report["decodes"] = time_decode_variants(
        vae, z, variants, args.repeat, args.profile, decode=vae.decode, top=args.top
    )
    if cutlass:
        copies[last[0]] = cutlass_conv.layout_copies
        report["layout_copies"] = copies
        report["choices"] = cutlass_conv.choices()
    apply_vae_switches(vae, SHIPPED)
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
