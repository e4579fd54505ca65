"""Self-attention over a token sequence that is split across ranks.

Each rank holds q, k, v (B, s_r, H, d) for its own contiguous shard of the sequence (shards may differ in
size) and gets back the attention output of the same shard, equal to attention over the whole sequence:

- Ulysses (H divisible by N): one all-to-all turns the q, k, v sequence shards into head shards (every rank
  sees the whole sequence for H / N heads), any local kernel runs, a second all-to-all turns the result back.
  Communication is 4 tensors of the shard's size per layer in 2 collectives, independent of N.
  With `head_groups` G > 1 the heads are pipelined in G groups: every group's q / k / v all-to-all is launched
  at once, group g's kernel runs as soon as its heads have arrived (later groups still in flight) and its
  output all-to-all is launched right after it, so transfers overlap the attention kernels. Per-head
  attention does not depend on other heads, so the result is the same as with one group.
  `ulysses_kv_first` (whole self-attention modules, like X gather): k and v are projected, normalised and sent
  first; q is projected while they are in flight and sent on its own (no copy to itself). Each rank attends
  its own queries of the first group as soon as that group's k / v have arrived, which covers the transfer of
  the other ranks' queries, so no input transfer is exposed (plain Ulysses waits for the first group's whole
  q / k / v after the last projection). Same values as Ulysses, bit for bit.
- KV gather (any H, any N; meant for 2 GPUs): every rank keeps its queries and gathers the keys / values of
  all ranks in one all-gather, attending to its own block while the others' are in flight; the per-block
  results are merged exactly with their log-sum-exp. On 2 GPUs it moves as much data as Ulysses (one shard's
  k and v in, against q, k, v out and the output back) in one collective instead of two, and the transfer
  hides behind the local block's attention instead of being exposed. Uses the fused kernels that return the
  log-sum-exp (cuDNN, else memory-efficient, on CUDA; flash on the CPU).
- X gather (H divisible by N): the Ulysses head split with the input side moved before the projections.
  Every rank all-gathers the block's (modulated) input x and projects q / k / v of the whole sequence for its
  own heads (the same FLOPs as projecting all heads of its shard); its own shard is projected while the other
  shards are in flight. q / k are RMS-normalised over all heads, so the per-token sums of squares of each
  rank's heads are all-reduced (2 floats per token). Outputs go back by the Ulysses all-to-all, per head
  group. Against Ulysses: for every token of another rank a rank receives x (D values) instead of its heads'
  q, k, v (3 D / N): 2/3 of the bytes on 2 GPUs, as many on 3, more beyond (meant for 2); no copy into
  rank-major order; the input transfer hides behind the own shard's projections. Not bit-identical to one
  GPU (the norms' sums are added in another order): within the rounding of the dtype.
- Ring (any H, any N): k / v blocks travel around the ring while each rank attends its queries to the
  block it holds; the partial results are merged exactly with their log-sum-exp. Used where the heads do
  not divide over the ranks (12 heads on 5, 7, 8 ... GPUs). Blocks are attended and merged as in KV gather
  (fused kernels with their log-sum-exp); N - 1 point-to-point steps instead of one all-gather.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from flashhead.errors import ConfigError
from flashhead.models.dit import AttentionKernel as Kernel
from flashhead.models.dit import sdpa_kernel

# None: Ulysses where the heads divide (as "ulysses_kv_first" when pipelined in head groups), else ring.
# "ulysses_kv_first": Ulysses with k / v sent before q is projected (see kv_first_self_attention; 3-5 ms faster per
# Pro chunk than "ulysses" on 2 x H200). "ulysses_own_first": Ulysses that attends each rank's own block of the
# first head group while that group is in flight (2.5 ms slower than "ulysses" on 2 x H200; kept for comparison).
METHODS = (None, "ulysses", "ulysses_own_first", "ulysses_kv_first", "x_gather", "kv_gather", "ring")
ULYSSES = ("ulysses", "ulysses_own_first", "ulysses_kv_first", "x_gather")  # the methods that split the heads
MODULE_METHODS = ("ulysses_kv_first", "x_gather")  # they run whole self-attention modules, not a q / k / v kernel


def _all_to_all(x: torch.Tensor, out_sizes: Sequence[int], in_sizes: Sequence[int], group) -> torch.Tensor:
    """All-to-all along dim 0 with uneven splits."""
    x = x.contiguous()
    if torch.compiler.is_compiling():  # functional collective: traceable, and capturable in a CUDA graph
        out = funcol.all_to_all_single(x, list(out_sizes), list(in_sizes), group or dist.group.WORLD)
        return funcol.wait_tensor(out)
    # Eager: the plain collective into a preallocated output, without the functional wrapper's tensor
    # subclass and separate wait op (a few hundred per chunk: their host time adds up when launch-bound).
    out = x.new_empty((sum(out_sizes), *x.shape[1:]))
    dist.all_to_all_single(out, x, list(out_sizes), list(in_sizes), group=group)
    return out


def seq_to_heads(x: torch.Tensor, sizes: Sequence[int], rank: int, group=None) -> torch.Tensor:
    """(B, s_rank, H, d) sequence shard -> (B, L, H / N, d): the whole sequence for this rank's heads."""
    return qkv_to_heads(x[None], sizes, group)[0]


