"""Expert-parallel forward of a ResilientMoE over an ElasticGroup.

Every rank holds the whole placement (identical metadata everywhere) and the weights of the slots it
owns (``slot_rank[s] == rank``; slots must be numbered rank by rank). A step:

    route locally -> pick a live replica per (token, k) -> exchange per-rank row counts (this also
    carries the join word) -> all-to-all the rows with their slot ids (one exchange) -> grouped SwiGLU
    over the slots this rank owns -> reverse all-to-all -> weighted combine.

Dead ranks own no live slot, so they are sent nothing. A collective that meets a dead or hung rank
raises RankFailure (the group has already agreed and moved on); the caller runs
``elastic.recover_across_ranks`` and re-runs the step. The exchanges are custom ops
(``moe_resilient::ep_exchange_counts``, ``moe_resilient::ep_dispatch``,
``moe_resilient::ep_all_to_all``) with fake kernels, so under ``compiled=True`` the whole forward,
exchanges included, is one graph. They are differentiable: the backward of a dispatch is the reverse
all-to-all, so the layer trains under expert parallelism too.
"""

from __future__ import annotations

import torch

from moe_resilient.group import ElasticGroup
from moe_resilient.layer import ResilientMoE
from moe_resilient.ops import combine


# The group the exchange ops run on: set by ep_forward before each forward, so a compiled graph names
# no group (a graph compiled on a Loopback serves the real group, and every membership, unchanged).
_group: ElasticGroup | Loopback | None = None


@torch.library.custom_op("moe_resilient::ep_exchange_counts", mutates_args=())
def exchange_counts(send_counts: torch.Tensor) -> torch.Tensor:
    """send_counts [W] -> recv_counts [W] over the current expert-parallel group."""
    return _group.exchange_counts(send_counts).clone()


@exchange_counts.register_fake
def _(send_counts):
    return torch.empty_like(send_counts)


