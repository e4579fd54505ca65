"""When splitting a chunk over the GPUs pays, and what to do when it does not.

Sequence parallelism adds a fixed cost per DiT layer (two all-to-alls, their copies and launches, and the
ranks waiting for each other) and saves a share of the work that grows with the tokens per rank. Measured on
2 H200s (docs/performance-log.md): Pro, 9,216 tokens per chunk (4,608 per rank), gains; Lite, 1,280 tokens
(640 per rank), ran at 0.57x of one GPU: its DiT is bound by kernel launches, which a split does not reduce.
So below `MIN_TOKENS_PER_RANK` the pipeline is not split: the leader runs every chunk alone and the other
ranks have nothing to do. The way to use several GPUs for such a model is one replica per GPU, each
serving its own streams (`flashhead serve --ray --replicas N`, or one process per GPU).
"""

from __future__ import annotations

MIN_TOKENS_PER_RANK = 2048  # between Lite's 640 (0.57x) and Pro's 4,608 (a gain) on 2 GPUs


def chunk_tokens(latent_shape: tuple[int, int, int, int], patch_size: tuple[int, int, int]) -> int:
    """DiT tokens of one chunk: latent (C, T', H', W') divided into (pt, ph, pw) patches."""
    _, t, h, w = latent_shape
    pt, ph, pw = patch_size
    return (t // pt) * (h // ph) * (w // pw)


def split_pays(tokens: int, world_size: int, min_tokens_per_rank: int = MIN_TOKENS_PER_RANK) -> bool:
    """Whether a chunk of `tokens` tokens should be split over `world_size` ranks."""
    return world_size > 1 and tokens // world_size >= min_tokens_per_rank