def qkv_to_heads(qkv: torch.Tensor, sizes: Sequence[int], group=None) -> torch.Tensor:
    """(P, B, s_rank, H, d) stacked sequence shards (e.g. q, k, v) -> (P, B, L, H / N, d) head shards.

    One copy into rank-major order and one all-to-all for all P tensors (not one per tensor): fewer
    collectives and launches per layer. The result is a view in (P, B, L, h, d) order, strided.
    """
    P, B, s, H, d = qkv.shape
    n = len(sizes)
    x = qkv.reshape(P, B, s, n, H // n, d).permute(3, 2, 0, 1, 4, 5).reshape(n * s, P, B, H // n, d)
    out = _all_to_all(x, sizes, [s] * n, group)  # (L, P, B, H/N, d), sequence order
    return out.permute(1, 2, 0, 3, 4)


def heads_to_seq(x: torch.Tensor, sizes: Sequence[int], rank: int, group=None) -> torch.Tensor:
    """Inverse of `seq_to_heads`: (B, L, H / N, d) -> (B, s_rank, H, d)."""
    B, L, h, d = x.shape
    n, s = len(sizes), sizes[rank]
    out = _all_to_all(x.permute(1, 0, 2, 3), [s] * n, sizes, group)  # (N * s, B, H/N, d), rank-major
    return out.reshape(n, s, B, h, d).permute(2, 1, 0, 3, 4).reshape(B, s, n * h, d)


def default_head_groups(heads: int, world_size: int) -> int:
    """The smallest G >= 2 that divides the heads of one rank (pipelining needs two groups at least), else 1."""
    local = heads // world_size if heads % world_size == 0 else 1
    return next((g for g in range(2, local + 1) if local % g == 0), 1)


def ulysses_attention(
    q,
    k,
    v,
    sizes: Sequence[int],
    rank: int,
    group=None,
    kernel: Kernel | None = None,
    head_groups: int = 1,
    own_first: bool = False,
):
    """Attention of a sequence shard against the whole sequence, by all-to-alls (heads % N == 0).

    `head_groups` G (dividing heads / N): 1 = one all-to-all each way; G > 1 = the overlapped pipeline.
    `own_first` (G > 1): this rank's queries of the first group are attended to its own keys while the group is
    in flight, and merged with the other ranks' key blocks by log-sum-exp when it has arrived.
    """
    n, heads = len(sizes), q.shape[2]
    if heads % n:
        raise ConfigError(f"Ulysses attention needs heads ({heads}) divisible by the ranks ({n})")
    if head_groups < 1 or (heads // n) % head_groups:
        raise ConfigError(f"head_groups {head_groups} must divide the {heads // n} heads of each rank")
    if head_groups == 1:
        q, k, v = qkv_to_heads(torch.stack([q, k, v]), sizes, group).unbind(0)
        return heads_to_seq((kernel or sdpa_kernel)(q, k, v), sizes, rank, group)
    return _overlapped_ulysses(q, k, v, sizes, rank, group, kernel or sdpa_kernel, head_groups, own_first)


class _Pending:
    """An all-to-all in flight: `wait()` gives its output (eager: c10d work; compiling: a functional collective)."""

    def __init__(self, x: torch.Tensor, out: torch.Tensor | None, out_sizes, in_sizes, group):
        self.out, self.work = out, None
        if torch.compiler.is_compiling():
            # The raw functional op: funcol.all_to_all_single would put its wait right after the launch while
            # tracing; this wait goes into the graph only where wait() is called, as late as possible.
            name = (group or dist.group.WORLD).group_name
            self.out = torch.ops._c10d_functional.all_to_all_single(x, list(out_sizes), list(in_sizes), name)
        else:
            self.work = dist.all_to_all_single(out, x, list(out_sizes), list(in_sizes), group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        if self.work is None:
            return torch.ops._c10d_functional.wait_tensor(self.out)
        self.work.wait()  # on CUDA: the compute stream waits for the transfer, the host goes on
        return self.out


def overlap_in_compiled_graphs(method: str | None = None):
    """A context in which Inductor keeps the head-group pipeline of the graphs it compiles (torch.compile).

    By default Inductor schedules each all-to-all launch right before its wait, which serialises the groups
    again; its `sink_waits` and `raise_comms` passes restore launch-early / wait-late, and `own_work_after_launch`
    then puts each group's own-query attention back under its group's output transfer. `ulysses_kv_first`
    orders its compute itself and gets `launch_early_wait_late` instead. Scoped to the sequence-parallel forward
    (where the blocks compile lazily) instead of set for the whole process.
    """
    import torch._inductor.config as inductor

    passes = [p for p in inductor.reorder_for_compute_comm_overlap_passes if p not in ("sink_waits", "raise_comms")]
    if method == "ulysses_kv_first":
        passes.append(launch_early_wait_late)
    else:
        passes += ["sink_waits", "raise_comms", own_work_after_launch]
    return inductor.patch(reorder_for_compute_comm_overlap=True, reorder_for_compute_comm_overlap_passes=passes)


def launch_early_wait_late(snodes: list) -> list:
    """Inductor reorder pass: compute in program order, every collective launched as soon as its inputs are
    computed and every earlier one launched, every wait just before the first node that needs it (the rest at the
    end).

    For code that orders its compute around its transfers itself (kv_first_self_attention). Inductor's own order
    is not the program's (its `raise_comms` schedules first whatever the next collective needs, which moves the
    own-query attention meant to cover a transfer behind it; its memory-aware order moves kernels too), so the
    program position of a node is taken from the traced graph: the last of the FX nodes it was lowered from.
    """
    from torch._inductor.utils import contains_collective, contains_wait

    fx_index: dict = {}

    def position(node) -> int:
        origins = [o for n in node.get_nodes() if getattr(n, "node", None) is not None for o in n.node.get_origins()]
        for graph in {o.graph for o in origins} - fx_index.keys():
            fx_index[graph] = {fx: i for i, fx in enumerate(graph.nodes)}
        return max((fx_index[o.graph][o] for o in origins), default=-1)

    owner = {name: node for node in snodes for name in node.get_operation_names()}
    inputs = {node: {owner[a] for a in node.ancestors if a in owner} - {node} for node in snodes}
    # launched in program order: NCCL runs a rank's collectives one after another in the order they are launched
    launches = sorted((n for n in snodes if contains_collective(n) and not contains_wait(n)), key=position)
    order: list = []
    done: set = set()

    def emit(node) -> None:
        for dep in sorted(inputs[node] - done, key=position):  # waits (lazily) and anything else still missing
            if dep not in done:
                emit(dep)
        order.append(node)
        done.add(node)
        while launches and (launches[0] in done or inputs[launches[0]] <= done):
            launch = launches.pop(0)
            if launch not in done:  # (a wait's need may have launched it already)
                emit(launch)

    compute = [n for n in snodes if not contains_collective(n) and not contains_wait(n)]
    for node in sorted(compute, key=position):  # stable: ties keep Inductor's order
        if node not in done:
            emit(node)
    for node in snodes:  # the waits that no node of the graph needs
        if node not in done:
            emit(node)
    return order


def own_work_after_launch(snodes: list) -> list:
    """Inductor reorder pass, after `raise_comms`: work that no collective needs and that uses a wait's result
    moves up to just after the first collective launched after that wait; such work that needs no wait at all
    (e.g. the own block of `own_first`) goes just before the first wait after the last node it needs.

    `raise_comms` schedules first whatever an earlier collective needs, so of a head group's two attention calls
    the own queries' one (needed by no collective) lands after every later group's remote-query call: the next
    group's input is then awaited with nothing in between, and the last output transfer hides behind all the
    own-query calls at once. Moved behind its own group's output launch, each own-query call covers that output
    transfer and the next group's input transfer.
    """
    from torch._inductor.utils import contains_collective, contains_wait

    def is_launch(node) -> bool:
        return contains_collective(node) and not contains_wait(node)

    needed = set()  # every node some collective launch depends on
    for node in snodes:
        if is_launch(node):
            needed |= set(node.ancestors)
    order = list(snodes)
    for node in list(order):
        if is_launch(node) or contains_wait(node) or node.get_operation_names() & needed:
            continue
        i = order.index(node)
        deps = [j for j in range(len(order)) if order[j].get_operation_names() & node.ancestors]
        if not deps:
            continue
        if any(contains_wait(order[j]) for j in deps):
            if not contains_wait(order[deps[-1]]):
                continue
            launch = next((j for j in range(deps[-1] + 1, i) if is_launch(order[j])), None)
            if launch is not None:
                order.insert(launch + 1, order.pop(i))
        else:
            wait = next((j for j in range(deps[-1] + 1, len(order)) if contains_wait(order[j])), None)
            users = [j for j in range(i + 1, len(order)) if order[j].ancestors & node.get_operation_names()]
            if wait is not None and users:
                wait = min(wait, users[0])  # never after a node that needs it
            if wait is not None and wait != i + 1:
                order.insert(wait - (i < wait), order.pop(i))
    return order


def _by_group_and_rank(t: torch.Tensor, n: int, G: int) -> torch.Tensor:
    """(B, s, H, d) -> (G, N, s, B, H / N / G, d), a view: rank r's group g holds heads r * H/N + g * hg + [0, hg)."""
    B, s, H, d = t.shape
    return t.reshape(B, s, n, G, H // n // G, d).permute(3, 2, 1, 0, 4, 5)


def _overlapped_ulysses(
    q, k, v, sizes: Sequence[int], rank: int, group, kernel: Kernel, G: int, own_first: bool = False
) -> torch.Tensor:
    B, s, H, d = q.shape
    n, L = len(sizes), sum(sizes)
    hg = H // n // G  # heads per group per rank; rank r's group g holds heads r * H/N + g * hg + [0, hg)
    # Stacked straight into (G, N, s, 3, B, hg, d) order, where each group's send buffer is a contiguous block:
    # compiled, q and k are then normalised and rotated into the send buffers by the kernel that reduces their
    # norms, instead of into a (3, B, s, H, d) stack copied into rank-major order per group (session-10 trace).
    send = torch.stack([_by_group_and_rank(t, n, G) for t in (q, k, v)], dim=3).reshape(G, n * s, 3, B, hg, d)
    eager = not torch.compiler.is_compiling()
    recv = send.new_empty((G, L, 3, B, hg, d)) if eager else None  # (G, L, ...): group g writes recv[g]
    incoming = [_Pending(send[g], recv[g] if eager else None, sizes, [s] * n, group) for g in range(G)]
    arrived: dict[int, torch.Tensor] = {}
    starts = [sum(sizes[:j]) for j in range(n)]
    if own_first:  # this rank's block of the first group's send buffer holds exactly its own q / k / v of those heads
        mine = send[0].reshape(n, s, 3, B, hg, d)[rank].permute(1, 2, 3, 0, 4)  # (3, B, hg, s, d)
        own_block = attention_with_lse(mine[0], mine[1], mine[2])  # while the group is in flight

    def attend(g: int, start: int, stop: int) -> torch.Tensor:
        if g not in arrived:  # (3, B, L, hg, d): the whole sequence, this group's heads
            arrived[g] = incoming[g].wait().permute(1, 2, 0, 3, 4)
        x = arrived[g]
        if not (own_first and g == 0 and start == starts[rank]):
            return kernel(x[0][:, start:stop], x[1], x[2])
        blocks = [own_block] + [
            attention_with_lse(mine[0], x[1][:, a : a + m].transpose(1, 2), x[2][:, a : a + m].transpose(1, 2))
            for j, (a, m) in enumerate(zip(starts, sizes, strict=True))
            if j != rank
        ]
        return merge_attention([o for o, _ in blocks], [lse for _, lse in blocks]).transpose(1, 2)

    return _attend_and_send_back(*_by_owner(attend, sizes, rank), G, q, sizes, rank, group)


def _by_owner(attend: Callable[[int, int, int], torch.Tensor], sizes, rank: int):
    """`attend(g, start, stop)` (queries [start, stop) of the whole sequence) -> (theirs(g), mine(g)): group g
    for the other ranks' queries, in rank order, and for this rank's own."""
    starts = [sum(sizes[:j]) for j in range(len(sizes))]

    def theirs(g: int) -> torch.Tensor:
        parts = [attend(g, starts[j], starts[j] + sizes[j]) for j in range(len(sizes)) if j != rank]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    return theirs, lambda g: attend(g, starts[rank], starts[rank] + sizes[rank])


def _attend_and_send_back(
    theirs: Callable[[int], torch.Tensor],
    mine: Callable[[int], torch.Tensor],
    G: int,
    like: torch.Tensor,
    sizes,
    rank: int,
    group,
    mine_first: int = 0,
) -> torch.Tensor:
    """Attend head group after head group and send each group's output back to the ranks whose tokens it holds.

    `theirs(g)`: (B, L - s, hg, d), this rank's heads of group g for the other ranks' queries (rank order);
    `mine(g)`: (B, s, hg, d), the same heads for this rank's own queries. Per group the other ranks' queries are
    attended first and sent while the own queries are attended, so every group's output transfer, the last one
    included, runs under an attention kernel instead of holding up the output projection; the first
    `mine_first` groups attend their own queries first instead (to cover an input transfer: kv_first).
    Per-query attention does not depend on the other queries, so the split changes no value.
    -> (B, s_rank, H, d) like `like`.
    """
    B, s, H, d = like.shape
    n = len(sizes)
    hg = H // n // G
    out_sizes = [0 if j == rank else s for j in range(n)]  # this rank's tokens, from every other rank
    in_sizes = [0 if j == rank else sizes[j] for j in range(n)]  # every other rank's tokens, to that rank
    eager = not torch.compiler.is_compiling()
    back = like.new_empty((G, (n - 1) * s, B, hg, d)) if eager else None
    outgoing, own = [], []
    for g in range(G):
        early = mine(g) if g < mine_first else None
        outgoing.append(_Pending(theirs(g).permute(1, 0, 2, 3).contiguous(), back[g] if eager else None,
                                 out_sizes, in_sizes, group))  # fmt: skip
        own.append((mine(g) if early is None else early).permute(1, 0, 2, 3))  # (s, B, hg, d)
    blocks = {}  # (rank j, group g) -> (s, B, hg, d): heads j * H / N + g * hg + [0, hg) of this rank's tokens
    for g in range(G):
        received = outgoing[g].wait().reshape(n - 1, s, B, hg, d)  # the other ranks' heads, in rank order
        for j in range(n):
            blocks[j, g] = own[g] if j == rank else received[j - (j > rank)]
    # One concatenation in head order straight into (B, s, H, d): compiled, a single copy kernel (a stack of
    # the groups and then a permuted copy for the output projection were two passes over the output).
    return torch.cat([blocks[j, g].permute(1, 0, 2, 3) for j in range(n) for g in range(G)], dim=2)


def key_value_projection(attn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v of x: one GEMM where the module holds its k / v weights fused (`fuse_key_value`), else two."""
    if getattr(attn, "kv_weight", None) is None:
        return attn.k(x), attn.v(x)
    return F.linear(x, attn.kv_weight, attn.kv_bias).chunk(2, dim=-1)


def kv_first_self_attention(attn, x: torch.Tensor, rope: torch.Tensor, sp: SequenceParallelAttention) -> torch.Tensor:
    """A DiT `SelfAttention` on this rank's shard x (B, s, D) by Ulysses with k / v sent before q is projected.

    Per head group, k / v of the shard go to the heads' owners (this rank's own block included, so the kernel
    sees whole-sequence keys in one tensor), q to the other ranks only. Order: k, v, their launches; q and its
    launches (the projection and norm of q cover the first group's k / v transfer); then group 0's own queries
    (they need only k / v, and cover the queries' transfer), group 0's other queries, and every later group as
    in Ulysses. Returns the projected output (B, s, D), equal to Ulysses bit for bit.

    `rope`: the shard's RoPE rows twice, stacked (2, s, ...), k rotated by the first copy and q by the second.
    Inductor fuses two reductions of the same size only where they read some data in common; with one table
    for both, it fused q's norm into k's kernel (2 x H200 trace), so q was projected before k / v could leave.
    """
    from flashhead.models.dit import apply_rope

    sizes, rank, group, G = sp.sizes, sp.rank, sp.group, sp.head_groups
    B, s, D = x.shape
    n, H = len(sizes), attn.num_heads
    d, hg, L = D // H, H // n // G, sum(sizes)

    eager = not torch.compiler.is_compiling()
    rope_k, rope_q = rope.unbind(0)
    k, v = key_value_projection(attn, x)
    k = apply_rope(attn.norm_k(k).unflatten(-1, (H, d)), rope_k)
    kv = torch.stack([_by_group_and_rank(k, n, G), _by_group_and_rank(v.unflatten(-1, (H, d)), n, G)], dim=3)
    kv = kv.reshape(G, n * s, 2, B, hg, d)
    kv_recv = kv.new_empty((G, L, 2, B, hg, d)) if eager else None

    def send_kv(g: int) -> _Pending:
        return _Pending(kv[g], kv_recv[g] if eager else None, sizes, [s] * n, group)

    kv_in = [send_kv(0)]
    # q for the send buffers (G, N, s, B, hg, d), the other ranks' heads first and own last, normalised and rotated
    # per rank's block of heads from one reduction: compiled, one kernel computes 1 / RMS, one pointwise kernel writes
    # every block, and the collectives and the attention read the blocks in place. (q normalised whole and then
    # stacked by slices was a copy per slice; reordered by a gather, a copy per collective and attention input.)
    # k goes into its send buffer from the kernel that reduces its norm (one input of the stack, as in Ulysses).
    q_raw = attn.q(x)
    inv_rms = attn.norm_q.inverse_rms(q_raw).unsqueeze(-1)  # (B, s, 1, 1)
    q_raw, weight, per_rank = q_raw.unflatten(-1, (H, d)), attn.norm_q.weight.unflatten(-1, (H, d)), H // n

    def queries_of(j: int) -> torch.Tensor:  # rank j's heads, (G, s, B, hg, d)
        heads = slice(j * per_rank, (j + 1) * per_rank)
        q_j = apply_rope(attn.norm_q.scale(q_raw[:, :, heads], inv_rms, weight[heads]), rope_q)
        return q_j.reshape(B, s, G, hg, d).permute(2, 1, 0, 3, 4)

    q = torch.stack([queries_of(j) for j in range(n) if j != rank] + [queries_of(rank)], dim=1)
    q_sizes = [0 if j == rank else sizes[j] for j in range(n)]  # the other ranks' queries of this rank's heads
    q_send = [0 if j == rank else s for j in range(n)]
    q_recv = q.new_empty((G, L - s, B, hg, d)) if eager else None
    q_in = []
    # Collectives run one after another on NCCL's stream, in launch order: group 0's queries before group 1's
    # keys, or the own-query attention that covers their transfer would end before they start.
    for g in range(G):
        q_in.append(_Pending(q[g, : n - 1].flatten(0, 1), q_recv[g] if eager else None, q_sizes, q_send, group))
        if g + 1 < G:
            kv_in.append(send_kv(g + 1))
    kernel = sp.inner or sdpa_kernel
    kv_arrived: dict[int, torch.Tensor] = {}

    def keys_values(g: int) -> torch.Tensor:  # (2, B, L, hg, d)
        if g not in kv_arrived:
            kv_arrived[g] = kv_in[g].wait().permute(1, 2, 0, 3, 4)
        return kv_arrived[g]

    def theirs(g: int) -> torch.Tensor:
        kv_g = keys_values(g)
        return kernel(q_in[g].wait().permute(1, 0, 2, 3), kv_g[0], kv_g[1])

    def mine(g: int) -> torch.Tensor:
        kv_g = keys_values(g)
        return kernel(q[g, n - 1].permute(1, 0, 2, 3), kv_g[0], kv_g[1])

    like = x.unflatten(-1, (H, d))  # (B, s, H, d): the output's shape and dtype
    return attn.o(_attend_and_send_back(theirs, mine, G, like, sizes, rank, group, mine_first=1).flatten(2))


def x_gather_self_attention(attn, x: torch.Tensor, rope: torch.Tensor, sp: SequenceParallelAttention) -> torch.Tensor:
    """A DiT `SelfAttention` on this rank's shard x (B, s, D) by the X-gather split; `rope` covers all L tokens.

    Returns the projected output (B, s, D), like `attn(x, rope)` on the whole sequence restricted to the shard.
    """
    from flashhead.models.dit import apply_rope

    sizes, rank, group = sp.sizes, sp.rank, sp.group
    B, s, D = x.shape
    n, H = len(sizes), attn.num_heads
    h, d = H // n, D // H
    rows = slice(rank * h * d, (rank + 1) * h * d)  # this rank's heads in the projections' output channels
    w_qk = torch.cat([attn.q.weight[rows], attn.k.weight[rows]])
    b_qk = torch.cat([attn.q.bias[rows], attn.k.bias[rows]])
    w_v, b_v = attn.v.weight[rows], attn.v.bias[rows]

    def project(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.linear(tokens, w_qk, b_qk), F.linear(tokens, w_v, b_v)

    longest = max(sizes)
    padded = F.pad(x, (0, 0, 0, longest - s)).contiguous()  # uneven shards: every rank sends the same size
    if torch.compiler.is_compiling():
        pending, work = funcol.all_gather_tensor(padded, 0, group or dist.group.WORLD), None
    else:
        pending = padded.new_empty((n * B, longest, D))
        work = dist.all_gather_into_tensor(pending, padded, group=group, async_op=True)
    own = project(x)  # while the other shards are in flight
    if work is not None:
        work.wait()
    gathered = (funcol.wait_tensor(pending) if work is None else pending).reshape(n, B, longest, D)
    parts = [own if r == rank else project(gathered[r, :, : sizes[r]]) for r in range(n)]
    qk = torch.cat([p[0] for p in parts], dim=1)  # (B, L, 2 h d), sequence order
    v = torch.cat([p[1] for p in parts], dim=1).unflatten(-1, (h, d))
    q, k = qk.split(h * d, dim=-1)
    # RMSNorm over all D channels: each rank holds h / H of them; sum the squares over the ranks.
    squares = torch.stack([q.float().pow(2).sum(-1), k.float().pow(2).sum(-1)])  # (2, B, L)
    if torch.compiler.is_compiling():
        squares = funcol.wait_tensor(funcol.all_reduce(squares, "sum", group or dist.group.WORLD))
    else:
        dist.all_reduce(squares, group=group)
    q = (q.float() * torch.rsqrt(squares[0, ..., None] / D + attn.norm_q.eps)).to(q.dtype) * attn.norm_q.weight[rows]
    k = (k.float() * torch.rsqrt(squares[1, ..., None] / D + attn.norm_k.eps)).to(k.dtype) * attn.norm_k.weight[rows]
    q, k = apply_rope(q.unflatten(-1, (h, d)), rope), apply_rope(k.unflatten(-1, (h, d)), rope)
    kernel, G = sp.inner or sdpa_kernel, sp.head_groups
    hg = h // G

    def attend(g: int, start: int, stop: int) -> torch.Tensor:
        heads = slice(g * hg, (g + 1) * hg)
        return kernel(q[:, start:stop, heads], k[:, :, heads], v[:, :, heads])

    like = x.unflatten(-1, (H, d))  # (B, s, H, d): the output's shape and dtype
    return attn.o(_attend_and_send_back(*_by_owner(attend, sizes, rank), G, like, sizes, rank, group).flatten(2))


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, H, s, d) in q's dtype, log-sum-exp (B, H, s) in float32) of q (B, H, s, d) against k / v blocks."""
    B, H, s, _ = q.shape
    if q.is_cuda:
        cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention
        if torch.compiler.is_compiling():  # traced as one op: the GPUs that compile the DiT have cuDNN attention
            out, lse = cudnn(q, k, v, None, True, 0.0, False, False)[:2]
            return out, lse.float().reshape(B, H, -1)[..., :s]
        try:  # cuDNN: the fastest attention of the Hopper GPUs through torch; its stats are (B, H, s, 1)
            out, lse = cudnn(q, k, v, None, True, 0.0, False, False)[:2]
        except RuntimeError:  # no cuDNN attention for this GPU, shape or build
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        return out, lse.float().reshape(B, H, -1)[..., :s]  # the efficient kernel pads its stats
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[:2]
    return out, lse.float().reshape(B, H, s)


def merge_attention(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> torch.Tensor:
    """Exact softmax attention over the union of key blocks from each block's output and log-sum-exp."""
    lse = torch.stack(list(lses))  # (n, B, H, s)
    weights = torch.exp(lse - lse.amax(dim=0, keepdim=True))
    weights = weights / weights.sum(dim=0, keepdim=True)
    out = sum(w[..., None] * o.float() for w, o in zip(weights.unbind(0), outs, strict=True))
    return out.to(outs[0].dtype)


def kv_gather_attention(q, k, v, sizes: Sequence[int], rank: int, group=None) -> torch.Tensor:
    """Attention of a sequence shard against the whole sequence by one all-gather of every rank's k / v.

    The gather is launched first; the shard's own block is attended while it is in flight (eager: an async
    c10d all-gather; compiling: a functional collective whose wait Inductor sinks past the local attention).
    """
    n, longest = len(sizes), max(sizes)
    qh = q.transpose(1, 2)  # (B, H, s, d)
    kv = torch.stack([k, v])  # (2, B, s, H, d)
    if kv.shape[2] < longest:  # uneven shards: every rank sends the same size
        kv = torch.nn.functional.pad(kv, (0, 0, 0, 0, 0, longest - kv.shape[2]))
    kv = kv.contiguous()
    if torch.compiler.is_compiling():
        pending = funcol.all_gather_tensor(kv, 0, group or dist.group.WORLD)
        work = None
    else:
        pending = kv.new_empty((n * kv.shape[0], *kv.shape[1:]))
        work = dist.all_gather_into_tensor(pending, kv, group=group, async_op=True)
    outs, lses = [], []
    own_out, own_lse = attention_with_lse(qh, k.transpose(1, 2), v.transpose(1, 2))
    if work is not None:
        work.wait()  # on CUDA: the compute stream waits for the transfer, the host goes on
    gathered = funcol.wait_tensor(pending) if work is None else pending
    gathered = gathered.reshape(n, 2, *kv.shape[1:])  # (n, 2, B, s_max, H, d)
    for r in range(n):  # in rank order, the shard's own block in its place
        if r == rank:
            outs.append(own_out)
            lses.append(own_lse)
            continue
        kr, vr = gathered[r, 0, :, : sizes[r]], gathered[r, 1, :, : sizes[r]]
        out, lse = attention_with_lse(qh, kr.transpose(1, 2), vr.transpose(1, 2))
        outs.append(out)
        lses.append(lse)
    return merge_attention(outs, lses).transpose(1, 2)


def ring_attention(q, k, v, sizes: Sequence[int], rank: int, group=None) -> torch.Tensor:
    """Attention of a sequence shard against the whole sequence, passing k / v around the ring (any heads).

    Each block is attended with the fused kernels of KV gather and the blocks are merged the same way."""
    n = len(sizes)
    qh = q.transpose(1, 2)  # (B, H, s, d)
    kv = torch.stack([k, v]).transpose(2, 3).contiguous()  # (2, B, H, s_rank, d)
    outs, lses = [None] * n, [None] * n  # by the rank that owns the block, as KV gather merges them
    nxt, prv = (rank + 1) % n, (rank - 1) % n
    to_global = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    for step in range(n):
        owner = (rank - step) % n  # whose k / v block this rank holds now
        pending = []
        if step < n - 1:  # start passing the block on while attending to it
            incoming = kv.new_empty((*kv.shape[:3], sizes[(owner - 1) % n], kv.shape[-1]))
            send = dist.P2POp(dist.isend, kv, to_global(nxt), group)
            pending = dist.batch_isend_irecv([send, dist.P2POp(dist.irecv, incoming, to_global(prv), group)])
        outs[owner], lses[owner] = attention_with_lse(qh, kv[0], kv[1])
        for work in pending:
            work.wait()
        if pending:
            kv = incoming
    return merge_attention(outs, lses).transpose(1, 2)


class SequenceParallelAttention:
    """An attention kernel ((B, s, H, d) shard in, shard out) for the DiT's self-attention modules.

    Ulysses when the heads divide over the ranks (k / v first, `ulysses_kv_first`, where its heads are pipelined in
    groups), ring attention otherwise. `sizes` (the shard size of
    every rank) is set by the sequence-parallel DiT before each forward; `inner` is the local kernel
    Ulysses runs on its head shard (None: torch SDPA; e.g. FlashAttention-3 with attention=fa3).
    `head_groups`: Ulysses heads pipelined in that many groups (None: `default_head_groups`; 1: not pipelined).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        heads: int,
        group=None,
        inner: Kernel | None = None,
        head_groups: int | None = None,
        method: str | None = None,
    ):
        self.rank, self.world_size, self.group, self.inner = rank, world_size, group, inner
        if method not in METHODS:
            raise ConfigError(
                f"sequence-parallel attention must be one of {', '.join(m for m in METHODS if m)}, not {method!r}"
            )
        if method in ULYSSES and heads % world_size:
            raise ConfigError(f"{method} attention needs heads ({heads}) divisible by the ranks ({world_size})")
        if head_groups is None:
            head_groups = default_head_groups(heads, world_size)
        if method is None and heads % world_size == 0:  # k / v first wherever the groups are pipelined
            method = "ulysses_kv_first" if head_groups > 1 else "ulysses"
        self.method = method or "ring"
        if self.method not in ULYSSES:
            head_groups = 1  # ring and KV gather overlap their transfers with compute by themselves
        elif head_groups < 1 or (heads // world_size) % head_groups:
            raise ConfigError(f"head_groups {head_groups} must divide the {heads // world_size} heads of each rank")
        self.head_groups = head_groups
        self.sizes: tuple[int, ...] = ()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if len(self.sizes) != self.world_size or self.sizes[self.rank] != q.shape[1]:
            raise RuntimeError(f"shard sizes {self.sizes} do not fit {q.shape[1]} tokens on rank {self.rank}")
        if self.method in ("ulysses", "ulysses_own_first"):
            return ulysses_attention(q, k, v, self.sizes, self.rank, self.group, self.inner, self.head_groups,
                                     own_first=self.method == "ulysses_own_first")  # fmt: skip
        if self.method == "kv_gather":
            return kv_gather_attention(q, k, v, self.sizes, self.rank, self.group)
        if self.method in MODULE_METHODS:  # see x_gather_self_attention, kv_first_self_attention
            raise RuntimeError(f"{self.method} attention runs whole self-attention modules, not a q / k / v kernel")
        return ring_attention(q, k, v, self.sizes, self.rank, self.group)

    @property
    def overlaps_in_graphs(self) -> bool:
        """Whether compiled graphs need Inductor's comm/compute reordering for this attention's overlap."""
        return self.method in ("kv_gather", *MODULE_METHODS) or self.head_groups > 1
