"""One compiled full-size DiT block on one GPU: its time and its kernels (Inductor settings come from the environment).

    python3 benchmarks/block_bench.py --model pro                        # Inductor's defaults
    TORCHINDUCTOR_MULTI_KERNEL=1 python3 benchmarks/block_bench.py     # e.g. persistent reductions tried too

Random weights in bf16, the `--optimized` block (cuDNN attention, RoPE table, fused GELU), the token count of
one 512x512 chunk (Pro 9,216, Lite 1,280; `--batch N`: N streams' chunks in one call, as a batched round). Prints
JSON: median ms per block call over CUDA events, the same inside a CUDA graph (as the chunk loop runs; with its
MFU, a block's FLOPs as flashhead.pipeline.flops counts them), the kernels of one call by GPU time, so one kernel
(e.g. the q / k norm + RoPE) can be compared across settings, and the memsets one call launches with the operators
that launch them (cuBLAS and cuDNN clear workspaces before some kernels: inside a CUDA graph each is a node of its
own).

    CUBLASLT_WORKSPACE_SIZE=0 python3 benchmarks/block_bench.py --attention flash   # what changes the memsets
    python3 benchmarks/block_bench.py --persistent-rows 2048   # the norms over 1,536 channels as one-pass reductions
    python3 benchmarks/block_bench.py --persistent-rows 2048 --persistent-hints inner,default   # other hints too

`--persistent-rows N`: Inductor makes a reduction persistent (the row held in registers, read once) only up to
1,024 values; the DiT's norms run over 1,536 and are looped (read twice). This replaces Inductor's heuristic
choices object (the documented hook, `V.set_choices_handler`) with one that also takes inner reductions up to N
values persistent, without multi-kernel's timing at the first call, and compiles without the FX graph cache (whose
key does not see the handler). The JSON's `reductions` lists each reduction Inductor decided (values, reduction hint,
persistent or not): one of the block's norm kernels stayed looped under the switch's INNER-only predicate (session 23),
and `--persistent-hints` takes other hints too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from flashhead.models.dit import FlashHeadDiT, official_config
from flashhead.pipeline.fast_path import attention_context
from flashhead.pipeline.flops import dit_forward_flops, peak_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pro", choices=["lite", "pro"])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1, help="streams in the call (the engine's batched rounds)")
    parser.add_argument("--attention", default="cudnn", help="SDPA backend (flashhead.pipeline.fast_path)")
    parser.add_argument("--no-fused-gelu", action="store_true", help="the FFN's GELU as Inductor compiles it")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--persistent-rows", type=int, default=0, help="persistent reductions up to this many values")
    parser.add_argument("--persistent-hints", default="inner",
                        help="with --persistent-rows: the reduction hints taken (comma-separated: inner,default,...)")
    parser.add_argument("--rope-fp32", action="store_true", help="the RoPE table and rotation in float32 (rope_fp32)")
    parser.add_argument("--fused-qk-rope", action="store_true",
                        help="q / k norm + RoPE as one Triton kernel per tensor (fused_qk_rope; needs --rope-fp32)")
    parser.add_argument("--cross-attn-fold", action="store_true",
                        help="the audio cross-attention and its projection as two dense GEMMs (cross_attn_fold)")
    args = parser.parse_args()
    if args.persistent_rows:
        persistent_rows(args.persistent_rows, args.persistent_hints)
    device = "cuda"
    config = official_config(args.model) | {"num_layers": 1}
    dit = FlashHeadDiT.from_config(config).to(device, torch.bfloat16).eval()
    dit.set_fused_gelu(not args.no_fused_gelu)
    if args.fused_qk_rope and not args.rope_fp32:
        parser.error("--fused-qk-rope rotates with the float32 table: add --rope-fp32")
    dit.set_fused_qk_rope(args.fused_qk_rope)
    dit.set_cross_attn_fold(args.cross_attn_fold)
    block = dit.blocks[0]
    block.compile(mode=args.mode)
    frames, h, w = (9, 32, 32) if args.model == "pro" else (5, 16, 16)
    dim = config["dim"]
    B = args.batch
    x = torch.randn(B, frames * h * w, dim, device=device, dtype=torch.bfloat16)
    audio = torch.randn(B, frames, 32, dim, device=device, dtype=torch.bfloat16)
    t_mod = torch.randn(B, 6, dim, device=device, dtype=torch.bfloat16) * 0.1
    rope = dit.rope((frames, h, w), x.device, table=True, dtype=torch.float32 if args.rope_fp32 else torch.float64)

    def call() -> torch.Tensor:
        with torch.no_grad(), attention_context(args.attention):
            return block(x, audio, t_mod, rope)

    began = time.perf_counter()
    call()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - began
    block_ms, _ = event_ms(call, args.repeats, warmup=3)
    graph_ms = graph_time_ms(call)
    block_flops = one_block_flops(config, (frames, h, w), B)
    peak = peak_flops(torch.cuda.get_device_name())
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    memsets = 0
    for e in prof.events():
        if e.device_type.name == "CUDA":
            kernels[e.name[:90]] = kernels.get(e.name[:90], 0.0) + e.device_time_total
            memsets += e.name.startswith("Memset")
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:14]
    settings = {k: v for k, v in os.environ.items() if k.startswith(("TORCHINDUCTOR_", "CUBLAS", "TORCH_"))}
    print(json.dumps({"model": args.model, "batch": B, "gpu": torch.cuda.get_device_name(), "env": settings,
                      "attention": args.attention, "fused_gelu": not args.no_fused_gelu,
                      "mode": args.mode, "rope_fp32": args.rope_fp32, "fused_qk_rope": args.fused_qk_rope,
                      "cross_attn_fold": args.cross_attn_fold,
                      "persistent_rows": args.persistent_rows,
                      "persistent_hints": args.persistent_hints if args.persistent_rows else None,
                      "reductions": REDUCTIONS, "compile_s": round(compile_s, 1),
                      "block_ms_median": round(block_ms, 4),
                      "block_ms_in_cuda_graph": round(graph_ms, 4),
                      "block_tflop": round(block_flops / 1e12, 4),
                      "mfu_in_cuda_graph": round(block_flops / (graph_ms / 1000) / peak, 4) if peak else None,
                      "memsets_per_call": memsets,
                      "memsets_launched_by": memset_sources(prof),
                      "kernels_us": [[name, round(us, 1)] for name, us in top]}))  # fmt: skip


BLOCK_TERMS = ("self_attention", "cross_attention", "ffn")  # the FLOP terms counted per block (N = 1)


def one_block_flops(config: dict, token_grid: tuple[int, int, int], batch: int) -> float:
    """FLOPs of one block call on `batch` chunks of `token_grid` tokens (frames, rows, columns after patching)."""
    pt, ph, pw = config["patch_size"]  # the FLOP count takes the latent grid, before patching (Pro's is 2x2 wider)
    latent = (token_grid[0] * pt, token_grid[1] * ph, token_grid[2] * pw)
    terms = dit_forward_flops(config | {"num_layers": 1}, latent, batch=batch, by_term=True)
    return sum(v for k, v in terms.items() if k.startswith(BLOCK_TERMS))
REDUCTIONS: list[dict] = []  # each reduction Inductor asked about: its size, hint and the answer (in the JSON)


def persistent_rows(max_values: int, hints: str = "inner"):
    """From here on, Inductor makes reductions with one of `hints` (comma-separated ReductionHint names; rows:
    inner) over up to `max_values` values persistent (its limit: 1,024), and REDUCTIONS logs each decision.
    Returns the context manager that restores the previous heuristics on exit."""
    import torch._inductor.config as inductor_config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    from flashhead.pipeline.inductor_heuristics import wide_row_persistent

    taken = tuple(ReductionHint[name.strip().upper()] for name in hints.split(","))

    class WideRows(InductorChoices):  # the persistent_norms switch's predicate, at any limit and hints
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction: bool) -> bool:
            answer = wide_row_persistent(features, cooperative_reduction, max_values, taken)
            REDUCTIONS.append({"values": str(features.reduction_numel), "hint": features.get_reduction_hint().name,
                               "cooperative": cooperative_reduction, "persistent": answer})  # fmt: skip
            return answer

    inductor_config.fx_graph_cache = False  # a cached graph compiled under the default heuristic would be reused
    return V.set_choices_handler(WideRows())


def event_ms(call, repeats: int, warmup: int = 0):
    """Median GPU ms of `repeats` calls of `call`, each between two CUDA events (after `warmup` untimed calls),
    and the last call's result (also for benchmarks/color_bench.py and audio_precision.py)."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times, out = [], None
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = call()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times), out


def graph_time_ms(call, calls: int = 20) -> float:
    """ms per call of `call` captured `calls` times in one CUDA graph, median of 10 replays."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    graph.replay()
    times = []
    for _ in range(10):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / calls)
    return statistics.median(times)


def memset_sources(prof) -> dict[str, int]:
    """Memset launches (runtime calls) counted by the outermost aten operator that made them."""
    sources: dict[str, int] = {}
    for e in prof.events():
        if "memset" not in e.name.lower() or e.device_type.name != "CPU":
            continue
        op, parent = e.name, e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                op = parent.name
            parent = parent.cpu_parent
        sources[op] = sources.get(op, 0) + 1
    return sources


if __name__ == "__main__":
    main()
