"""`--sp N`: run the current command line in N torchrun processes, or join them when already one of them."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from flashhead.errors import ConfigError
from flashhead.parallel.group import SequenceParallelGroup, init_sequence_parallel


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(nproc: int, device: str | None) -> int:
    """Start `python -m torch.distributed.run --nproc-per-node N -m flashhead.cli <same arguments>`; its exit code."""
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda and torch.cuda.device_count() < nproc:
        raise ConfigError(f"--sp {nproc} needs {nproc} GPUs; {torch.cuda.device_count()} visible")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "flashhead.cli", *sys.argv[1:]]  # fmt: skip
    return subprocess.run(cmd, check=False).returncode


def join(sp: int | None, device: str | None) -> SequenceParallelGroup | None:
    """The sequence-parallel group of this torchrun process (None outside torchrun or with one process)."""
    if sp is not None and sp < 1:
        raise ConfigError(f"--sp must be at least 1, got {sp}")
    if not under_torchrun():
        return None
    group = init_sequence_parallel(expected=sp, device=device)
    return group if group.world_size > 1 else None