@torch.library.custom_op("moe_resilient::ep_all_to_all", mutates_args=())
def all_to_all(send: torch.Tensor, send_counts: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
    """send [sum(send_counts), ...] rows grouped by destination -> rows received, grouped by source
    [sum(recv_counts), ...], over the current expert-parallel group. Its backward is the reverse
    exchange."""
    return _group.all_to_all(send.contiguous(), send_counts, recv_counts)


@all_to_all.register_fake
def _(send, send_counts, recv_counts):
    return send.new_empty(torch.library.get_ctx().new_dynamic_size(), *send.shape[1:])


def _setup(ctx, inputs, output):
    ctx.send_counts, ctx.recv_counts = inputs[1], inputs[2]


def _backward(ctx, grad):
    return all_to_all(grad, ctx.recv_counts, ctx.send_counts), None, None


all_to_all.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("moe_resilient::ep_dispatch", mutates_args=())
def dispatch_rows(rows: torch.Tensor, slots: torch.Tensor, send_counts: torch.Tensor,
                  recv_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [n, H] and their slot ids [n] int64, grouped by destination -> (rows received [m, H], their
    slot ids [m]), grouped by source: one exchange carrying both (each row's bytes, then its id's), so
    a step waits on its peers once for them. The rows' backward is the reverse exchange."""
    if isinstance(_group, Loopback):
        return _group.dispatch(rows, slots)
    n, m, row = rows.shape[0], int(recv_counts.sum()), rows.shape[1] * rows.element_size()
    packed = torch.cat([rows.contiguous().view(torch.uint8).view(n, row), slots.reshape(n, 1).view(torch.uint8)], 1)
    got = _group.all_to_all(packed, send_counts, recv_counts)
    # the ids are cloned: a slice of one row (or none) is contiguous already, and outputs may not alias
    return (got[:, :row].contiguous().view(rows.dtype).view(m, rows.shape[1]),
            got[:, row:].clone().view(torch.int64).view(m))


@dispatch_rows.register_fake
def _(rows, slots, send_counts, recv_counts):
    m = torch.library.get_ctx().new_dynamic_size()
    return rows.new_empty(m, rows.shape[1]), slots.new_empty(m)


def _dispatch_backward(ctx, grad_rows, grad_slots):
    return all_to_all(grad_rows, ctx.recv_counts, ctx.send_counts), None, None, None


def _dispatch_setup(ctx, inputs, output):
    ctx.send_counts, ctx.recv_counts = inputs[2], inputs[3]


dispatch_rows.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


class Loopback:
    """A stand-in group of one for ``ep_forward``: every row "sent" comes straight back, so the local
    slots compute every expert. For compiling the forward before a real group exists (a first compile
    takes seconds, which every peer would otherwise spend waiting) and for running them without peers.
    ``held``: the slots a sharded layer holds; slot ids coming back are folded into them (for
    compiling only: the values are then meaningless)."""

    def __init__(self, world_size: int, held: range | None = None):
        self.world_size, self.held = world_size, held

    def exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        return send_counts

    def all_to_all(self, send: torch.Tensor, send_counts: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
        return send.clone()  # a fresh tensor, as a real exchange returns: the compiled graphs then match

    def dispatch(self, rows: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        folded = slots.clone() if self.held is None else slots % len(self.held) + self.held.start
        return rows.clone(), folded


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


def _ep_forward(layer: ResilientMoE, x: torch.Tensor, world_size: int):
    """x [T, H] -> (out [T, H], router_logits [T, E]): one graph under torch.compile, the exchanges
    inside it as custom ops whose row counts are unbacked sizes."""
    logits, topk_weights, slot_ids, order, offsets, send_counts = _plan_dispatch(layer, x, world_size)
    K = slot_ids.shape[1]
    n = offsets[-1].item()
    torch._check(n >= 0)
    torch._check(n <= order.shape[0])
    sent = order[:n]  # (token, k) pairs grouped by slot, hence by destination rank
    recv_counts = exchange_counts(send_counts)
    recv_x, recv_slots = dispatch_rows(x[sent // K], slot_ids.flatten()[sent], send_counts, recv_counts)
    y_back = all_to_all(_local_experts(layer, recv_x, recv_slots), recv_counts, send_counts)
    torch._check(y_back.shape[0] == n)
    return _combine(layer, x, topk_weights, slot_ids, sent, y_back), logits


_compiled: object | None = None


def compiled_forward():
    """``_ep_forward`` under torch.compile (fullgraph), built once per process and shared by every
    layer (modules are graph inputs, not constants). The batch size and every row count are unbacked
    symbols, so another batch size, a new membership or a placement change compiles nothing."""
    global _compiled
    if _compiled is None:
        torch._dynamo.config.capture_scalar_outputs = True  # the row count read back inside the graph
        _compiled = torch.compile(_ep_forward, fullgraph=True)
    return _compiled


def ep_forward(layer: ResilientMoE, hidden_states: torch.Tensor, group: ElasticGroup | Loopback, *,
               compiled: bool = False, return_router_logits: bool = False):
    """hidden_states [..., H] of this rank's tokens -> [..., H] (and router_logits [T, E] with
    ``return_router_logits``). Raises RankFailure on a lost peer. ``compiled`` runs the whole forward,
    exchanges included, as one compiled graph (``compiled_forward``)."""
    global _group
    c, p = layer.config, layer.placement
    if p.world_size != group.world_size:
        raise ValueError(f"layer placement has world_size {p.world_size}, the group {group.world_size}")
    x = hidden_states.reshape(-1, c.hidden_size)
    _group = group
    if compiled:
        # unbacked, not merely dynamic: a dynamic size is still specialised at 0 and 1, and
        # duck-shaped into a weight dimension that happens to be equal; either would recompile later
        torch._dynamo.decorators.mark_unbacked(x, 0)
        out, logits = compiled_forward()(layer, x, group.world_size)
    else:
        out, logits = _ep_forward(layer, x, group.world_size)
    out = out.reshape(hidden_states.shape)
    return (out, logits) if return_router_logits else out
