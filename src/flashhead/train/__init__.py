"""Stage-1 training of the FlashHead DiT: config, samples, losses, the loop, checkpoints, Wan2.1 init.

    from flashhead.train import Stage1Config, train
    result = train(Stage1Config.from_file("configs/stage1_tiny_cpu.yaml"))

See docs/training.md for the recipe and how to run it on one CPU, one GPU or many.
"""

from flashhead.train.config import Stage1Config
from flashhead.train.trainer import TrainResult, export_run, train

__all__ = ["Stage1Config", "TrainResult", "export_run", "train"]
