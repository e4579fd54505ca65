"""Where the per-input work runs: in this process, a local process pool, or a Ray cluster (Ray Data).

Every executor yields results as they finish, in any order; the driver persists each one at once, so
a killed run keeps everything finished before the kill.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
from collections.abc import Callable, Iterator
from typing import Any

from flashhead.data.curate.process import worker_setup
from flashhead.errors import ConfigError

log = logging.getLogger(__name__)


def _call(job: tuple[Callable, tuple]) -> Any:
    fn, args = job
    return fn(*args)


@contextlib.contextmanager
def _single_threaded():
    import av.logging
    import cv2
    import torch

    before = torch.get_num_threads(), cv2.getNumThreads(), av.logging.get_level()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    av.logging.set_level(av.logging.ERROR)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])
        av.logging.set_level(before[2])


def local_map(fn: Callable, jobs: list[tuple], workers: int) -> Iterator[Any]:
    """fn(*job) for every job: here when workers <= 1, else in a pool of spawned processes."""
    if not jobs:
        return
    if workers <= 1:
        with _single_threaded():
            for job in jobs:
                yield fn(*job)
        return
    # spawn: MediaPipe graphs and torch thread pools must not be forked mid-use
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=worker_setup) as pool:
        yield from pool.imap_unordered(_call, [(fn, job) for job in jobs], chunksize=1)


def _ray_row(row: dict[str, Any]) -> dict[str, Any]:
    worker_setup()
    fn, job = pickle.loads(row["job"])
    return {"result": pickle.dumps(fn(*job))}


@contextlib.contextmanager
def ray_session(address: str, workers: int):
    """Connect to the Ray cluster at `address` ("local" starts one on this machine with `workers` CPUs)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray Data: pip install 'flashhead[data]'") from None
    if ray.is_initialized():
        yield ray
        return
    local = address == "local"
    try:
        ray.init(
            address=None if local else address,
            num_cpus=workers if local else None,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield ray
    finally:
        ray.shutdown()


def ray_map(fn: Callable, jobs: list[tuple]) -> Iterator[Any]:
    """fn(*job) for every job as Ray Data tasks (one CPU each) of the connected cluster. The package must
    be importable on every node; results travel back through the object store, so no shared disk is needed."""
    import ray

    if not jobs:
        return
    rows = [{"job": pickle.dumps((fn, job))} for job in jobs]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map(_ray_row, num_cpus=1)
    for row in dataset.iter_rows():
        yield pickle.loads(row["result"])
