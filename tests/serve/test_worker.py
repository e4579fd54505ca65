"""The engine thread runs (and may compile) the models: it applies the pipeline's compiler settings itself."""

from __future__ import annotations

import torch

from flashhead.pipeline.speed import VAE_RECOMPILE_LIMIT, SpeedConfig
from flashhead.pipeline.stream import StreamEngine
from flashhead.serve.worker import EngineWorker


def test_engine_thread_has_the_pipelines_compiler_settings(tiny_lite):
    # torch >= 2.12 keeps Dynamo's settings per thread: set here only, the engine thread would not see them.
    tiny_lite.speed = SpeedConfig(compile_vae=True)  # the settings only (no compile here)
    worker = EngineWorker(StreamEngine(tiny_lite))
    worker.start()
    try:
        limit = worker.submit(lambda: torch._dynamo.config.recompile_limit).result(timeout=30)
    finally:
        worker.stop()
        tiny_lite.speed = SpeedConfig()
    assert limit >= VAE_RECOMPILE_LIMIT
