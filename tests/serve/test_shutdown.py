"""Graceful shutdown: SIGTERM ends live sessions cleanly (final chunk + `done`), then the server exits 0."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import textwrap

import httpx
import numpy as np
from PIL import Image

from _util import REPO

from ._serving import free_port, speech, stream_audio, wait_for_health

SERVER = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{tests!r}]
    from _tiny import tiny_pipeline
    from flashhead.serve.app import create_app
    from flashhead.serve.cli import run_server
    from flashhead.serve.limits import ServeLimits

    pipe, _, _ = tiny_pipeline("lite")
    limits = ServeLimits(shutdown_grace_seconds=20)
    run_server(create_app(pipe, limits=limits), "127.0.0.1", {port}, limits=limits, log_level="warning")
    """
)


def test_sigterm_drains_live_sessions_then_exits(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(tests=str(REPO / "tests"), port=port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        wait_for_health(process, url, timeout=90)
        pixels = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, "PNG")
        portrait = httpx.post(url + "/v1/portraits", files={"file": ("p.png", png.getvalue())}, data={"crop": "false"})
        portrait_id = portrait.json()["id"]

        async def run():
            client = asyncio.create_task(
                stream_audio(f"ws://127.0.0.1:{port}", speech(20.0), start={"portrait_id": portrait_id}, timeout=60)
            )
            await asyncio.sleep(2.5)  # mid-stream
            os.kill(process.pid, signal.SIGTERM)
            return await client

        result = asyncio.run(run())
        code = process.wait(timeout=30)
        output = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert result.done is not None, (result.errors, output)
    assert result.done["reason"] == "shutdown" and not result.errors and result.close_code == 1000
    assert result.chunks[-1]["final"] and result.done["frames"] == result.frames > 0
    assert result.audio_samples == result.frames * 640
    assert code == 0, output
    assert "draining live sessions" in output
