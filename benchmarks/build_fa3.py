"""Build FlashAttention-3 on the device for the `attention=fa3` switch, then check and time it against cuDNN.

FlashAttention-3 (Dao-AILab/flash-attention, hopper/) has no wheel for this image (torch 2.11, CUDA 13), and a full
build compiles ~500 kernel instantiations. The DiT needs one: the forward pass, head dim 128, bf16, Hopper (sm_90a),
without split-KV, paged KV, soft-capping, local windows, variable lengths or GQA packing. Its setup.py has a switch
for each of those (FLASH_ATTENTION_DISABLE_*, passed as compile definitions); with all of them the build is three
translation units.

    # here, once: the sources (hopper/ and CUTLASS include/ at the flash-attention submodule's commit), 1.1 MB
    tar cf - fa3src | xz -9 > .device/fa3/fa3src.tar.xz          # see docs/performance-log.md, session 22
    # on the device (carry .device/fa3):
    python3 benchmarks/build_fa3.py --src /tmp/fa3src --dest $OUT/fa3 --json $OUT/fa3.json

The result is a folder to put on PYTHONPATH: flash_attn_interface.py (upstream's), flash_attn_config.py (the build
flags, which the interface reads) and the package flash_attn_3 with the compiled `_C` extension. It is then checked
against SDPA (math) and timed against cuDNN's attention at the Pro and Lite DiT shapes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Everything the DiT does not use is compiled out (setup.py's FLASH_ATTENTION_DISABLE_* switches).
DISABLED = [
    "BACKWARD", "SPLIT", "PAGEDKV", "APPENDKV", "LOCAL", "SOFTCAP", "PACKGQA", "FP16", "FP8", "VARLEN",
    "HDIM64", "HDIM96", "HDIM192", "HDIM256", "SM8x",
]  # fmt: skip
SOURCES = ["flash_api_stable.cpp", "instantiations/flash_fwd_hdim128_bf16_sm90.cu", "flash_prepare_scheduler.cu"]
NVCC_FLAGS = [
    "-O3", "-std=c++17", "--use_fast_math", "--threads", "4",
    "-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED",  # the WGMMA tile shapes FA3 uses
    "-DCUTLASS_ENABLE_GDC_FOR_SM90",  # programmatic dependent launch
    "-DCUTLASS_DEBUG_TRACE_LEVEL=0", "-DNDEBUG",
]  # fmt: skip
CXX_FLAGS = ["-O3", "-std=c++17", "-DPy_LIMITED_API=0x03090000", "-DTORCH_TARGET_VERSION=0x0209000000000000"]


def build_flags() -> dict[str, bool]:
    """The CONFIG["build_flags"] the interface reads (the same names setup.py writes)."""
    names = ["BACKWARD", "SPLIT", "PAGEDKV", "APPENDKV", "LOCAL", "SOFTCAP", "PACKGQA", "FP16", "FP8", "VARLEN",
             "CLUSTER", "HDIM64", "HDIM96", "HDIM128", "HDIM192", "HDIM256", "SM8x"]  # fmt: skip
    flags = {f"FLASHATTENTION_DISABLE_{n}": n in DISABLED for n in names}
    flags["FLASHATTENTION_ENABLE_VCOLMAJOR"] = False
    flags["FLASH_ATTENTION_DISABLE_HDIMDIFF64"] = flags["FLASH_ATTENTION_DISABLE_HDIMDIFF192"] = True
    return flags


def build(src: Path, dest: Path, build_dir: Path) -> float:
    """Compile the extension into build_dir and lay out `dest`; returns the seconds it took."""
    from torch.utils.cpp_extension import load

    hopper = src / "hopper"
    defines = [f"-DFLASHATTENTION_DISABLE_{n}" for n in DISABLED]
    defines += ["-DFLASH_ATTENTION_DISABLE_HDIMDIFF64", "-DFLASH_ATTENTION_DISABLE_HDIMDIFF192"]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")  # sm_90a: FA3's WGMMA / TMA instructions
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    build_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    load(
        name="_C",  # flash_api_stable.cpp defines PyInit__C: the module flash_attn_3._C
        sources=[str(hopper / s) for s in SOURCES],
        extra_cflags=CXX_FLAGS + defines,
        extra_cuda_cflags=NVCC_FLAGS + defines,
        extra_include_paths=[str(hopper), str(src / "cutlass" / "include")],
        build_directory=str(build_dir),
        is_python_module=False,  # loads the library (its operator registrations) without importing it
        verbose=True,
    )
    seconds = time.perf_counter() - start
    package = dest / "flash_attn_3"
    package.mkdir(parents=True, exist_ok=True)
    shutil.copy(build_dir / "_C.so", package / "_C.so")
    (package / "__init__.py").write_text("")
    shutil.copy(hopper / "flash_attn_interface.py", dest / "flash_attn_interface.py")
    (dest / "flash_attn_config.py").write_text(f"CONFIG = {{'build_flags': {build_flags()!r}}}\n")
    return seconds


def check_and_time(dest: Path, repeat: int = 50) -> dict:
    """FA3 against SDPA's math kernel (float32 reference) and timed against cuDNN at the DiT's attention shapes."""
    import torch
    import torch.nn.functional as F
    from conv_algos import median_ms  # benchmarks/, the script's folder
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sys.path.insert(0, str(dest))
    import flash_attn_interface  # noqa: PLC0415

    def fa3(q, k, v):
        out = flash_attn_interface.flash_attn_func(q, k, v)
        return out[0] if isinstance(out, tuple) else out

    def cudnn(q, k, v):  # (B, L, H, D) like FA3
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    shapes = {  # (batch, query tokens, key tokens): heads 12, head dim 128
        "pro_self": (1, 9216, 9216),
        "pro_cross": (9, 1024, 32),
        "lite_self": (1, 1280, 1280),
        "lite_cross": (5, 256, 32),
    }
    report = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (b, lq, lk) in shapes.items():
        q = torch.randn(b, lq, 12, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(b, lk, 12, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(b, lk, 12, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        flop = 4 * b * lq * lk * 12 * 128
        entry = {"fa3_max_abs_err": float((fa3(q, k, v).float() - ref).abs().max()),
                 "cudnn_max_abs_err": float((cudnn(q, k, v).float() - ref).abs().max())}  # fmt: skip
        for kernel, fn in (("fa3", fa3), ("cudnn", cudnn)):
            t = median_ms(functools.partial(fn, q, k, v), repeat)
            entry[f"{kernel}_us"] = round(1000 * t, 1)
            entry[f"{kernel}_tflops"] = round(flop / t / 1e9, 1)
        report[name] = entry
        print(name, json.dumps(entry), flush=True)
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda, **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=Path("/tmp/fa3src"), help="hopper/ and cutlass/include/ inside")
    parser.add_argument("--dest", type=Path, default=Path("/tmp/fa3"), help="the folder to put on PYTHONPATH")
    parser.add_argument("--build-dir", type=Path, default=Path("/tmp/fa3-build"), help="ninja's (kept: incremental)")
    parser.add_argument("--no-build", action="store_true", help="check and time an existing --dest only")
    parser.add_argument("--build-seconds", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not args.no_build:
        seconds = round(build(args.src, args.dest, args.build_dir), 1)
        print("built in", seconds, "s", flush=True)
        # The build loaded the library, whose static initialisers registered the flash_attn_3 operators in this
        # process; importing the copy in --dest here would register them twice. So the check runs in a new process.
        child = [sys.executable, __file__, "--no-build", "--dest", str(args.dest), "--build-seconds", str(seconds)]
        sys.exit(subprocess.run(child + (["--json", str(args.json)] if args.json else [])).returncode)
    report: dict = {"disabled": DISABLED, "sources": SOURCES, "build_seconds": args.build_seconds}
    report.update(check_and_time(args.dest))
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
