"""The Wan2.1 decode's convolutions one by one: every distinct convolution of a Pro chunk's decode, timed alone
under cuDNN's algorithm search with the kernel cuDNN chose, and reformulations of the same convolution whose
output channels fit the kernels' tile widths better (split into two convolutions, or zero-padded).

    PYTHONPATH=src python benchmarks/conv_algos.py --limit 10 --json conv10.json    # one GPU, full size, bf16
    PYTHONPATH=src python benchmarks/conv_algos.py --limit 0 --json conv0.json      # cuDNN tries every algorithm

    PYTHONPATH=src python benchmarks/conv_algos.py --limit 0 --inductor 6    # + Inductor's Triton templates
    PYTHONPATH=src python benchmarks/conv_algos.py --limit 24 --search-only  # what the search costs and finds
    PYTHONPATH=src python benchmarks/conv_algos.py --limit 32 --search-only --cutlass  # + every CUTLASS tile

`--cutlass` also times each tile of the built CUTLASS library (flashhead.models.vae.cutlass_conv; FLASHHEAD_CONV3D_LIB)
on every convolution it can run, with the input in channels-last layout, and its output's largest difference from
cuDNN's and from a float32 convolution (cuDNN's own float32 error beside it).

`--search-only` times only the first eager decode (cuDNN's search of every shape, paid once per process: a cold
start pays it) against the next ones, and each convolution as cuDNN chose it, without the reformulations: run it
for several limits to find the smallest one whose choices are as fast as the whole search's.

`--limit` is torch.backends.cudnn.benchmark_limit (torch's default: 10 algorithms tried per shape; 0: all). cuDNN
keeps its first choice per shape for the life of the process, so each limit needs a process of its own. Why: the
session-11 profile found 192 of the decode's 207 ms in cuDNN implicit-GEMM convolutions at ~385 TFLOP/s, the
largest kernel tiling 96 output channels with two 64-wide tiles (a quarter of them padding).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

CONV = torch.ops.aten.convolution.default


class ConvRecorder(TorchDispatchMode):
    """Counts each distinct aten.convolution call (shapes, strides, parameters) made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[tuple, dict] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is CONV:
            x, w, b, stride, padding, dilation, transposed, output_padding, groups = args
            key = (tuple(x.shape), x.stride(), tuple(w.shape), w.stride(), b is not None, tuple(stride),
                   tuple(padding), tuple(dilation), bool(transposed), tuple(output_padding), int(groups))  # fmt: skip
            entry = self.calls.setdefault(key, {"count": 0})
            entry["count"] += 1
        return func(*args, **(kwargs or {}))


def strided_randn(shape, stride, device, dtype) -> torch.Tensor:
    return torch.empty_strided(shape, stride, device=device, dtype=dtype).normal_()


def median_ms(fn, repeat: int) -> float:
    for _ in range(3):  # the first call runs cuDNN's search
        fn()
    times = []
    for _ in range(repeat):
        if not torch.cuda.is_available():  # a CPU smoke run of the script
            start = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - start))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main_kernel(fn) -> str:
    """The name of the GPU kernel that takes longest in one call of `fn` ("" on a machine without CUDA)."""
    if not torch.cuda.is_available():
        return ""
    from wan_decode_bench import kernel_profile  # benchmarks/, the script's folder

    top = kernel_profile(fn, top=1)["top"]
    return top[0]["kernel"][:110] if top else ""


def conv_flops(key: tuple) -> int:
    xs, _, ws, _, _, stride, padding, dilation, _, _, groups = key
    spatial = [
        (size + 2 * pad - dil * (k - 1) - 1) // s + 1
        for size, k, s, pad, dil in zip(xs[2:], ws[2:], stride, padding, dilation, strict=True)
    ]
    outputs = xs[0] * ws[0]
    for size in spatial:
        outputs *= size
    per_output = ws[1]
    for k in ws[2:]:
        per_output *= k
    return 2 * outputs * per_output


