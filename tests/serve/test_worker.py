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


def test_a_session_is_ready_only_once_the_gpu_has_encoded_its_portrait(tiny_lite):
    """open_session only queues the portrait's encode; the server says `ready` once the event recorded after it has
    completed (here a stand-in for the CUDA event: this machine has no GPU), without blocking the event loop."""
    import asyncio

    import numpy as np

    engine = StreamEngine(tiny_lite)
    portrait = np.zeros((tiny_lite.config.height, tiny_lite.config.width, 3), np.uint8)
    session = engine.open_session(portrait)
    assert session.reference_encoded is None and session.reference_ready()  # CPU: the encode has run

    class Encoding:  # completes at its third query, as a CUDA event whose work is still on the GPU would later
        queries = 0

        def query(self) -> bool:
            self.queries += 1
            return self.queries >= 3

    session.reference_encoded = Encoding()
    ticks = []

    async def main() -> None:
        async def beside() -> None:  # the loop keeps serving others while it waits
            for _ in range(3):
                ticks.append(session.reference_encoded.queries)
                await asyncio.sleep(0)

        await asyncio.gather(EngineWorker.reference_encoded(session, poll_seconds=0.001), beside())

    asyncio.run(main())
    assert session.reference_encoded.queries == 3 and session.reference_ready() and ticks[0] < 3
