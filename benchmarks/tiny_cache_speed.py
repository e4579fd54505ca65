"""Stage-1 throughput of the flashhead-tiny recipe with and without the latent cache (same data, same steps).

    PYTHONPATH=src python benchmarks/tiny_cache_speed.py --data data/tiny/procedural --data data/tiny/portrait \
        --vae src/flashhead/assets/flashhead-tiny/vae --batch 4 --steps 20 --out runs/cache-speed

Runs the recipe's Stage-1 settings (`--set` overrides them, e.g. stage1.data.num_workers=1) twice for
`--steps` optimizer steps: decoding and encoding clips on the fly, then from a latent cache built once
(timed). Prints and writes OUT/cache_speed.json: steps/s of each (the median of the logged steps after
the first, so start-up is excluded), the cache build time and size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def stage1_config(args: argparse.Namespace, out: Path, cache: Path | None):
    from flashhead.train.config import Stage1Config, apply_override
    from flashhead.train.tiny import load_recipe

    s1 = load_recipe(overrides=args.set)["stage1"]
    for item in (
        f"data.roots={json.dumps(args.data)}", f"vae.path={args.vae}", f"data.micro_batch_size={args.batch}",
        f"optim.total_steps={args.steps}", "optim.max_minutes=null", "log.interval=1", "log.tensorboard=false",
        "log.checkpoint_interval=0", "export_at_end=false", f"output_dir={out}",
        f"data.cache={cache if cache else 'null'}",
    ):  # fmt: skip
        apply_override(s1, item)
    return Stage1Config.from_dict(s1)


def steps_per_second(run: Path) -> float:
    points = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return float(np.median([p["steps_per_s"] for p in points[1:]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True, help="a folder of clip shards (repeatable)")
    parser.add_argument("--vae", required=True, help="the VAE folder (e.g. the shipped model's)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("runs/cache-speed"))
    parser.add_argument("--set", action="append", default=[], help="a recipe override, e.g. stage1.data.num_workers=1")
    args = parser.parse_args()
    args.set = [s if s.startswith("stage1.") else f"stage1.{s}" for s in args.set]

    from flashhead.train.tiny import build_cache
    from flashhead.train.trainer import train

    if args.out.exists():
        shutil.rmtree(args.out)
    result = {"batch": args.batch, "steps": args.steps, "data": args.data}
    train(stage1_config(args, args.out / "on-the-fly", None))
    result["on_the_fly_steps_per_s"] = steps_per_second(args.out / "on-the-fly")

    start = time.perf_counter()
    cache = build_cache(stage1_config(args, args.out / "cached", None), args.out / "cache")
    result["cache_build_s"] = time.perf_counter() - start
    index = json.loads((cache / "cache.json").read_text())
    result |= {"cache_clips": len(index["clips"]), "cache_windows": index["windows"],
               "cache_references": index["references"],
               "cache_mb": sum(f.stat().st_size for f in cache.iterdir()) / 1e6}  # fmt: skip
    train(stage1_config(args, args.out / "cached", cache))
    result["cached_steps_per_s"] = steps_per_second(args.out / "cached")
    result["speedup"] = result["cached_steps_per_s"] / result["on_the_fly_steps_per_s"]
    (args.out / "cache_speed.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
