"""The sequence-parallel process group and how a chunk's token sequence is split across its ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist

from flashhead.errors import ConfigError


@dataclass(frozen=True)
class SequenceParallelGroup:
    """The ranks that share one chunk. Rank 0 is the leader: it owns inputs, sessions and outputs."""

    rank: int
    world_size: int
    device: torch.device
    group: dist.ProcessGroup | None = None  # None: the default group
    # Host-side channel (gloo) for the leader's small announcements. On NCCL an announcement would queue behind
    # the GPU work already launched, so a follower would learn of a chunk only when the previous one is done.
    control: dist.ProcessGroup | None = None

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return dist.get_backend(self.group)


def init_sequence_parallel(expected: int | None = None, device: str | None = None) -> SequenceParallelGroup:
    """Join torchrun's processes (RANK / WORLD_SIZE / LOCAL_RANK): NCCL on CUDA, gloo on CPU.

    `expected` is the size the user asked for (`--sp N`); a different WORLD_SIZE is a ConfigError.
    """
    if "RANK" not in os.environ:
        raise ConfigError("sequence parallel needs torchrun's environment (RANK, WORLD_SIZE); launch with --sp N")
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if expected is not None and expected != world:
        raise ConfigError(f"--sp {expected} but torchrun started {world} processes; they must be equal")
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(f"{world} sequence-parallel ranks need {world} GPUs; {torch.cuda.device_count()} found")
        target = torch.device("cuda", local)
        torch.cuda.set_device(target)
    else:
        target = torch.device("cpu")
        # Processes share the cores: without this each one would start a thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=target if cuda else None)
    control = dist.new_group(backend="gloo")
    return SequenceParallelGroup(rank, world, target, control=control)


def nccl_options(high_priority: bool):
    """Options of the NCCL process group; `high_priority` puts its collectives on high-priority CUDA streams.

    High priority lets an all-to-all get SMs before the blocks still queued of a compute kernel launched
    earlier: in the 2-GPU Pro traces each layer's first q / k / v all-to-all then starts 13 us instead of 31 us
    after its copy, but the Pro stream was no faster (347.9 against 346.0 ms per chunk, session 9), so NCCL's
    default stays. CUDA graphs keep the priority (torch instantiates them with per-node priorities).
    """
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = high_priority
    return options


@dataclass(frozen=True)
class TokenPartition:
    """Contiguous shards of a chunk's L tokens (in (f, h, w) order), one per rank.

    Shard boundaries are multiples of `segment`, which divides the tokens of one latent frame, so a shard
    is a whole number of segments that each lie inside one frame: the frame-local cross-attention then
    runs on a shard with no communication (every segment attends to its own frame's audio tokens).
    """

    sizes: tuple[int, ...]
    frame_tokens: int
    segment: int

    @cached_property
    def starts(self) -> tuple[int, ...]:
        return tuple(sum(self.sizes[:r]) for r in range(len(self.sizes)))

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def bounds(self, rank: int) -> tuple[int, int]:
        return self.starts[rank], self.starts[rank] + self.sizes[rank]

    def segment_frames(self, rank: int) -> list[int]:
        """The latent frame of each segment of a rank's shard."""
        start, stop = self.bounds(rank)
        return [pos // self.frame_tokens for pos in range(start, stop, self.segment)]


def partition_tokens(frames: int, frame_tokens: int, world_size: int, tolerance: float = 0.02) -> TokenPartition:
    """Split frames * frame_tokens tokens into `world_size` shards for the frame-local cross-attention.

    Whole frames when that is balanced (F divisible by N), else the coarsest segment (a divisor of the frame's
    token count) whose split is within `tolerance` of perfectly even (Pro on 2 GPUs: half frames), down
    to single tokens. Shards then differ by at most one segment; uneven sizes are handled exactly by the
    attention (uneven all-to-all splits, ring blocks of their own sizes), nothing is padded.
    """
    total = frames * frame_tokens
    if total < world_size:
        raise ConfigError(f"{total} tokens cannot be split over {world_size} sequence-parallel ranks")
    for segment in sorted((d for d in range(1, frame_tokens + 1) if frame_tokens % d == 0), reverse=True):
        units = total // segment
        if units < world_size:
            continue
        base, extra = divmod(units, world_size)
        sizes = tuple(segment * (base + (r < extra)) for r in range(world_size))
        if max(sizes) * world_size <= total * (1 + tolerance) or segment == 1:
            return TokenPartition(sizes, frame_tokens, segment)
    raise AssertionError("unreachable: segment 1 always fits")  # pragma: no cover
