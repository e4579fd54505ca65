"""Run under `torchrun --nproc-per-node N` by the sequence-parallel tests: each case saves this rank's results.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/parallel/_sp_worker.py OUT_DIR CASE...

Inputs are drawn from fixed seeds, so the test process rebuilds them and computes the single-process
reference itself. `torchrun` is how the tests start this script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for _tiny / _util

from flashhead.parallel import init_sequence_parallel, partition_tokens  # noqa: E402
from flashhead.parallel.attention import (  # noqa: E402
    overlap_in_compiled_graphs,
    ring_attention,
    ulysses_attention,
)


def torchrun(out: Path, *cases: str, nproc: int = 2) -> list[dict]:
    """Run `cases` in `nproc` gloo processes; each rank's results."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{repo / 'src'}{os.pathsep}{repo / 'tests'}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           __file__, str(out), *cases]  # fmt: skip
    # One retry: in a long suite the standalone rendezvous has (rarely) failed to start on a busy 2-core
    # machine; a real error fails both attempts, and the first attempt's error is printed either way.
    for attempt in (1, 2):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        if proc.returncode == 0:
            break
        print(f"torchrun attempt {attempt} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc)]


def attention_inputs(heads: int, length: int = 37, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, length, heads, 16, generator=g) for _ in range(3)]


HEAD_GROUPS = (1, 2, 3, 6)


def compiled_order(code: str, matmuls: bool = False) -> list[str]:
    """The collectives and attention kernels of Inductor's generated code, in call order: launch / wait / attend
    (and, with `matmuls`, "matmul" for every extern GEMM, e.g. the projections)."""
    events = []
    for line in code.splitlines():
        if line.lstrip().startswith("#"):
            continue
        # all_reduce_ works in place: its line has no assignment
        launches = ("= torch.ops._c10d_functional.all_to_all_single", "= torch.ops._c10d_functional.all_gather",
                    "torch.ops._c10d_functional.all_reduce_")  # fmt: skip
        if any(op in line for op in launches):
            events.append("launch")
        elif "torch.ops._c10d_functional.wait_tensor" in line:
            events.append("wait")
        elif "= torch.ops.aten._scaled_dot_product" in line:
            events.append("attend")
        elif matmuls and any(f"extern_kernels.{op}(" in line for op in ("addmm", "mm", "bmm")):
            events.append("matmul")
    return events


def send_buffers(code: str) -> list[str]:
    """The buffer each all-to-all of Inductor's generated code sends from (a view's base buffer, or the buffer)."""
    import re

    launch = r"= torch\.ops\._c10d_functional\.all_to_all_single\.default\((?:reinterpret_tensor\()?(\w+)"
    return re.findall(launch, code)


def attention_query_buffers(code: str) -> list[str]:
    """The buffer each attention kernel of Inductor's generated code reads its queries from (a view's base buffer)."""
    import re

    call = r"= torch\.ops\.aten\._scaled_dot_product_\w+\.default\((?:reinterpret_tensor\()?(\w+)"
    return re.findall(call, code)


def launch_sizes(code: str) -> list[list[int]]:
    """The input split sizes of each all-to-all of Inductor's generated code, in call order."""
    import re

    pattern = r"all_to_all_single\.default\(.*?\[[\d, ]*\], \[([\d, ]*)\]"
    return [[int(v) for v in m.split(",")] for m in re.findall(pattern, code)]


def fused_key_value(dit, plain_weights: dict) -> torch.Tensor:
    """Per block: (k's weight in a fused k / v tensor, v's weight in it, k / v weights equal to `plain_weights`,
    the block's state-dict names unchanged)."""
    rows = []
    for i, block in enumerate(dit.blocks):
        a = block.self_attn
        fused = getattr(a, "kv_weight", None)
        in_fused = [fused is not None and w.data_ptr() == fused.data_ptr() + off * fused.element_size()
                    for w, off in ((a.k.weight, 0), (a.v.weight, a.k.weight.numel()))]  # fmt: skip
        names = {k for k in dit.state_dict() if k.startswith(f"blocks.{i}.")}
        same = all(torch.equal(dit.state_dict()[k], plain_weights[k]) for k in names)
        rows.append(in_fused + [same, names == {k for k in plain_weights if k.startswith(f"blocks.{i}.")}])
    return torch.tensor(rows)


def tiny_random_dit(heads: int):
    from flashhead.models import FlashHeadDiT

    torch.manual_seed(0)
    cfg = dict(dim=16 * heads, in_dim=8, out_dim=4, ffn_dim=64, freq_dim=32, text_dim=8, num_heads=heads, num_layers=2,
               vae_stride=(4, 8, 8), patch_size=(1, 2, 2), audio_layers=2, audio_channels=8,
               audio_intermediate_dim=16, audio_tokens=4)  # fmt: skip
    return FlashHeadDiT.from_config(cfg).eval()


