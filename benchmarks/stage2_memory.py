"""Peak memory of one Stage-2 (distillation) step of the full-size model on one device.

    python benchmarks/stage2_memory.py                       # Lite at 512x512 on the GPU (random weights, bf16)
    python benchmarks/stage2_memory.py --variant pro
    python benchmarks/stage2_memory.py --tiny --device cpu   # the same code path on tiny networks (CI)

It builds what `flashhead train stage2` builds (teacher in bf16, student and fake score in float32 under
bf16 autocast, the VAE of the variant in bf16, AdamW for both trained networks, gradient checkpointing as
configured) with random weights, feeds random K-chunk inputs of the real shapes and runs the trainer's own
`iteration` for `--steps` iterations: the first generator step allocates the Adam states, so the peak of the
second one (iteration critic_ratio) is the steady state. The audio encoder is skipped (its features are
random inputs; wav2vec2-base is 95 M parameters in float32 and runs outside the graph). Prints and writes
JSON: peak allocated / reserved per iteration kind, the resident state, and the analytic plan of
docs/distillation.md for comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from flashhead.models.dit import FlashHeadDiT, official_config  # noqa: E402
from flashhead.train.config import Stage1Config, Stage2Config  # noqa: E402
from flashhead.train.rollout_data import RolloutInputs, RolloutSpec  # noqa: E402
from flashhead.train.stage2 import assemble, chunk_spec, iteration, trainable_copy  # noqa: E402
from flashhead.train.trainer import DistInfo  # noqa: E402

GiB = 2**30


def random_vae(kind: str, tiny_config: dict | None):
    """The variant's VAE with random (seeded) weights: official architecture, or the tiny config's."""
    torch.manual_seed(1)
    if kind == "ltx":
        from diffusers import AutoencoderKLLTXVideo

        from flashhead.models.vae import LTXVideoVAE
        from flashhead.models.vae.ltx import LTX_VIDEO_090_VAE_CONFIG, ltx_native_config_to_diffusers

        if tiny_config is not None:
            return LTXVideoVAE(AutoencoderKLLTXVideo.from_config(ltx_native_config_to_diffusers(tiny_config)))
        config = {k: v for k, v in LTX_VIDEO_090_VAE_CONFIG.items() if not k.startswith("_")}
        return LTXVideoVAE(AutoencoderKLLTXVideo.from_config(config))
    from diffusers import AutoencoderKLWan

    from flashhead.models.vae import WanVideoVAE
    from flashhead.models.vae.wan import wan_config_to_diffusers

    return WanVideoVAE(AutoencoderKLWan(**wan_config_to_diffusers(tiny_config)))


def memory_plan(params: int, gpus: int, fsdp: bool) -> dict[str, float]:
    """GiB per GPU of the resident training state (see docs/distillation.md), without activations."""
    shard = gpus if fsdp else 1
    trained = params * (4 + 4 + 8) / shard  # fp32 weights, fp32 grads, Adam m and v: per trained network
    return {
        "student (weights+grads+Adam)": trained / GiB,
        "fake score (weights+grads+Adam)": trained / GiB,
        "student EMA (fp32)": params * 4 / shard / GiB,
        "teacher (bf16)": params * 2 / shard / GiB,
        "total state": (2 * trained + params * 6 / shard) / GiB,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=["lite", "pro"], default="lite")
    ap.add_argument("--config", default=str(REPO / "configs" / "stage2_lite.yaml"), help="Stage-2 settings")
    ap.add_argument("--tiny", action="store_true", help="tiny networks of configs/stage1_tiny_cpu.yaml")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=None, help="frame size (default: the config's, 512)")
    ap.add_argument("--steps", type=int, default=None, help="iterations (default: critic_ratio + 1)")
    ap.add_argument("--no-checkpointing", action="store_true", help="turn gradient checkpointing off")
    ap.add_argument("--set", action="append", default=[], help="Stage-2 config override (repeatable)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)

    overrides = [*args.set, "parallel=ddp"]  # one process: nothing to wrap
    if args.no_checkpointing:
        overrides.append("teacher.gradient_checkpointing=false")
    if args.size:
        overrides += [f"data.height={args.size}", f"data.width={args.size}"]
    cfg = Stage2Config.from_file(args.config, overrides)
    device = torch.device(args.device)
    if args.tiny:
        tiny = Stage1Config.from_file(REPO / "configs" / "stage1_tiny_cpu.yaml")
        dit_config, vae_kind, vae_config = tiny.model.config, tiny.vae.kind, tiny.vae.config
    else:
        dit_config, vae_kind, vae_config = (
            official_config(args.variant),
            "ltx" if args.variant == "lite" else "wan",
            None,
        )

    torch.manual_seed(0)
    teacher = FlashHeadDiT.from_config(dit_config)
    params = sum(p.numel() for p in teacher.parameters())
    student, critic = trainable_copy(teacher), trainable_copy(teacher)
    vae = random_vae(vae_kind, vae_config)
    bf16 = device.type == "cuda" and cfg.precision != "fp32"
    vae.requires_grad_(False).to(device, torch.bfloat16 if bf16 else torch.float32)
    spec = RolloutSpec(chunk_spec(cfg, teacher, vae), cfg.distill.num_chunks)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    parts = assemble(cfg, DistInfo(device=device), teacher, student, critic, vae, spec)

    c = spec.chunk
    shape = (1, *vae.latent_shape(c.frame_num, c.height, c.width))
    inputs = RolloutInputs(
        video=torch.randint(0, 256, (1, spec.frames, c.height, c.width, 3), dtype=torch.uint8),
        y=torch.randn(shape, device=device),
        ref_image=torch.rand(1, 3, 1, c.height, c.width, device=device) * 2 - 1,
        contexts=torch.randn(1, spec.num_chunks, c.frame_num, dit_config.get("audio_window", 5),
                             dit_config.get("audio_layers", 12), dit_config.get("audio_channels", 768), device=device),
        seeds=[0],
    )  # fmt: skip

    def allocated() -> float:
        return torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else float("nan")

    state_before = allocated()
    steps = args.steps or cfg.distill.critic_ratio + 1
    rows = []
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out = iteration(parts, inputs, step, cfg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row = {
            "step": step, "generator_step": "dmd" in out, "k": out["k"], "exit_step": out["exit_step"],
            "seconds": time.perf_counter() - t0, "resident_gib": allocated(),
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB if device.type == "cuda" else None,
            "finite": all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in out.values()),
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    gen = [r for r in rows if r["generator_step"]]
    result = {
        "variant": "tiny" if args.tiny else args.variant, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "parameters_per_network": params, "size": c.height, "num_chunks": spec.num_chunks,
        "tokens_per_chunk": shape[2] * shape[3] * shape[4] // (dit_config.get("patch_size", [1, 1, 1])[1] ** 2),
        "gradient_checkpointing": cfg.teacher.gradient_checkpointing, "bf16": bf16,
        "state_before_first_step_gib": state_before,
        "peak_generator_step_gib": max((r["peak_allocated_gib"] or 0) for r in gen) if gen else None,
        "peak_critic_step_gib": max((r["peak_allocated_gib"] or 0) for r in rows if not r["generator_step"]),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB,
        "plan_1_gpu": memory_plan(params, 1, fsdp=False), "plan_8_gpu_fsdp": memory_plan(params, 8, fsdp=True),
        "iterations": rows,
    }  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "iterations"}, indent=2))
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.out)
    return result


if __name__ == "__main__":
    main()
