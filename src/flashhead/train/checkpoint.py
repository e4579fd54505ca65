"""Training checkpoints: one file per saved step, written atomically, plus a `latest` pointer.

    RUN/checkpoints/step-00001000.pt   {"step", "model", "ema", "optimizer", "scheduler", "data", "rng", ...}
    RUN/checkpoints/latest             "step-00001000.pt"

A checkpoint is first written as `<name>.tmp` and renamed into place, then `latest` is replaced the same
way, so a crash at any moment leaves either the old or the new checkpoint fully readable.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashhead.atomic import atomic_path
from flashhead.errors import CheckpointError

LATEST = "latest"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 0) -> Path:
    """Write `state` as checkpoints/step-XXXXXXXX.pt, point `latest` at it, keep the newest `keep` (0: all)."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    with atomic_path(folder / LATEST) as tmp:
        tmp.write_text(path.name + "\n")
    if keep > 0:
        for old in sorted(folder.glob("step-*.pt"))[:-keep]:
            old.unlink()
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` points to, or None when the run has none yet."""
    pointer = checkpoint_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_file():
        raise CheckpointError(f"{pointer} points to {path.name}, which does not exist")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        # not weights_only: the numpy and python RNG states are plain pickles. Open only your own runs.
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # a truncated or foreign file: one line for the user
        raise CheckpointError(f"{path}: not a readable training checkpoint ({e})") from e


def rng_state() -> dict[str, Any]:
    """This process's random states: python, numpy, torch CPU and (if present) CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
