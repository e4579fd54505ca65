"""How Inductor compiles formulations of the k / v first front end (projections, norms, RoPE, send buffers).

One GPU, Pro's shapes on one of two ranks (4,608 tokens, 12 heads in 2 groups per rank): each formulation is compiled
alone, captured in a CUDA graph (20 calls) and timed; prints JSON per variant with the microseconds per call, the
Triton kernels and extern GEMMs of the generated code, and the largest difference from eager. The variant the
sequence-parallel DiT runs is `front_shipped` (kv_first_self_attention: fused k / v GEMM, q per rank block);
`kv_two_stage_norm`, `kv_k_rank_blocks` and the `one_gpu_qk_*` pair are candidates (the latter the one-GPU DiT's
q / k norms, 9,216 tokens); session 15 measured all of them slower than the shipped forms (one H100).

    python3 benchmarks/kv_first_front_end.py --json /tmp/front_end.json
"""

from __future__ import annotations

import argparse
import json
import re

import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from flashhead.models.dit import apply_rope, rope_table
from flashhead.parallel.attention import _by_group_and_rank

TOKENS, DIM, HEADS, RANKS, GROUPS = 4608, 1536, 12, 2, 2
D, HG = DIM // HEADS, HEADS // RANKS // GROUPS


def build(device: str):
    torch.manual_seed(0)
    dt = torch.bfloat16
    w = {k: torch.randn(DIM, DIM, device=device, dtype=dt) / DIM**0.5 for k in "qkv"}
    b = {k: torch.randn(DIM, device=device, dtype=dt) for k in "qkv"}
    norm = {k: torch.rand(DIM, device=device, dtype=dt) + 0.5 for k in "qk"}
    wkv, bkv = torch.cat([w["k"], w["v"]]), torch.cat([b["k"], b["v"]])

    def rms(t, weight):
        inv = torch.rsqrt(t.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return (t.float() * inv).to(t.dtype) * weight

    def q_whole(x, rope):
        return apply_rope(rms(F.linear(x, w["q"], b["q"]), norm["q"]).unflatten(-1, (HEADS, D)), rope[1])

    def q_stack_of_slices(rank):  # session 13: q normalised whole, then stacked by rank slices (own last)
        def f(x, rope):
            q = _by_group_and_rank(q_whole(x, rope), RANKS, GROUPS)
            return torch.stack([q[:, j] for j in range(RANKS) if j != rank] + [q[:, rank]], dim=1)

        return f

    def q_gather(rank):  # reordered by index_select
        def f(x, rope):
            order = torch.tensor([j for j in range(RANKS) if j != rank] + [rank], device=x.device)
            return _by_group_and_rank(q_whole(x, rope), RANKS, GROUPS).index_select(1, order)

        return f

    def rank_blocks(raw, weight, rope, ranks):
        """raw (1, TOKENS, DIM) normalised from one reduction, each rank's heads into its block, stacked in
        `ranks` order: (GROUPS, len(ranks), TOKENS, 1, HG, D)."""
        inv = torch.rsqrt(raw.float().pow(2).mean(-1, keepdim=True) + 1e-6).unsqueeze(-1)
        raw, weight, per = raw.unflatten(-1, (HEADS, D)), weight.unflatten(-1, (HEADS, D)), HEADS // RANKS

        def block(j):
            h = slice(j * per, (j + 1) * per)
            out = apply_rope((raw[:, :, h].float() * inv).to(raw.dtype) * weight[h], rope)
            return out.reshape(1, TOKENS, GROUPS, HG, D).permute(2, 1, 0, 3, 4)

        return torch.stack([block(j) for j in ranks], dim=1)

    def q_rank_blocks(rank):  # session 14 (shipped): one reduction, each rank's heads normalised into its block
        order = [j for j in range(RANKS) if j != rank] + [rank]
        return lambda x, rope: rank_blocks(F.linear(x, w["q"], b["q"]), norm["q"], rope[1], order)

    def kv(fused: bool):
        def f(x, rope):
            k, v = F.linear(x, wkv, bkv).chunk(2, -1) if fused else (F.linear(x, w[n], b[n]) for n in "kv")
            k = apply_rope(rms(k, norm["k"]).unflatten(-1, (HEADS, D)), rope[0])
            v = v.unflatten(-1, (HEADS, D))
            return torch.stack([_by_group_and_rank(t, RANKS, GROUPS) for t in (k, v)], dim=3)

        return f

    def kv_two_stage(x, rope):  # k's 1 / RMS by per-head sums, then their sum: not foldable into k's pointwise
        k, v = F.linear(x, wkv, bkv).chunk(2, -1)
        heads = k.unflatten(-1, (HEADS, D))
        inv = torch.rsqrt(heads.float().pow(2).sum(-1).sum(-1, keepdim=True) / DIM + 1e-6).unsqueeze(-1)
        k = apply_rope((heads.float() * inv).to(k.dtype) * norm["k"].unflatten(-1, (HEADS, D)), rope[0])
        return torch.stack([_by_group_and_rank(t, RANKS, GROUPS) for t in (k, v.unflatten(-1, (HEADS, D)))], dim=3)

    def kv_k_rank_blocks(x, rope):  # k as q: one reduction, each rank's heads normalised into its block (bit-exact)
        k, v = F.linear(x, wkv, bkv).chunk(2, -1)
        k = rank_blocks(k, norm["k"], rope[0], range(RANKS))
        return torch.stack([k, _by_group_and_rank(v.unflatten(-1, (HEADS, D)), RANKS, GROUPS)], dim=3)

    # One GPU, the whole sequence (2 x 4,608 tokens): q and k for SDPA, (B, L, H, d) each.
    def qk_whole(x, rope):
        x = torch.cat([x, x], 1)
        r = torch.cat([rope[0], rope[0]])
        return tuple(apply_rope(rms(F.linear(x, w[n], b[n]), norm[n]).unflatten(-1, (HEADS, D)), r) for n in "qk")

    def qk_head_blocks(x, rope):  # each normalised in two blocks of heads from one reduction (as q above)
        x = torch.cat([x, x], 1)
        r = torch.cat([rope[0], rope[0]])
        out = []
        for n in "qk":
            raw = F.linear(x, w[n], b[n])
            inv = torch.rsqrt(raw.float().pow(2).mean(-1, keepdim=True) + 1e-6).unsqueeze(-1)
            raw, weight, half = raw.unflatten(-1, (HEADS, D)), norm[n].unflatten(-1, (HEADS, D)), HEADS // 2
            blocks = [slice(0, half), slice(half, HEADS)]
            parts = [apply_rope((raw[:, :, h].float() * inv).to(raw.dtype) * weight[h], r) for h in blocks]
            out.append(torch.cat(parts, dim=2))
        return tuple(out)

    def both(kv_fn, q_fn):
        return lambda x, rope: (kv_fn(x, rope), q_fn(x, rope))

    variants = {
        "q_stack_of_slices": q_stack_of_slices(0),
        "q_gather": q_gather(0),
        "q_rank_blocks": q_rank_blocks(0),
        "kv_two_gemms": kv(False),
        "kv_one_gemm": kv(True),
        "front_session13": both(kv(False), q_stack_of_slices(0)),
        "front_shipped": both(kv(True), q_rank_blocks(0)),
        "kv_two_stage_norm": kv_two_stage,
        "front_two_stage_k": both(kv_two_stage, q_rank_blocks(0)),
        "kv_k_rank_blocks": kv_k_rank_blocks,
        "front_k_rank_blocks": both(kv_k_rank_blocks, q_rank_blocks(0)),
        "one_gpu_qk_whole": qk_whole,
        "one_gpu_qk_head_blocks": qk_head_blocks,
    }
    x = torch.randn(1, TOKENS, DIM, device=device, dtype=dt)
    rope1 = rope_table(D, (4, 36, 32), torch.device(device))[:TOKENS].contiguous()
    return variants, x, torch.stack([rope1, rope1])


def measure(fn, x, rope) -> dict:
    torch._dynamo.reset()
    compiled = torch.compile(fn)
    with torch.no_grad():
        out, code = run_and_get_code(compiled, x, rope)
        eager = fn(x, rope)
        for _ in range(3):
            compiled(x, rope)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(20):
                compiled(x, rope)
        graph.replay()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        stop.record()
        torch.cuda.synchronize()
    outs, refs = (out, eager) if isinstance(out, tuple) else ((out,), (eager,))
    call = "\n".join(code)
    call = call[call.find("def call") :]
    return {
        "us": round(start.elapsed_time(stop) * 1000 / 200, 2),
        "triton_kernels": re.findall(r"(triton_\w+)\.run\(", call),
        "gemms": len(re.findall(r"extern_kernels\.(?:addmm|mm)\(", call)),
        "max_abs_vs_eager": max(float((a.float() - b.float()).abs().max()) for a, b in zip(outs, refs, strict=True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kv_first_front_end: needs a CUDA GPU")
    variants, x, rope = build("cuda")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": {}}
    for name, fn in variants.items():
        results["variants"][name] = measure(fn, x, rope)
        print(name, json.dumps(results["variants"][name]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
