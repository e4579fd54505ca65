"""Exponential moving average of the DiT weights, kept in float32.

Works the same on a plain, DDP-wrapped or FSDP2-sharded model: it holds one float32 tensor per parameter
with the parameter's own layout (a local shard, as a DTensor, under FSDP2), so it costs one extra fp32
copy of the weights spread over the processes. `full_state_dict` gathers it (a collective under FSDP2:
every process must call it).
"""

from __future__ import annotations

import torch
from torch import nn


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """shadow <- decay_t * shadow + (1 - decay_t) * param after every optimizer step, with
    decay_t = min(decay, (1 + t) / (10 + t)): early on the average follows the weights closely, so the
    EMA model is usable before 1 / (1 - decay) steps have passed."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        # Frozen parameters too (they simply stay put): the EMA state is then a complete model state dict.
        self.params = list(model.named_parameters())
        self.shadow = {name: p.detach().float().clone() for name, p in self.params}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Blend in the current weights; `step` is the number of optimizer steps taken before this one."""
        weight = 1 - self.decay_at(step)
        # One fused call for all tensors (on local shards under FSDP2): a small model's EMA is otherwise a
        # kernel launch per parameter. Same arithmetic as shadow.lerp_(param, weight) per tensor.
        shadows = [_local(self.shadow[name]) for name, _ in self.params]
        torch._foreach_lerp_(shadows, [_local(p.detach()).float() for _, p in self.params], weight)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """{parameter name: full float32 tensor on CPU}, as the model's own state-dict names."""
        return {name: _full(t).detach().cpu() for name, t in self.shadow.items()}

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        for name, p in self.params:
            full = state[name].to(device=p.device, dtype=torch.float32)
            if hasattr(p, "device_mesh"):  # FSDP2 DTensor: take this process's shard
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements)
            self.shadow[name].copy_(full)
