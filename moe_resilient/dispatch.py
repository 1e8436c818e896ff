"""Expert-parallel forward of a ResilientMoE over an ElasticGroup.

Every rank holds the whole placement (identical metadata everywhere) and the weights of the slots it
owns (``slot_rank[s] == rank``; slots must be numbered rank by rank). A step:

    route locally -> pick a live replica per (token, k) -> exchange per-rank row counts (this also
    carries the join word) -> all-to-all the rows and their slot ids -> grouped SwiGLU over the slots
    this rank owns -> reverse all-to-all -> weighted combine.

Dead ranks own no live slot, so they are sent nothing. A collective that meets a dead or hung rank
raises RankFailure (the group has already agreed and moved on); the caller runs
``elastic.recover_across_ranks`` and re-runs the step. The all-to-alls are differentiable: the backward of a
dispatch is the reverse all-to-all, so the layer trains under expert parallelism too.
"""

from __future__ import annotations

import torch

from moe_resilient.group import ElasticGroup
from moe_resilient.layer import ResilientMoE
from moe_resilient.ops import combine


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, send_counts, recv_counts):
        ctx.group, ctx.send_counts, ctx.recv_counts = group, send_counts, recv_counts
        return group.all_to_all(x, send_counts, recv_counts)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.all_to_all(grad.contiguous(), ctx.recv_counts, ctx.send_counts), None, None, None


class Loopback:
    """A stand-in group of one for ``ep_forward``: every row "sent" comes straight back, so the local
    slots compute every expert. For compiling the stages before a real group exists (a first compile
    takes seconds, which every peer would otherwise spend waiting) and for running them without peers.
    ``held``: the slots a sharded layer holds; slot ids coming back are folded into them (for
    compiling only: the values are then meaningless)."""

    def __init__(self, world_size: int, held: range | None = None):
        self.world_size, self.held = world_size, held

    def exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        return send_counts

    def all_to_all(self, send: torch.Tensor, send_counts: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
        if self.held is not None and not send.is_floating_point():
            return send % len(self.held) + self.held.start
        return send.clone()  # a fresh tensor, as a real exchange returns: the compiled graphs then match


def _plan_dispatch(layer: ResilientMoE, x: torch.Tensor, world_size: int):
    """x [T, H] -> (router_logits [T, E], topk_weights [T, K], slot_ids [T, K], order [T*K], offsets [S+1],
    send_counts [W]). Static shapes only (no bincount), so it compiles into one graph."""
    logits, topk_weights, _, slot_ids, order, offsets = layer.route(x)
    send_counts = offsets.new_zeros(world_size).index_add_(0, layer.placement.slot_rank, offsets[1:] - offsets[:-1])
    return logits, topk_weights, slot_ids, order, offsets, send_counts


def _local_experts(layer: ResilientMoE, recv_x: torch.Tensor, recv_slots: torch.Tensor) -> torch.Tensor:
    """Rows received from every rank, recv_x [N, H] with their (global) slots [N], all held here ->
    expert outputs [N, H]."""
    rows = recv_slots - layer.experts.held.start  # the slots' rows in this rank's storage
    local_order = torch.sort(rows, stable=True).indices
    counts = rows.new_zeros(len(layer.experts.held)).index_add_(0, rows, torch.ones_like(rows))
    local_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    y_sorted = layer.experts(recv_x[local_order], local_offsets)
    return torch.empty_like(y_sorted).index_copy(0, local_order, y_sorted)


def _combine(layer: ResilientMoE, x, topk_weights, slot_ids, sent, y_back) -> torch.Tensor:
    """Expert outputs back in (token, k) order (unroutable pairs stay 0), weighted sum, shared expert."""
    y = y_back.new_zeros(slot_ids.numel(), x.shape[-1]).index_copy(0, sent, y_back)
    return layer.add_shared_expert(x, combine(topk_weights, slot_ids, y))


_STAGES = (_plan_dispatch, _local_experts, _combine)
_compiled_stages: tuple | None = None


def compiled_stages() -> tuple:
    """The three compute stages of ep_forward under torch.compile, built once per process and shared by
    every layer (modules are graph inputs, not constants). Row counts are unbacked symbols (see
    ``_rows``), so a batch of another size, a makeup batch or a new membership compiles nothing;
    placement tensors are read at run time, so recover() compiles nothing either."""
    global _compiled_stages
    if _compiled_stages is None:
        _compiled_stages = tuple(torch.compile(f, fullgraph=True) for f in _STAGES)
    return _compiled_stages


def _rows(*tensors: torch.Tensor) -> None:
    """Mark dim 0 (a row count that changes every step) dynamic before a compiled stage sees it.
    Unbacked, not merely dynamic: a dynamic size is still specialised at 0 and 1, and duck-shaped
    into a weight dimension that happens to be equal; either would recompile later."""
    for t in tensors:
        torch._dynamo.decorators.mark_unbacked(t, 0)


def ep_forward(layer: ResilientMoE, hidden_states: torch.Tensor, group: ElasticGroup | Loopback, *,
               compiled: bool = False, return_router_logits: bool = False):
    """hidden_states [..., H] of this rank's tokens -> [..., H] (and router_logits [T, E] with
    ``return_router_logits``). Raises RankFailure on a lost peer. ``compiled`` runs the compute between
    the collectives as compiled graphs (``compiled_stages``)."""
    c, p = layer.config, layer.placement
    if p.world_size != group.world_size:
        raise ValueError(f"layer placement has world_size {p.world_size}, the group {group.world_size}")
    plan_dispatch, local_experts, combine_back = compiled_stages() if compiled else _STAGES
    x = hidden_states.reshape(-1, c.hidden_size)
    if compiled:
        _rows(x)
    logits, topk_weights, slot_ids, order, offsets, send_counts = plan_dispatch(layer, x, group.world_size)
    K = slot_ids.shape[1]
    sent = order[: int(offsets[-1])]  # (token, k) pairs grouped by slot, hence by destination rank
    send_slots = slot_ids.flatten()[sent]

    recv_counts = group.exchange_counts(send_counts)
    recv_x = _AllToAll.apply(x[sent // K], group, send_counts, recv_counts)
    recv_slots = group.all_to_all(send_slots, send_counts, recv_counts)
    if compiled:
        _rows(recv_x, recv_slots)
    y_recv = local_experts(layer, recv_x, recv_slots)
    y_back = _AllToAll.apply(y_recv, group, recv_counts, send_counts)
    if compiled:
        _rows(topk_weights, slot_ids, order, sent, y_back)  # order: sent is a view of it
    out = combine_back(layer, x, topk_weights, slot_ids, sent, y_back).reshape(hidden_states.shape)
    return (out, logits) if return_router_logits else out