def dit_inputs(dit, frames: int = 3, size: int = 8, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    c = dit.config
    x = torch.randn(batch, c.out_dim, frames, size, size, generator=g)
    y = torch.randn(batch, c.out_dim, frames, size, size, generator=g)
    context = torch.randn(batch, 1 + c.vae_stride[0] * (frames - 1), c.audio_window, c.audio_layers,
                          c.audio_channels, generator=g)  # fmt: skip
    return x, torch.tensor([900.0, 300.0][:batch]), context, y


def assert_module_split_matches_one_process(ranks: list[dict], case: str) -> None:
    """A dit-<method>[-uneven|-compiled] case of a split that runs whole self-attention modules (4 heads, 2 ranks):
    every rank's output equals the one-process DiT, its blocks ran the split's module class, and after
    uninstall() the plain one-process forward runs again."""
    dit = tiny_random_dit(4)
    inputs = dit_inputs(dit, size=6) if case.endswith("uneven") else dit_inputs(dit)
    with torch.no_grad():
        expected = dit(*inputs)
    for r in ranks:
        torch.testing.assert_close(r[case], expected, rtol=0, atol=1e-5)
        assert r[f"{case}.classes"].all()
        torch.testing.assert_close(r[f"{case}.uninstalled"], expected, rtol=0, atol=1e-6)


def split_decode_latent():
    return torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def split_encode_video():
    """5 frames of 80 x 16 pixels: 10 latent rows, so 2 ranks get 5 each (strips narrower than their margins)."""
    return torch.rand(1, 3, 5, 80, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1


def pipeline_run(pipe, speed: str | None):
    """Two chunks (the first, then one with motion frames) and a short whole video, fixed seeds."""
    import numpy as np

    from flashhead.pipeline.flashhead_pipeline import reference_generator

    if speed:
        pipe.optimize(speed)
    cfg = pipe.config
    image = np.random.default_rng(0).integers(0, 256, (cfg.height, cfg.width, 3), dtype=np.uint8)
    ref = pipe.encode_reference(image, generator=reference_generator(0))
    g = torch.Generator().manual_seed(3)
    d = pipe.dit.config
    context = torch.randn(1, cfg.frame_num, d.audio_window, d.audio_layers, d.audio_channels, generator=g)
    a = pipe.generate_chunk(ref, ref.first_motion, context, generator=torch.Generator().manual_seed(4))
    b = pipe.generate_chunk(ref, a.motion_latents, context, generator=torch.Generator().manual_seed(5))
    wave = (0.3 * np.sin(np.arange(int(16000 * 1.2)) * 2 * np.pi * 150 / 16000)).astype(np.float32)
    out = pipe(image, wave, sample_rate=16000, seed=7, progress=False, watermark=False)
    return {"a_latents": a.latents, "a_video": a.video, "a_motion": a.motion_latents, "b_latents": b.latents,
            "b_video": b.video, "frames": torch.from_numpy(out.frames)}  # fmt: skip


def stream_run(pipe, speed: str | None):
    """Two sessions of different lengths through the streaming engine, batched: each one's frames."""
    import numpy as np

    from flashhead.pipeline.stream import StreamEngine

    if speed:
        pipe.optimize(speed)
    cfg = pipe.config
    engine = StreamEngine(pipe, max_batch=2)
    out = {}
    sessions = []
    for i, seconds in enumerate((2.3, 1.1)):
        image = np.random.default_rng(i).integers(0, 256, (cfg.height, cfg.width, 3), dtype=np.uint8)
        s = engine.open_session(image, seed=i)
        tone = np.sin(np.arange(int(16000 * seconds)) * 2 * np.pi * (150 + 40 * i) / 16000)
        s.push_audio((0.3 * tone).astype(np.float32))
        s.end()
        sessions.append(s)
    chunks, flights = [], []
    while (produced := engine.step()) or engine.in_flight:
        chunks += produced
        flights.append(engine.in_flight)
    for i, s in enumerate(sessions):
        out[f"frames{i}"] = torch.from_numpy(np.concatenate([c.frames for c in chunks if c.session_id == s.id]))
    out["in_flight"] = torch.tensor(flights)
    return out


def main(out: Path, cases: list[str]) -> None:
    group = init_sequence_parallel()
    rank, n = group.rank, group.world_size
    results: dict[str, torch.Tensor] = {}
    for case in cases:
        if case in ("ulysses", "ring"):
            heads = 2 * n if case == "ulysses" else 3
            q, k, v = attention_inputs(heads)
            part = partition_tokens(1, q.shape[1], n)  # one "frame": uneven token shards
            a, b = part.bounds(rank)
            fn = ulysses_attention if case == "ulysses" else ring_attention
            results[case] = fn(q[:, a:b], k[:, a:b], v[:, a:b], part.sizes, rank)
        elif case == "kv_gather":  # 3 heads (Ulysses could not split them), uneven shards
            from flashhead.parallel.attention import kv_gather_attention

            q, k, v = attention_inputs(3)
            part = partition_tokens(1, q.shape[1], n)
            a, b = part.bounds(rank)
            results[case] = kv_gather_attention(q[:, a:b], k[:, a:b], v[:, a:b], part.sizes, rank)
        elif case == "kv_gather-inductor":  # compiled; where Inductor puts the gather's launch and wait
            from torch._inductor.utils import run_and_get_code

            from flashhead.parallel.attention import kv_gather_attention

            q, k, v = attention_inputs(3)
            part = partition_tokens(1, q.shape[1], n)
            a, b = part.bounds(rank)
            fn = torch.compile(partial(kv_gather_attention, sizes=part.sizes, rank=rank))
            with overlap_in_compiled_graphs():
                got, code = run_and_get_code(fn, q[:, a:b], k[:, a:b], v[:, a:b])
            results[case] = got
            results[f"{case}.order"] = compiled_order("\n".join(code))
        elif case == "dit-kv_gather":  # the whole DiT forward with the KV-gather attention, eager
            from flashhead.parallel.dit import SequenceParallelDiT

            dit = tiny_random_dit(3)
            with torch.no_grad():
                results[case] = SequenceParallelDiT(dit, group, method="kv_gather")(*dit_inputs(dit))
        elif case.startswith(("dit-x_gather", "dit-ulysses_kv_first")):  # dit-<method>[-uneven|-compiled]: the splits
            from torch._inductor.utils import run_and_get_code  # that run whole modules; 4 heads, 2 groups, 2 ranks

            from flashhead.parallel.dit import MODULE_CLASSES, SequenceParallelDiT

            method = case.split("-")[1]
            dit = tiny_random_dit(2 * n)
            inputs = dit_inputs(dit, size=6) if case.endswith("uneven") else dit_inputs(dit)  # 27 or 48 tokens
            plain_weights = {k: v.clone() for k, v in dit.state_dict().items()}
            sp = SequenceParallelDiT(dit, group, method=method)
            if method == "ulysses_kv_first":
                results[f"{case}.fused"] = fused_key_value(dit, plain_weights)
            with torch.no_grad():
                if case.endswith("compiled"):
                    for block in dit.blocks:
                        block.compile()
                    results[case], code = run_and_get_code(sp, *inputs)
                    results[f"{case}.order"] = compiled_order(code[0], matmuls=True)  # the first block's graph
                    results[f"{case}.launch_sizes"] = launch_sizes(code[0])
                    results[f"{case}.send_buffers"] = send_buffers(code[0])
                    results[f"{case}.query_buffers"] = attention_query_buffers(code[0])
                else:
                    results[case] = sp(*inputs)
            results[f"{case}.classes"] = torch.tensor([type(b.self_attn) is MODULE_CLASSES[method] for b in dit.blocks])
            sp.uninstall()  # the plain single-process DiT again (sp_bench times one GPU after the split)
            if method == "ulysses_kv_first":
                results[f"{case}.unfused"] = fused_key_value(dit, plain_weights)
            with torch.no_grad():
                results[f"{case}.uninstalled"] = dit(*inputs)
            if method == "ulysses_kv_first":  # the plain Ulysses split of the same inputs, for bit-for-bit equality
                with torch.no_grad():
                    results[f"{case}.ulysses"] = SequenceParallelDiT(dit, group, method="ulysses")(*inputs)
        elif case == "ulysses-groups":  # 6 heads per rank: every head-group count that divides them
            q, k, v = attention_inputs(6 * n)
            part = partition_tokens(1, q.shape[1], n)
            a, b = part.bounds(rank)
            for groups in HEAD_GROUPS:
                results[f"{case}.{groups}"] = ulysses_attention(
                    q[:, a:b], k[:, a:b], v[:, a:b], part.sizes, rank, head_groups=groups
                )
        elif case == "ulysses-inductor":  # compiled by Inductor; the order of launches, waits and kernels
            from torch._inductor.utils import run_and_get_code

            q, k, v = attention_inputs(6 * n)
            part = partition_tokens(1, q.shape[1], n)
            a, b = part.bounds(rank)
            for groups in (1, 3):
                fn = torch.compile(partial(ulysses_attention, sizes=part.sizes, rank=rank, head_groups=groups))
                with overlap_in_compiled_graphs():
                    got, code = run_and_get_code(fn, q[:, a:b], k[:, a:b], v[:, a:b])
                results[f"{case}.{groups}"] = got
                results[f"{case}.{groups}.order"] = compiled_order("\n".join(code))
        elif case == "ulysses-own-first":  # the first group's own block attended while in flight; eager, compiled
            from torch._inductor.utils import run_and_get_code

            q, k, v = attention_inputs(6 * n)
            part = partition_tokens(1, q.shape[1], n)
            a, b = part.bounds(rank)
            for groups in (2, 3):
                fn = partial(ulysses_attention, sizes=part.sizes, rank=rank, head_groups=groups, own_first=True)
                results[f"{case}.{groups}"] = fn(q[:, a:b], k[:, a:b], v[:, a:b])
            with overlap_in_compiled_graphs():
                got, code = run_and_get_code(torch.compile(fn), q[:, a:b], k[:, a:b], v[:, a:b])
            results[f"{case}.compiled"] = got
            results[f"{case}.order"] = compiled_order("\n".join(code))
        elif case == "dit-compiled":  # the pipeline's compile_dit: each block compiled by Inductor
            from torch._inductor.utils import run_and_get_code

            from flashhead.parallel.dit import SequenceParallelDiT

            dit = tiny_random_dit(2 * n)
            for block in dit.blocks:
                block.compile()
            with torch.no_grad():
                sp = SequenceParallelDiT(dit, group, head_groups=2, method="ulysses")
                results[case], code = run_and_get_code(sp, *dit_inputs(dit))
            results[f"{case}.order"] = compiled_order(code[0])  # the first block's graph
            results[f"{case}.sends"] = send_buffers(code[0])
        elif case.startswith("dit"):  # dit-<heads>
            from flashhead.parallel.dit import SequenceParallelDiT

            dit = tiny_random_dit(int(case.split("-")[1]))
            with torch.no_grad():
                results[case] = SequenceParallelDiT(dit, group)(*dit_inputs(dit))
        elif case == "decode":
            from _tiny import tiny_vae
            from flashhead.parallel.vae import split_decode

            results[case] = split_decode(tiny_vae("pro"), split_decode_latent(), group)
        elif case == "encode":
            from _tiny import tiny_vae
            from flashhead.parallel.vae import split_encode

            results[case] = split_encode(tiny_vae("pro"), split_encode_video(), group)
        elif case.startswith("stream"):  # stream-<speed>: the streaming engine on the leader
            from _tiny import tiny_pipeline

            pipe = tiny_pipeline("pro")[0].parallelize(group, force=True)
            speed = case.partition("-")[2].replace("+", ",")
            if group.is_leader:
                calls: list[int] = []  # latent frames per decoder call (the strip decoder's mid block sees them all)
                mid = pipe.vae.model.decoder.mid_block
                hook = mid.register_forward_pre_hook(lambda _m, args, calls=calls: calls.append(args[0].shape[2]))
                try:
                    got = stream_run(pipe, speed)
                finally:
                    hook.remove()
                    pipe.release_followers()
                results.update({f"{case}.{k}": v for k, v in got.items()})
                results[f"{case}.decoder_call_frames"] = torch.tensor(calls)
            else:
                pipe.optimize(speed)
                pipe.follow()
        elif case.startswith("pipeline"):  # pipeline-<speed or plain>; pipeline_kv-, pipeline_xg-: other splits
            from _tiny import tiny_pipeline

            attention = {"pipeline_kv": "kv_gather", "pipeline_xg": "x_gather"}.get(case.partition("-")[0])
            pipe = tiny_pipeline("pro")[0].parallelize(group, force=True, attention=attention)  # tiny: few tokens
            speed = case.partition("-")[2]
            if group.is_leader:
                try:
                    got = pipeline_run(pipe, None if speed == "plain" else speed.replace("+", ","))
                finally:
                    pipe.release_followers()
                results.update({f"{case}.{k}": v for k, v in got.items()})
            else:
                if speed != "plain":
                    pipe.optimize(speed.replace("+", ","))
                colored, color = [], pipe._sp.color
                pipe._sp.color = lambda video, *args, log=colored, color=color: log.append(video.shape[2]) or color(
                    video, *args
                )
                pipe.follow()
                # the follower took part in the motion re-encodes (its strip encoder exists only then)
                results[f"{case}.follower_encoded"] = torch.tensor(hasattr(pipe.vae, "_strip_encoder"))
                results[f"{case}.follower_colored"] = torch.tensor(colored)  # per chunk it colour-corrected: its frames
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
