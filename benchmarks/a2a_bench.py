"""How fast the GPUs of one host exchange the sequence-parallel DiT's tensors (NCCL through torch.distributed).

    torchrun --nproc-per-node 2 benchmarks/a2a_bench.py --json a2a.json
    NCCL_P2P_NCHANNELS=32 torchrun --nproc-per-node 2 benchmarks/a2a_bench.py   # an NCCL setting against another

Pro on 2 GPUs sends, per block and step, the q / k / v shards to the head owners in one all-to-all and the
attention output back in another (flashhead.parallel.attention). This times exactly those shapes (and an all-gather
of the decoded strips) in bf16, median of `--repeat` after warm-up, and reports the achieved bus bandwidth, so a
slow transport (no NVLink peer access, too few NCCL channels) shows before the DiT is blamed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist


def timed(fn, repeat: int) -> float:
    """Median milliseconds of `fn` (CUDA events on the GPU), after 3 warm-up calls; ranks start together."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        dist.barrier()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:  # a CPU smoke run over gloo
            begin = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - begin))
    return sorted(times)[len(times) // 2]


def symmetric_exchange(x: torch.Tensor, world: int, rank: int):
    """An all-to-all of `x` (dim 0 in `world` equal chunks, chunk p for rank p) by copies into the peers'
    symmetric-memory receive buffers, between two barriers: what NCCL's all-to-all could at best be."""
    import torch.distributed._symmetric_memory as symm_mem

    chunks = x.reshape(world, -1, *x.shape[1:])
    recv = symm_mem.empty(tuple(chunks.shape), dtype=x.dtype, device=x.device)  # slot r: what rank r sent me
    handle = symm_mem.rendezvous(recv, dist.group.WORLD)
    peers = [handle.get_buffer(p, tuple(chunks.shape), x.dtype) for p in range(world)]

    def run() -> torch.Tensor:
        handle.barrier()  # every peer is done with the previous round's buffer
        for p in range(world):
            peers[p][rank].copy_(chunks[p])
        handle.barrier()  # every peer has written its slot of mine
        return recv

    return run


def emit(report: dict, rank: int, path: Path | None) -> None:
    if rank == 0:
        text = json.dumps(report, indent=1)
        print(text, flush=True)
        if path:
            path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=9216, help="tokens of one Pro chunk (9 x 32 x 32)")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--head-groups", type=int, default=2, help="Ulysses head groups: one group's tensors too")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shard = args.tokens // world
    cases = {
        # name: (tensor per rank, collective)
        "qkv_all_to_all": torch.randn(3 * shard, args.dim, device=dev, dtype=torch.bfloat16),
        "out_all_to_all": torch.randn(shard, args.dim, device=dev, dtype=torch.bfloat16),
        "small_all_to_all_1MB": torch.randn(512, 1024, device=dev, dtype=torch.bfloat16),
    }
    if args.head_groups > 1:  # what one head group sends (the first is exposed, as the last output group)
        width = args.dim // args.head_groups
        cases["qkv_group_all_to_all"] = torch.randn(3 * shard, width, device=dev, dtype=torch.bfloat16)
        cases["out_group_all_to_all"] = torch.randn(shard, width, device=dev, dtype=torch.bfloat16)
    on_gpu = torch.cuda.is_available()
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if on_gpu else None
    report: dict = {
        "world_size": world, "gpu": torch.cuda.get_device_name() if on_gpu else None, "torch": torch.__version__,
        "nccl": nccl, "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}, "cases": {},
    }  # fmt: skip
    for name, x in cases.items():
        out = torch.empty_like(x)
        ms = timed(lambda x=x, out=out: dist.all_to_all_single(out, x), args.repeat)
        sent = x.numel() * x.element_size() * (world - 1) / world  # bytes leaving each rank
        report["cases"][name] = {"mb_per_rank": round(x.numel() * x.element_size() / 1e6, 2), "ms": round(ms, 3),
                                 "gb_per_s_sent": round(sent / ms / 1e6, 1)}  # fmt: skip
    strip = torch.randn(1, 3, 33, 512 // world, 512, device=dev, dtype=torch.bfloat16)  # a decoded Pro strip
    pieces = [torch.empty_like(strip) for _ in range(world)]
    ms = timed(lambda: dist.all_gather(pieces, strip), args.repeat)
    report["cases"]["decode_all_gather"] = {"mb_per_rank": round(strip.numel() * 2 / 1e6, 2), "ms": round(ms, 3),
                                            "gb_per_s_sent": round(strip.numel() * 2 / ms / 1e6, 1)}  # fmt: skip
    emit(report, rank, args.json)  # before the last case, which may hang where it is unsupported
    if on_gpu:  # the same exchange as direct writes into the peers' memory (torch symmetric memory, NVLink)
        try:
            x = cases["qkv_all_to_all"]
            ms = timed(symmetric_exchange(x, world, rank), args.repeat)
            sent = x.numel() * x.element_size() * (world - 1) / world
            entry = {"ms": round(ms, 3), "gb_per_s_sent": round(sent / ms / 1e6, 1)}
            report["cases"]["qkv_symmetric_memory_copy"] = entry
        except Exception as e:  # noqa: BLE001 - reported: not every build or machine has it
            report["cases"]["qkv_symmetric_memory_copy"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    emit(report, rank, args.json)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
