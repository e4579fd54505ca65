"""Cold start (flashhead.pipeline.warmup): warm-up rounds through the real engine, and torch.compile artefacts
carried from one process to a fresh one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from _util import REPO
from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline
from flashhead.pipeline.stream import StreamEngine
from flashhead.pipeline.warmup import default_cache_path, warm_batch_sizes, warm_up

PROBE = textwrap.dedent(
    """
    import json, sys
    from torch._dynamo.utils import counters
    from flashhead.pipeline.flashhead_pipeline import FlashHeadPipeline
    from flashhead.pipeline.warmup import load_compile_cache, save_compile_cache, warm_up

    mode, path = sys.argv[1], sys.argv[2]
    pipe = FlashHeadPipeline.from_pretrained("tiny", device="cpu").optimize("compile_color")
    loaded = load_compile_cache(path) if mode == "load" else False
    warm_up(pipe, [1])
    saved = save_compile_cache(path) if mode == "save" else 0
    print(json.dumps({"loaded": loaded, "saved": saved, "inductor": dict(counters["inductor"])}))
    """
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return FlashHeadPipeline.from_pretrained("tiny", device="cpu")


def test_warm_up_runs_two_rounds_per_batch_size_then_the_engine_serves(tiny):
    calls = []  # the batch size of every chunk generation
    original = tiny.generate_chunks
    tiny.generate_chunks = lambda references, *a, **k: calls.append(len(references)) or original(references, *a, **k)
    try:
        result = warm_up(tiny, [2, 1])
    finally:
        del tiny.generate_chunks
    assert sorted(result["seconds_by_batch"]) == [1, 2] and result["total_seconds"] > 0
    assert "gpu_memory_held_gib" not in result  # a GPU figure, on a GPU only
    assert calls == [1, 1, 2, 2]  # a first chunk and a later one at each batch size
    assert warm_batch_sizes(3) == [1, 2, 3]
    engine = StreamEngine(tiny, max_sessions=1, max_batch=1)  # a session after the warm-up is untouched by it
    session = engine.open_session(np.full((128, 128, 3), 90, np.uint8), seed=0)
    session.push_audio(np.zeros(3 * tiny.new_frames * 640, np.float32))
    chunks = engine.step()
    assert len(chunks) == 1 and chunks[0].frames.shape[1:] == (128, 128, 3)
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        warm_up(tiny, [0])


def test_a_served_session_after_the_warm_up_compiles_nothing(tiny):
    """With compiled switches, the warm-up runs what a server's engine will (its watermark included: compile_color
    compiles the marked frame conversion), so the first real session triggers no compile."""
    from torch._dynamo.utils import counters

    tiny.optimize("compile_color")
    try:
        warm_up(tiny, [1])
        graphs = counters["stats"]["unique_graphs"]
        engine = StreamEngine(tiny, max_sessions=1, max_batch=1, watermark=True)  # as flashhead.serve.app's
        session = engine.open_session(np.full((128, 128, 3), 70, np.uint8), seed=3)
        session.push_audio(np.random.default_rng(0).standard_normal(3 * tiny.new_frames * 640).astype(np.float32))
        while session.frames_emitted < 2 * tiny.new_frames:
            engine.step()
        assert counters["stats"]["unique_graphs"] == graphs > 0
    finally:
        tiny.optimize(None)


def test_cache_path_is_specific_to_the_switches(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    plain = default_cache_path(tiny)
    assert plain == default_cache_path(tiny) and plain.parent == tmp_path / "flashhead" / "compile"
    tiny.optimize("compile_color")
    try:
        assert default_cache_path(tiny) != plain
    finally:
        tiny.optimize(None)


@pytest.mark.slow  # two processes that compile on the CPU (~45 s)
def test_compile_artifacts_carry_over_to_a_fresh_process(tmp_path):
    artifacts = tmp_path / "compile.bin"

    def run(mode: str, inductor_dir: str) -> dict:
        # Each process gets an empty Inductor cache of its own: a hit in the second can only come from the file.
        path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / inductor_dir), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": path}  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", PROBE, mode, str(artifacts)], env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = run("save", "inductor-a")
    assert first["saved"] > 0 and artifacts.stat().st_size == first["saved"]
    assert first["inductor"].get("fxgraph_cache_miss", 0) >= 1  # it compiled
    second = run("load", "inductor-b")
    assert second["loaded"]
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1 and second["inductor"].get("fxgraph_cache_miss", 0) == 0


@pytest.mark.gpu
def test_warm_up_on_a_gpu_gives_the_allocators_free_blocks_back():
    """What warm-up leaves cached but unused (here a freed 512 MiB block) goes back to the device; the figure it
    reports is what the process still holds."""
    pipe = FlashHeadPipeline.from_pretrained("tiny", device="cuda")
    block = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    del block  # freed, still reserved by the caching allocator
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() >= 512 * 2**20
    result = warm_up(pipe, [1])
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() < 512 * 2**20
    assert result["gpu_memory_held_gib"] == round(torch.cuda.memory_reserved() / 2**30, 2)
