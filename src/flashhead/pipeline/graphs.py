"""Replaying fixed-shape GPU work from CUDA graphs: one launch instead of one per kernel.

The chunk loop's denoising steps (`cuda_graphs`) and the VAE's decode and encode strips (`vae_cuda_graphs`) run the
same kernels on the same shapes every chunk. Launched kernel by kernel from Python, a compiled Wan decode costs the
host ~160 ms per Pro chunk (2 x H200 trace, session 15: ~2,900 launches of the per-frame strip steps) against
~110 ms on the GPU, so on two GPUs the host, not the GPU, set the pace. A captured graph is replayed by one call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import torch

log = logging.getLogger(__name__)

Output = torch.Tensor | tuple[torch.Tensor, ...]


class CapturedGraph:
    """`fn(*inputs)` captured once in a CUDA graph over static copies of `inputs`; `replay` runs it on new ones.

    Captured after two warm-up calls on a side stream (compilation, cuDNN plans and Triton autotuning must not
    happen under capture). The output is cloned at every replay, since the next replay overwrites it.
    """

    def __init__(self, fn: Callable[..., Output], inputs: list[torch.Tensor], pool=None) -> None:
        self.static = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*self.static)

    def replay(self, inputs: list[torch.Tensor]) -> Output:
        for static, new in zip(self.static, inputs, strict=True):
            static.copy_(new, non_blocking=True)
        self.graph.replay()
        if isinstance(self.output, torch.Tensor):
            return self.output.clone()
        return tuple(t.clone() for t in self.output)


def signature(tensors: list[torch.Tensor]) -> tuple:
    """What a captured graph is specific to: each input's shape, strides, dtype and device."""
    return tuple((tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)


class GraphedCall:
    """`fn(*tensors, *settings)`, replayed from one CUDA graph per input signature and settings.

    `settings` are hashable non-tensor arguments (e.g. a strip's row range) that select the graph. Falls back to
    calling `fn` directly for CPU tensors, for good (with a warning) for a signature whose capture failed, and for
    signatures beyond the first `max_graphs`: every graph keeps its static inputs and output (a Pro decode's
    output is ~50 MB per stream in the batch), so a server that sees many batch sizes keeps the ones it warmed up.
    """

    def __init__(self, fn: Callable[..., Output], name: str, max_graphs: int = 8) -> None:
        self.fn, self.name, self.max_graphs = fn, name, max_graphs
        self.graphs: dict[Hashable, CapturedGraph | None] = {}
        self._pool, self._said_full = None, False

    def __call__(self, *args) -> Output:
        count = next((i for i, a in enumerate(args) if not isinstance(a, torch.Tensor)), len(args))
        tensors, settings = list(args[:count]), args[count:]
        if any(isinstance(a, torch.Tensor) for a in settings):
            raise TypeError(f"{self.name}: pass the tensors first, then the settings")
        if not self._graphable(tensors):
            return self.fn(*args)
        key = (signature(tensors), settings)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                if not self._said_full:
                    log.info("%s: %d graphs kept; further shapes run eagerly", self.name, self.max_graphs)
                    self._said_full = True
                return self.fn(*args)
            self.graphs[key] = self._capture(tensors, settings)
        graph = self.graphs[key]
        if graph is None:
            return self.fn(*args)
        return graph.replay(tensors)

    @staticmethod
    def _graphable(tensors: list[torch.Tensor]) -> bool:
        return bool(tensors) and all(t.is_cuda for t in tensors)

    def _capture(self, tensors: list[torch.Tensor], settings: tuple) -> CapturedGraph | None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            return CapturedGraph(lambda *t: self.fn(*t, *settings), tensors, self._pool)
        except Exception as error:  # noqa: BLE001 - any capture failure leaves the eager path, which still works
            torch.cuda.synchronize()
            log.warning("%s: CUDA graph capture failed, running eagerly (%s)", self.name, str(error).splitlines()[0])
            return None

    def reset(self) -> None:
        self.graphs.clear()
        self._pool, self._said_full = None, False


def graphed(owner: object, name: str, fn: Callable[..., Output]) -> Callable[..., Output]:
    """`fn`, or the `GraphedCall` of it that `owner` keeps under `name` once `vae_cuda_graphs` gave it a store.

    `apply_vae_switches` gives a VAE its store (`_graphed_calls`, emptied whenever switches change) or None.
    """
    calls = getattr(owner, "_graphed_calls", None)
    if calls is None:
        return fn
    if name not in calls:
        calls[name] = GraphedCall(fn, f"{type(owner).__name__}.{name}")
    return calls[name]
