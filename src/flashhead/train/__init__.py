"""Stage-1 training of the FlashHead DiT: config, samples, losses, the loop, checkpoints, Wan2.1 init.

    from flashhead.train import Stage1Config, train
    result = train(Stage1Config.from_file("configs/stage1_tiny_cpu.yaml"))

See docs/training.md for the recipe and how to run it on one CPU, one GPU or many.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Imported on first use (PEP 562): `flashhead --help` and `flashhead train --help` need no torch or models.
_EXPORTS = {"Stage1Config": "config", "TrainResult": "trainer", "export_run": "trainer", "train": "trainer"}
__all__ = ["Stage1Config", "TrainResult", "export_run", "train"]

if TYPE_CHECKING:
    from flashhead.train.config import Stage1Config
    from flashhead.train.trainer import TrainResult, export_run, train


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
