"""Where the Pro VAE decode time goes: the Wan2.1 decode of one Pro chunk under different convolution layouts.

    PYTHONPATH=src python benchmarks/wan_decode_bench.py --json wan_decode.json   # one GPU, full size, bf16

diffusers' `WanCausalConv3d` pads the whole input (time and space) with `F.pad` before every 3-D convolution:
one extra copy of every activation, twice per residual block. The variants below compute the same
convolution with less memory traffic; each is timed on the same latent and compared with the stock decode
(PSNR over [-1, 1]). A variant worth keeping becomes a speed switch (docs/performance.md): "native_pad" is now
the `vae_conv_pad` switch itself (flashhead.models.vae.wan_conv), so this measures the shipped code.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from flashhead.benchmark import timed_ms
from flashhead.models.vae import WanVideoVAE
from flashhead.models.vae.wan_conv import KernelPaddedCausalConv3d, causal_time_context
from flashhead.pipeline.fast_path import VAE_RECOMPILE_LIMIT, apply_vae_switches
from flashhead.pipeline.speed import SpeedConfig

STOCK_FORWARD = WanCausalConv3d.forward


def conv2d_sum_forward(self: WanCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    # A (kt, 3, 3) convolution as kt 2-D convolutions over shifted frames, summed: cuDNN's 2-D NHWC kernels.
    kt = self.kernel_size[0]
    if kt == 1 or self.stride != (1, 1, 1):
        return KernelPaddedCausalConv3d.forward(self, x, cache_x)
    x = causal_time_context(self, x, cache_x)
    b, c, t_in, h, w = x.shape
    t = t_in - kt + 1
    frames = x.transpose(1, 2)  # (B, T, C, H, W)
    pad = (self._padding[2], self._padding[0])
    out = None
    for k in range(kt):
        inp = frames[:, k : k + t].reshape(b * t, c, h, w).contiguous(memory_format=torch.channels_last)
        y = F.conv2d(inp, self.weight[:, :, k], self.bias if k == 0 else None, 1, pad)
        out = y if out is None else out.add_(y)
    return out.reshape(b, t, -1, h, w).transpose(1, 2)


# name: (forward patched into the class for this variant, vae_conv_pad switch, channels-last weights)
VARIANTS = {
    "stock": (STOCK_FORWARD, False, False),
    "channels_last": (STOCK_FORWARD, False, True),
    "native_pad": (STOCK_FORWARD, True, False),
    "native_pad+channels_last": (STOCK_FORWARD, True, True),
    "conv2d_sum": (conv2d_sum_forward, False, False),
}


@contextmanager
def patched(forward):
    WanCausalConv3d.forward = forward
    try:
        yield
    finally:
        WanCausalConv3d.forward = STOCK_FORWARD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", default="16,9,64,64", help="C,T,H,W of the latent (Pro chunk: 16,9,64,64)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also the compiled decode (compile_vae with both layout switches), whole and as one "
        "half-height strip, under Dynamo's default recompile limit and a raised one",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="with --compiled: the GPU kernels of one compiled decode, whole and strip, by kernel and by kind",
    )
    parser.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode of the compiled decodes (max-autotune-no-cudagraphs: Inductor times its Triton "
        "convolution templates against cuDNN for each convolution)",
    )
    parser.add_argument("--cudnn-limit", type=int, default=10, help="torch.backends.cudnn.benchmark_limit (0: all)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    vae, _ = random_wan_vae("cuda", args.cudnn_limit)
    model = vae.model
    z = torch.randn(1, *map(int, args.latent.split(",")), generator=torch.Generator().manual_seed(0))
    z = z.to(model.device, model.dtype)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "latent": args.latent,
              "compile_mode": args.compile_mode, "cudnn_benchmark_limit": args.cudnn_limit, "variants": {}}  # fmt: skip
    ref = None
    for name in args.variants.split(","):
        forward, conv_pad, channels_last = VARIANTS[name]
        apply_vae_switches(vae, SpeedConfig(vae_conv_pad=conv_pad, vae_channels_last=channels_last))
        torch.cuda.reset_peak_memory_stats()
        with patched(forward), torch.no_grad():
            ms, out = timed_ms(lambda: model.decode(z).sample, args.repeat)
        out = out.float()
        entry = {"ms": ms, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        if ref is None:
            ref = out
        else:
            entry["psnr_vs_stock_db"] = psnr_db(out, ref)
        report["variants"][name] = entry
        print(name, entry, flush=True)
    if args.compiled:
        report["compiled"] = compiled_variants(vae, z, args.repeat, ref, args.profile, args.compile_mode)
    write_report(report, args.json)


def random_wan_vae(device: str, cudnn_search_limit: int) -> tuple[WanVideoVAE, dict]:
    """The Wan2.1 VAE (its configuration, random weights) on `device`, bf16 on a GPU and float32 on the CPU, with
    cuDNN's autotuning searching `cudnn_search_limit` algorithms per shape; and a report header (GPU, versions)."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.benchmark_limit = cudnn_search_limit
    dev = torch.device(device)
    model = AutoencoderKLWan().to(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    vae = WanVideoVAE(model).to(dev)  # what the speed switches act on (its latent statistics on the device too)
    header = {"gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None, "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version()}  # fmt: skip
    return vae, header


def layer_bench_parser(description: str, layers: str) -> argparse.ArgumentParser:
    """The options of the one-layer-kind benches (conv_out_bench, upsample_bench): `layers` alone, then in decodes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--latent", default="16,9,64,64", help="C,T,H,W of the latent (Pro chunk: 16,9,64,64)")
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per layer (decodes: a fifth of it)")
    parser.add_argument("--no-decode", action="store_true", help=f"{layers} alone only")
    parser.add_argument("--profile", action="store_true", help="the GPU kernels of each compiled decode")
    parser.add_argument("--device", default="cuda", help="cuda (bf16; what it is for) or cpu (float32, a smoke run)")
    parser.add_argument("--json", type=Path, default=None)
    return parser


def write_report(report: dict, path: Path | None) -> None:
    text = json.dumps(report, indent=1)
    if path:
        path.write_text(text)
    print(text)


def psnr_db(out: torch.Tensor, ref: torch.Tensor) -> float | str:
    """PSNR of a decode against the stock one, over the [-1, 1] range."""
    mse = float((out.float() - ref).pow(2).mean())
    return "inf" if mse == 0 else round(10 * torch.log10(torch.tensor(4 / mse)).item(), 2)


def kernel_kind(name: str) -> str:
    """A GPU kernel's kind by its name: fused Triton, convolution (cuDNN / CUTLASS implicit GEMM), attention, GEMM,
    copy or other. Triton first: Inductor names its kernels after the ops fused in, "convolution" among them."""
    lowered = name.lower()
    if lowered.startswith("triton"):
        return "triton"
    if any(key in lowered for key in ("fmha", "flash", "attention")):
        return "attention"
    if any(key in lowered for key in ("conv", "cudnn", "implicit")):
        return "convolution"
    if any(key in lowered for key in ("gemm", "nvjet", "cublas")):
        return "gemm"
    if "memcpy" in lowered or "memset" in lowered:
        return "copy"
    return "other"


def kernel_profile(fn, top: int = 25) -> dict:
    """One call of `fn` under torch.profiler: GPU ms by kernel kind and the `top` kernels by total time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    kinds: dict[str, float] = {}
    for e in kernels:
        kinds[kernel_kind(e.key)] = kinds.get(kernel_kind(e.key), 0.0) + e.device_time_total / 1000
    kernels.sort(key=lambda e: -e.device_time_total)
    return {
        "gpu_ms": round(sum(kinds.values()), 1),
        "by_kind_ms": {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top": [{"kernel": e.key[:120], "calls": e.count, "ms": round(e.device_time_total / 1000, 2)}
                for e in kernels[:top]],
    }  # fmt: skip


def time_decode_variants(
    vae: WanVideoVAE, z: torch.Tensor, variants: dict[str, Callable[[], object]], repeat: int, profile: bool = False,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None, top: int = 12,
) -> dict:  # fmt: skip
    """The decode of `z` under each variant (a function that switches `vae`), each after a Dynamo reset: ms, PSNR
    against the first variant's frames, and with `profile` its GPU kernels. The VAE is switched back to plain after.
    `decode`: the call timed (default diffusers' decode of the raw latent, `vae.model.decode(z).sample`); `top`: how
    many kernels the profile lists."""
    out, ref = {}, None
    run = (lambda: vae.model.decode(z).sample) if decode is None else (lambda: decode(z))
    for name, switch in variants.items():
        torch._dynamo.reset()
        switch()
        with torch.no_grad():
            ms, image = timed_ms(run, repeat)
            entry = {"ms": ms}
            if ref is None:
                ref = image.float()
            else:
                entry["psnr_vs_off_db"] = psnr_db(image, ref)
            if torch.cuda.is_available():
                entry["peak_gib_above_resident"] = decode_memory_gib(run)
            if profile:
                entry["profile"] = kernel_profile(run, top=top)
        out[name] = entry
        print(name, json.dumps(entry), flush=True)
    apply_vae_switches(vae, SpeedConfig())
    return out


def decode_memory_gib(run: Callable[[], object]) -> float:
    """GiB one decode allocates at its peak beyond what was allocated before it (weights, caches kept): the
    activations, workspaces and output a decode needs (not the CUDA graphs' pools: these decodes are not captured)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - before) / 2**30, 2)


def compiled_variants(
    vae: WanVideoVAE, z: torch.Tensor, repeat: int, ref: torch.Tensor | None, profile: bool = False,
    mode: str = "default",
) -> dict:  # fmt: skip
    """compile_vae decodes: whole and one strip (rows of the first half), under Dynamo's default recompile
    limit (8) and the one compile_vae sets (VAE_RECOMPILE_LIMIT); `profile`: the kernels of the latter."""
    from flashhead.parallel.vae import decode_strip

    out: dict = {}
    rows = z.shape[-2]
    for limit in (8, VAE_RECOMPILE_LIMIT):
        torch._dynamo.reset()
        apply_vae_switches(
            vae, SpeedConfig(vae_conv_pad=True, vae_channels_last=True, compile_vae=True, compile_mode=mode)
        )
        torch._dynamo.config.recompile_limit = limit  # after the switches, which raise it
        with torch.no_grad():
            ms, whole = timed_ms(lambda: vae.model.decode(z).sample, repeat)
            strip_ms, _ = timed_ms(lambda: decode_strip(vae, z, 0, rows // 2, 0), repeat)
        entry = {"ms": ms, "strip_half_ms": strip_ms}
        if ref is not None:
            entry["psnr_vs_stock_db"] = psnr_db(whole, ref)
        out[f"recompile_limit_{limit}"] = entry
        print("compiled", limit, entry, flush=True)
    if profile:
        with torch.no_grad():
            out["profile_whole"] = kernel_profile(lambda: vae.model.decode(z).sample)
            out["profile_strip_half"] = kernel_profile(lambda: decode_strip(vae, z, 0, rows // 2, 0))
        for name in ("profile_whole", "profile_strip_half"):
            print(name, json.dumps(out[name], indent=1), flush=True)
    apply_vae_switches(vae, SpeedConfig())
    return out


if __name__ == "__main__":
    main()