def operands(key: tuple, device, dtype) -> tuple:
    """Random input, weight and bias (or None) with the recorded convolution's shapes and strides."""
    xs, xstride, ws, wstride, has_bias = key[:5]
    x = strided_randn(xs, xstride, device, dtype)
    w = strided_randn(ws, wstride, device, dtype)
    return x, w, torch.randn(ws[0], device=device, dtype=dtype) if has_bias else None


def variants(key: tuple, device, dtype, repeat: int) -> dict:
    """The convolution as recorded, and (where its output channels are not a multiple of 128) split into a
    64-multiple and a rest, with and without the channel concatenation, and with the weight zero-padded to 128s."""
    ws, (stride, padding, dilation, transposed, output_padding, groups) = key[2], key[5:]
    x, w, b = operands(key, device, dtype)

    def conv(weight, bias):
        return CONV(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups)

    out: dict = {"ms": median_ms(lambda: conv(w, b), repeat), "kernel": main_kernel(lambda: conv(w, b))}
    layout = _format(x)
    dense = x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    if _format(dense) != layout:  # the same input in the channels-last layout the fast kernels read
        out["channels_last_input_ms"] = median_ms(
            lambda: CONV(dense, w, b, stride, padding, dilation, transposed, output_padding, groups), repeat
        )
    cout = ws[0]
    if groups == 1 and cout < 64:  # narrow outputs (the decoder's last convolution, to 3 RGB channels)
        for width in (w for w in (8, 16, 32, 64) if w > cout):
            wp = torch.zeros((width, *ws[1:]), device=device, dtype=dtype)
            wp[:cout] = w
            wp = wp.contiguous(memory_format=_format(w))
            bp = None if b is None else torch.cat([b, b.new_zeros(width - cout)])
            out[f"padded_{width}_ms"] = median_ms(lambda wp=wp, bp=bp: conv(wp, bp), repeat)
            out[f"padded_{width}_kernel"] = main_kernel(lambda wp=wp, bp=bp: conv(wp, bp))
    if groups != 1 or cout % 128 == 0 or cout < 64:
        return out
    first = cout // 128 * 128 or 64
    parts = [(w[:first], None if b is None else b[:first]), (w[first:], None if b is None else b[first:])]
    parts = [(pw.contiguous(memory_format=_format(w)), pb) for pw, pb in parts]
    out["split"] = [first, cout - first]
    out["split_ms"] = median_ms(lambda: [conv(pw, pb) for pw, pb in parts], repeat)
    out["split_kernels"] = [main_kernel(lambda pw=pw, pb=pb: conv(pw, pb)) for pw, pb in parts]
    out["split_cat_ms"] = median_ms(lambda: torch.cat([conv(pw, pb) for pw, pb in parts], dim=1), repeat)
    padded = -(-cout // 128) * 128
    wp = torch.zeros((padded, *ws[1:]), device=device, dtype=dtype)
    wp[:cout] = w
    wp = wp.contiguous(memory_format=_format(w))
    bp = None if b is None else torch.cat([b, b.new_zeros(padded - cout)])
    out["padded_to"] = padded
    out["padded_ms"] = median_ms(lambda: conv(wp, bp), repeat)
    out["padded_kernel"] = main_kernel(lambda: conv(wp, bp))
    return out


def inductor_variant(key: tuple, device, dtype, repeat: int) -> dict:
    """The convolution compiled with max-autotune: Inductor times its Triton convolution templates against ATen's
    (cuDNN) call for the shape and keeps the faster; returns its time and the kernel that ran."""
    import torch._inductor.config as inductor_config

    stride, padding, dilation, transposed, output_padding, groups = key[5:]
    x, w, b = operands(key, device, dtype)

    def conv(x, w, b):
        return CONV(x, w, b, stride, padding, dilation, transposed, output_padding, groups)

    torch._dynamo.reset()
    with inductor_config.patch(max_autotune_conv_backends="TRITON,ATEN"):
        start = time.perf_counter()
        compiled = torch.compile(conv, mode="max-autotune-no-cudagraphs", dynamic=False)
        got = compiled(x, w, b)  # compiles and autotunes
        seconds = time.perf_counter() - start
    return {
        "inductor_max_abs_diff": float((got.float() - conv(x, w, b).float()).abs().max()),  # against cuDNN's result
        "inductor_ms": median_ms(lambda: compiled(x, w, b), repeat),
        "inductor_kernel": main_kernel(lambda: compiled(x, w, b)),
        "inductor_autotune_s": round(seconds, 1),
    }


def cutlass_variant(key: tuple, device, dtype, repeat: int) -> dict:
    """Every tile of the CUTLASS library that can run this convolution: its time and its error."""
    from flashhead.models.vae.cutlass_conv import CL3D, load_library

    stride, padding, dilation, transposed, output_padding, groups = key[5:]
    lib = load_library()
    if lib is None or transposed or groups != 1 or set(stride) != {1} or set(dilation) != {1}:
        return {}
    x, w, b = operands(key, device, dtype)
    if x.dim() != 5 or x.shape[1] % 8 or w.shape[0] % 8:
        return {}
    x, w = x.contiguous(memory_format=CL3D), w.contiguous(memory_format=CL3D)
    b = b if b is not None else torch.zeros(w.shape[0], device=device, dtype=dtype)
    ref = CONV(x.float(), w.float(), b.float(), stride, padding, dilation, transposed, output_padding, groups)
    cudnn = CONV(x, w, b, stride, padding, dilation, transposed, output_padding, groups)
    scale = float(ref.abs().max())
    out = torch.empty(ref.shape, device=device, dtype=dtype, memory_format=CL3D)
    tiles = {}
    for i, name in enumerate(lib.tiles):
        if lib.run(i, x, w, b, out, tuple(padding)) != 0:
            continue
        torch.cuda.synchronize()
        tiles[name] = {
            "ms": median_ms(lambda i=i: lib.run(i, x, w, b, out, tuple(padding)), repeat),
            "max_err_vs_fp32": float((out.float() - ref).abs().max()) / scale,
            "max_diff_vs_cudnn": float((out.float() - cudnn.float()).abs().max()) / scale,
        }
    if not tiles:
        return {"cutlass_tiles": {}}
    best = min(tiles, key=lambda n: tiles[n]["ms"])
    return {
        "cutlass_tiles": tiles, "cutlass_best": best, "cutlass_ms": tiles[best]["ms"],
        # cuDNN adds a bias in a pass of its own (compiled, Inductor fuses it into the next kernel); CUTLASS in its
        # epilogue: the fair comparison in a compiled decode is this one.
        "cudnn_no_bias_ms": median_ms(lambda: CONV(x, w, None, stride, padding, dilation, transposed,
                                                   output_padding, groups), repeat),
        "cudnn_max_err_vs_fp32": float((cudnn.float() - ref).abs().max()) / scale,
        "cutlass_kernel": main_kernel(lambda: lib.run(lib.tiles.index(best), x, w, b, out, tuple(padding))),
    }  # fmt: skip


def _format(w: torch.Tensor) -> torch.memory_format:
    """The memory format a weight or input is dense in (contiguous when neither channels-last one fits)."""
    if w.dim() == 5 and w.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=10, help="torch.backends.cudnn.benchmark_limit (0: all)")
    parser.add_argument("--latent", default="16,9,64,64", help="C,T,H,W of the latent (Pro chunk: 16,9,64,64)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cuda (what it is for) or cpu (a smoke run, small latent)")
    parser.add_argument(
        "--inductor",
        type=int,
        default=0,
        metavar="N",
        help="also time Inductor's max-autotune choice (its Triton convolution templates against "
        "ATen's cuDNN call) for the N convolutions with the most time per chunk and the narrow ones",
    )
    parser.add_argument("--search-only", action="store_true",
                        help="the search's cost and the chosen kernels' times only (no reformulations)")
    parser.add_argument("--cutlass", action="store_true", help="also every tile of the built CUTLASS library")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from diffusers import AutoencoderKLWan

    from flashhead.benchmark import timed_ms
    from flashhead.models.vae import WanVideoVAE
    from flashhead.pipeline.fast_path import apply_vae_switches
    from flashhead.pipeline.speed import SpeedConfig

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.benchmark_limit = args.limit
    dev = torch.device(args.device)
    # bf16 as the pipeline runs on the GPU; a CPU run is a smoke test, in float32 because CPUs without bf16 matrix
    # instructions (e.g. AVX2-only) run bf16 3-D convolutions through a naive GEMM (minutes instead of seconds).
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = AutoencoderKLWan().to(dev, dtype).eval()  # the Wan2.1 configuration, random weights
    vae = WanVideoVAE(model).to(dev)
    apply_vae_switches(vae, SpeedConfig(vae_conv_pad=True, vae_channels_last=True))  # the shipped layout
    z = torch.randn(1, *map(int, args.latent.split(",")), generator=torch.Generator().manual_seed(0))
    z = z.to(dev, dtype)
    recorder = ConvRecorder()
    with torch.no_grad():
        start = time.perf_counter()
        model.decode(z)  # the first decode: cuDNN searches every convolution shape it meets
        if dev.type == "cuda":
            torch.cuda.synchronize()
        first_decode_s = time.perf_counter() - start
        eager_ms, _ = timed_ms(lambda: model.decode(z).sample, 3)  # the eager decode, this process's algorithms
        with recorder:
            model.decode(z)
    rows, keys = [], []
    with torch.no_grad():
        for key, entry in sorted(recorder.calls.items(), key=lambda kv: -conv_flops(kv[0]) * kv[1]["count"]):
            keys.append(key)
            layout = str(_format(torch.empty_strided(key[0], key[1], device="meta")))
            row = {"input": key[0], "input_stride": key[1], "layout": layout, "weight": key[2],
                   "count": entry["count"], "gflop": round(conv_flops(key) / 1e9, 2)}  # fmt: skip
            if args.search_only:
                x, w, b = operands(key, dev, dtype)
                row["ms"] = median_ms(lambda x=x, w=w, b=b, k=key: CONV(x, w, b, *k[5:]), args.repeat)
            else:
                row.update(variants(key, dev, dtype, args.repeat))
            row["tflops"] = round(conv_flops(key) / row["ms"] / 1e9, 1)
            if args.cutlass and dev.type == "cuda":
                row.update(cutlass_variant(key, dev, dtype, args.repeat))
                if "cutlass_ms" in row:
                    row["cutlass_tflops"] = round(conv_flops(key) / row["cutlass_ms"] / 1e9, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.inductor and dev.type == "cuda":
        by_time = sorted(range(len(rows)), key=lambda i: -rows[i]["count"] * rows[i]["ms"])
        picked = set(by_time[: args.inductor]) | {i for i, r in enumerate(rows) if r["weight"][0] < 64}
        for i in sorted(picked):
            rows[i].update(inductor_variant(keys[i], dev, dtype, args.repeat))
            shown = {k: rows[i][k] for k in ("weight", "input", "ms", "inductor_ms", "inductor_kernel")}
            print(json.dumps(shown), flush=True)
    total = sum(r["count"] * r["ms"] for r in rows)
    variant_keys = ("split_cat_ms", "padded_ms", "inductor_ms", "cutlass_ms")
    best = sum(r["count"] * min([r["ms"], *(r[k] for k in variant_keys if k in r)]) for r in rows)
    flop = sum(r["count"] * r["gflop"] for r in rows) / 1e3
    report = {
        "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "dtype": str(dtype).removeprefix("torch."),
        "benchmark_limit": args.limit,
        "latent": args.latent,
        "eager_decode_ms": eager_ms,
        "first_decode_s": round(first_decode_s, 2),
        "search_s": round(first_decode_s - eager_ms / 1000, 2),  # the first decode's extra time: the search
        "shapes": len(rows),
        "conv_ms_sum": round(total, 2),
        "conv_tflop": round(flop, 2),
        "conv_tflops": round(flop / total * 1e3, 1),
        "conv_ms_sum_best_variant": round(best, 2),
        "conv_ms_sum_cutlass_or_cudnn": round(
            sum(r["count"] * min(r["ms"], r.get("cutlass_ms", r["ms"])) for r in rows), 2
        ),
        "convolutions": rows,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "convolutions"}))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
