"""Expert-parallel forward of a ResilientMoE over an ElasticGroup.

Every rank holds the whole placement (identical metadata everywhere) and the weights of the slots it
owns (``slot_rank[s] == rank``; slots must be numbered rank by rank). A step:

    route locally -> pick a live replica per (token, k) -> exchange per-rank row counts (this also
    carries the join word) -> all-to-all the rows and their slot ids -> grouped SwiGLU over the slots
    this rank owns -> reverse all-to-all -> weighted combine.

Dead ranks own no live slot, so they are sent nothing. A collective that meets a dead or hung rank
raises RankFailure (the group has already agreed and moved on); the caller runs ``recover`` and
re-runs the step. The all-to-alls are differentiable: the backward of a dispatch is the reverse
all-to-all, so the layer trains under expert parallelism too.
"""

from __future__ import annotations

import torch

from moe_resilient.group import ElasticGroup
from moe_resilient.layer import ResilientMoE, combine


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, send_counts, recv_counts):
        ctx.group, ctx.send_counts, ctx.recv_counts = group, send_counts, recv_counts
        return group.all_to_all(x, send_counts, recv_counts)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_to_all(grad.contiguous(), ctx.recv_counts, ctx.send_counts), None, None, None


def check_owned_slots(layer: ResilientMoE) -> None:
    rank_of = layer.placement.slot_rank
    if bool((rank_of[1:] < rank_of[:-1]).any()):
        raise ValueError("expert parallelism needs slots numbered rank by rank (slot_rank non-decreasing)")


def ep_forward(layer: ResilientMoE, hidden_states: torch.Tensor, group: ElasticGroup) -> torch.Tensor:
    """hidden_states [..., H] of this rank's tokens -> [..., H]. Raises RankFailure on a lost peer."""
    c, p = layer.config, layer.placement
    if p.world_size != group.world_size:
        raise ValueError(f"layer placement has world_size {p.world_size}, the group {group.world_size}")
    x = hidden_states.reshape(-1, c.hidden_size)
    T = x.shape[0]
    _, topk_weights, topk_ids, slot_ids, order, offsets = layer.route(x)
    K = topk_ids.shape[1]
    n_live = int(offsets[-1])
    sent = order[:n_live]  # (token, k) pairs grouped by slot, hence by destination rank
    send_slots = slot_ids.flatten()[sent]
    send_counts = torch.bincount(p.slot_rank[send_slots], minlength=group.world_size)

    recv_counts = group.exchange_counts(send_counts)
    recv_x = _AllToAll.apply(x[sent // K], group, send_counts, recv_counts)
    recv_slots = group.all_to_all(send_slots, send_counts, recv_counts)

    local_order = torch.sort(recv_slots, stable=True).indices
    local_offsets = torch.zeros(c.num_slots + 1, dtype=torch.long)
    local_offsets[1:] = torch.cumsum(torch.bincount(recv_slots, minlength=c.num_slots), 0)
    y_sorted = layer.experts(recv_x[local_order], local_offsets)
    y_recv = torch.empty_like(y_sorted).index_copy(0, local_order, y_sorted)
    y_back = _AllToAll.apply(y_recv, group, recv_counts, send_counts)

    y = y_back.new_zeros(T * K, c.hidden_size).index_copy(0, sent, y_back)  # unroutable pairs stay 0
    out = combine(topk_weights, slot_ids, y)
    return layer.add_shared_expert(x, out).reshape(hidden_states.shape)


class PlacementMismatchError(RuntimeError):
    """Ranks disagree on a layer's placement: routing would send tokens to the wrong slots."""


def check_placement_consistent(layers: dict[str, ResilientMoE], group: ElasticGroup) -> None:
    """Compare every layer's placement across ranks (min and max of a checksum, one all-reduce)."""
    sums = []
    for layer in layers.values():
        p = layer.placement
        weights = torch.arange(1, p.num_slots + 1, dtype=torch.long)
        sums.append(int(((p.phy2log + 2) * weights).sum()) * 1_000_003 + int(p.active.long().sum()))
    local = torch.tensor(sums, dtype=torch.long)
    extremes = group.all_reduce(torch.cat([local, -local]), op="max")  # [max, -min] per layer
    n = len(sums)
    bad = [name for i, name in enumerate(layers) if int(extremes[i]) != -int(extremes[n + i])]
    if bad:
        raise PlacementMismatchError(f"ranks disagree on the placement of layers {bad}")


def reduce_grads_across_ranks(layer: ResilientMoE, group: ElasticGroup) -> None:
    """Training under EP: sum slot gradients over ranks (each slot's owner holds its gradient), then
    give every replica its logical expert's summed gradient. Dense parameters (router, shared
    expert) are replicated: their gradients are summed too."""
    for param in layer.parameters():
        if param.grad is not None:
            group.all_reduce(param.grad)
    layer.reduce_replica_grads()
