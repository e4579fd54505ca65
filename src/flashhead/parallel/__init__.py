"""Sequence-parallel inference: one chunk's tokens split across the GPUs of one host.

    group = init_sequence_parallel()          # under torchrun: NCCL on CUDA, gloo on CPU
    pipe.parallelize(group)                    # every rank
    if group.is_leader: video = pipe(...); pipe.release_followers()
    else: pipe.follow()                        # runs the DiT / VAE shards until the leader is done

Modules: `group` (process group, token partition), `attention` (Ulysses, with its all-to-alls overlapped
over head groups, and ring attention), `dit` (the DiT forward on a token shard), `vae` (VAE decode and Wan
encode split into row strips; `wan_decode` / `wan_encode`: the exact Wan2.1 strip decode / encode), `runner`
(the leader / follower protocol that keeps the ranks in step), `policy`
(where a split pays: Pro yes, Lite no).
"""

from flashhead.parallel.group import SequenceParallelGroup, TokenPartition, init_sequence_parallel, partition_tokens

__all__ = ["SequenceParallelGroup", "TokenPartition", "init_sequence_parallel", "partition_tokens"]
