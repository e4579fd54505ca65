"""The FlashHead DiT forward with the chunk's token sequence split across ranks.

After patchify every rank keeps its own shard of the tokens (see `partition_tokens`) and runs all blocks
on it: adaLN, norms, FFN and the head are per token; self-attention goes through
`SequenceParallelAttention` (Ulysses or ring); cross-attention stays local because every shard is made
of segments that lie inside one latent frame, and each segment is given its frame's audio tokens. The
shards' head outputs are gathered before unpatchify, so every rank returns the whole velocity.

The blocks themselves are unchanged (their compiled graphs are reused); only the self-attention kernel is
swapped, by `install`, which must run again after anything that resets the kernels (`pipe.optimize`). The
X-gather split also splits the q / k / v projections, and `ulysses_kv_first` orders them around its transfers, so
these swap the class of the self-attention modules (same weights, another forward); X gather also gives them the
RoPE rows of the whole sequence.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from flashhead.errors import ConfigError
from flashhead.models.dit import FlashHeadDiT, SelfAttention
from flashhead.parallel.attention import (
    SequenceParallelAttention,
    kv_first_self_attention,
    overlap_in_compiled_graphs,
    x_gather_self_attention,
)
from flashhead.parallel.group import SequenceParallelGroup, TokenPartition, partition_tokens


class GatheredSelfAttention(SelfAttention):
    """A DiT self-attention module run by the X-gather split (its `kernel` is the SequenceParallelAttention)."""

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return x_gather_self_attention(self, x, rope, self.kernel)


class KVFirstSelfAttention(SelfAttention):
    """A DiT self-attention module run by Ulysses with k / v sent before q is projected (`ulysses_kv_first`)."""

    kv_weight: torch.Tensor | None = None
    kv_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        return kv_first_self_attention(self, x, rope, self.kernel)

    def fuse_key_value(self) -> None:
        """Keep k's and v's weights in one (2D, D) tensor, k's and v's parameters becoming views of its halves, so
        both are projected by one GEMM with no second copy of the weights (benchmarks/kv_first_front_end.py, H100:
        110 us for k / v against 130 with two GEMMs).
        Not for quantised layers (fp8), which keep their own GEMMs. Loading weights into k / v (in place) updates
        the fused tensor too; after the module is moved or cast (new k / v tensors), this fuses them again."""
        k, v = self.k, self.v
        if self.kv_weight is not None and k.weight.data_ptr() == self.kv_weight.data_ptr():
            return  # fused already
        self.kv_weight = self.kv_bias = None
        plain = all(t is not None and type(t.data) is torch.Tensor for t in (k.weight, v.weight, k.bias, v.bias))
        if not plain or type(k) is not nn.Linear or type(v) is not nn.Linear:
            return
        self.kv_weight, self.kv_bias = torch.cat([k.weight.data, v.weight.data]), torch.cat([k.bias.data, v.bias.data])
        dim = k.weight.shape[0]
        k.weight.data, v.weight.data = self.kv_weight[:dim], self.kv_weight[dim:]
        k.bias.data, v.bias.data = self.kv_bias[:dim], self.kv_bias[dim:]

    def unfuse_key_value(self) -> None:
        """k and v with storage of their own again (e.g. for safetensors, which refuses tensors sharing memory)."""
        if self.kv_weight is None:
            return
        for t in (self.k.weight, self.v.weight, self.k.bias, self.v.bias):
            t.data = t.data.clone()
        self.kv_weight = self.kv_bias = None


# The self-attention class each split runs (the plain one for the kernel-only splits); same weights for all.
MODULE_CLASSES = {"x_gather": GatheredSelfAttention, "ulysses_kv_first": KVFirstSelfAttention}


class SequenceParallelDiT:
    """A FlashHeadDiT run by every rank of `group` on its token shard; same call signature as the DiT.

    It offers what the samplers use (`forward`, `forward_embedded`, `embed_time`, `embed_audio`, `rope`,
    `config`), so `denoise_chunk` and `FastDenoiser` drive it like the plain model. `head_groups`: the
    Ulysses head-group pipeline (None: `default_head_groups`; 1: one all-to-all each way, not overlapped).
    `method`: the self-attention split (flashhead.parallel.attention.METHODS; None: Ulysses where it can).
    """

    def __init__(
        self, dit: FlashHeadDiT, group: SequenceParallelGroup, head_groups: int | None = None, method: str | None = None
    ):
        self.dit, self.group, self.head_groups, self.method = dit, group, head_groups, method
        self.attention: SequenceParallelAttention | None = None
        self._partitions: dict[tuple[int, int, int], TokenPartition] = {}
        self._segments: dict[tuple, torch.Tensor] = {}
        self._rope: dict[tuple, torch.Tensor] = {}
        self.install()

    @property
    def config(self):
        return self.dit.config

    def install(self) -> None:
        """Wrap the current self-attention kernel (SDPA or FA3) of every block in the sequence-parallel one."""
        inner = self.dit.blocks[0].self_attn.kernel
        if isinstance(inner, SequenceParallelAttention):
            inner = inner.inner
        g = self.group
        self.attention = SequenceParallelAttention(
            g.rank, g.world_size, self.config.num_heads, g.group, inner, self.head_groups, self.method
        )
        gathered = self.attention.method == "x_gather"
        if gathered and any(type(b.self_attn.q.weight.data) is not torch.Tensor for b in self.dit.blocks):
            raise ConfigError("x_gather attention slices the q / k / v weights by heads: not with fp8 layers")
        module_class = MODULE_CLASSES.get(self.attention.method, SelfAttention)
        for block in self.dit.blocks:
            block.self_attn.kernel = self.attention
            if type(block.self_attn) in (SelfAttention, *MODULE_CLASSES.values()):
                if type(block.self_attn) is KVFirstSelfAttention and module_class is not KVFirstSelfAttention:
                    block.self_attn.unfuse_key_value()
                block.self_attn.__class__ = module_class
                if module_class is KVFirstSelfAttention:
                    block.self_attn.fuse_key_value()

    def uninstall(self) -> None:
        """Give the blocks back their plain self-attention (class and SDPA kernel), e.g. before another split."""
        for block in self.dit.blocks:
            if type(block.self_attn) is KVFirstSelfAttention:
                block.self_attn.unfuse_key_value()
            if type(block.self_attn) in MODULE_CLASSES.values():
                block.self_attn.__class__ = SelfAttention
            if block.self_attn.kernel is self.attention:
                block.self_attn.kernel = self.attention.inner

    def partition(self, grid: tuple[int, int, int]) -> TokenPartition:
        if grid not in self._partitions:
            f, h, w = grid
            self._partitions[grid] = partition_tokens(f, h * w, self.group.world_size)
        return self._partitions[grid]

    # -- what the samplers call -------------------------------------------------------------------------

    def embed_time(self, timestep: torch.Tensor, batch: int, dtype: torch.dtype):
        return self.dit.embed_time(timestep, batch, dtype)

    def embed_audio(self, context: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.dit.embed_audio(context, dtype)

    def rope(
        self, grid: tuple[int, int, int], device: torch.device, table: bool = False, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        return self.dit.rope(grid, device, table, dtype)

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: torch.Tensor):
        return self.forward(x, timestep, context, y)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: torch.Tensor):
        """As FlashHeadDiT.forward: velocity (B, out_dim, F, H, W), the whole of it on every rank."""
        dtype = self.dit.patch_embedding.weight.dtype  # the tokens' dtype, as in FlashHeadDiT.forward
        t, t_mod = self.embed_time(timestep, x.shape[0], dtype)
        return self.forward_embedded(x, y, t, t_mod, self.embed_audio(context, dtype))

    def forward_embedded(self, x, y, t, t_mod, audio, rope: torch.Tensor | None = None) -> torch.Tensor:
        """As FlashHeadDiT.forward_embedded, on this rank's shard of the tokens."""
        dit, rank = self.dit, self.group.rank
        tokens, grid = dit.patchify(x, y)  # (B, L, D); the conv is cheap next to the blocks
        part = self.partition(grid)
        start, stop = part.bounds(rank)
        if self.attention.method == "x_gather":  # q / k of the whole sequence are rotated on every rank
            rope = self.dit.rope(grid, x.device) if rope is None else rope
        else:
            rope = self._shard_rope(grid, x.device) if rope is None else rope[start:stop]
        if self.attention.method == "ulysses_kv_first":  # two copies: see kv_first_self_attention
            rope = torch.stack([rope, rope])
        # Static dims for the table, whose shape differs between splits and from the one-GPU DiT's: in session 13's
        # generated code (2 x H200) the k / v first block, compiled after plain Ulysses in the same process, had a
        # symbolic size-2 dim in it (automatic dynamic shapes compare a recompile's inputs with the earlier ones).
        torch._dynamo.mark_static(rope)
        self.attention.sizes = part.sizes
        shard = tokens[:, start:stop]  # (B, s, D)
        audio = audio.index_select(1, self._segment_index(part, audio.device))  # (B, segments, tokens, D)
        with overlap_in_compiled_graphs(self.attention.method) if self.attention.overlaps_in_graphs else nullcontext():
            for block in dit.blocks:  # compiled blocks (compile_dit) compile at their first call, in this context
                shard = block(shard, audio, t_mod, rope)
        out = dit.head(shard, t)  # (B, s, pt*ph*pw*C)
        return dit.unpatchify(self._gather(out, part), grid)

    def _shard_rope(self, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        # The plain DiT rebuilds the whole complex128 table every call; a shard needs only its rows, and
        # they are the same at every step and chunk of this grid.
        key = (grid, str(device))
        if key not in self._rope:
            start, stop = self.partition(grid).bounds(self.group.rank)
            self._rope[key] = self.dit.rope(grid, device)[start:stop].contiguous()
        return self._rope[key]

    def _segment_index(self, part: TokenPartition, device: torch.device) -> torch.Tensor:
        key = (part, str(device))
        if key not in self._segments:
            self._segments[key] = torch.tensor(part.segment_frames(self.group.rank), device=device)
        return self._segments[key]

    def _gather(self, shard: torch.Tensor, part: TokenPartition) -> torch.Tensor:
        """(B, s_rank, P) shards -> (B, L, P) on every rank (uneven shards are padded for the collective)."""
        if self.group.world_size == 1:
            return shard
        longest = max(part.sizes)
        padded = torch.nn.functional.pad(shard, (0, 0, 0, longest - shard.shape[1])).contiguous()
        pieces = [torch.empty_like(padded) for _ in part.sizes]
        dist.all_gather(pieces, padded, group=self.group.group)
        return torch.cat([p[:, :n] for p, n in zip(pieces, part.sizes, strict=True)], dim=1)
