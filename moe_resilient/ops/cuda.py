"""The ops' CUDA kernels: PyTorch compositions around ``torch._grouped_mm`` (one grouped GEMM for all
slots, where the references loop over them).

Serving never waits on the GPU: ``moe_forward`` (the layer's serving call) reads nothing back to the
host, so a step runs ahead of the device and a CUDA graph can capture it; placement edits then change
what a captured graph reads, never the graph. It trusts the replica tables it is given to be as
ExpertPlacement keeps them (validated on the host by its mutators; -1 past each expert's count), yet
reads only within bounds whatever they hold: expert ids come from top-k and replica columns are clamped
into the table. Only ``strict`` (degraded="raise") reads one flag back, to raise for a pair with no live
replica; inside a captured graph, which cannot read anything back, such a pair is dropped as
"renormalize" drops it.

The other ops take arbitrary orders, offsets and ids, so they check shapes and dtypes on the host and
reduce their value checks to one flag, read back per call (trusted while a graph is being captured); a
set flag reruns the reference (``ops.*_reference``), which raises its precise error. Where
``torch._grouped_mm`` cannot run (not bf16, sizes not multiples of 8, a GPU older than sm_80, no rows)
the references serve.

The compositions are device-agnostic, so tests also run them on CPU, where ``torch._grouped_mm`` has a
kernel too."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moe_resilient.ops import reference


def grouped_mm_fits(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether torch._grouped_mm serves x [N, H] against w13 [S, 2I, H] and w2 [S, H, I] on this device:
    bf16 (its CUDA kernel's one unscaled dtype), rows of 16-byte multiples, and at least one row."""
    H, two_i = w13.shape[2], w13.shape[1]
    fits = (hasattr(torch, "_grouped_mm") and x.dtype == w13.dtype == w2.dtype == torch.bfloat16
            and x.shape[0] > 0 and H % 8 == 0 and two_i % 16 == 0)
    return fits and (not x.is_cuda or _capability(x.device.index) >= (8, 0))


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _trusted(bad: torch.Tensor) -> bool:
    """Whether the values behind the flag `bad` (a 0-dim bool) pass: read back, except while a CUDA graph
    is being captured, which cannot read anything back."""
    if bad.is_cuda and torch.cuda.is_current_stream_capturing():
        return True
    return not bool(bad)


def _replica_choice(ids, log2phy, logcnt) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [T, K] in range -> (cnt [T, K], chosen [T, K]): each pair's live replica count, and the slot
    in column t % cnt of its row of log2phy for token t (the column clamped into the table)."""
    cnt = logcnt[ids]
    token = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1)
    return cnt, log2phy[ids, token % cnt.clamp(1, log2phy.shape[1])]


def choose_slots(topk_ids, log2phy, logcnt, num_slots: int, strict: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """route_to_slots' replica choice: topk_ids [T, K] -> (slot_ids [T, K], -1: no live replica; the flag
    of any value route_to_slots_reference rejects, ``strict``'s too). The indices read through the
    tables are clamped, so no value can fault before the flag is read."""
    E = num_slots if log2phy is None else log2phy.shape[0]
    bad = ((topk_ids < 0) | (topk_ids >= E)).any()
    if log2phy is None:
        return topk_ids.clone(), bad
    R = log2phy.shape[1]
    cnt, chosen = _replica_choice(topk_ids.clamp(0, E - 1), log2phy, logcnt)
    bad = bad | ((cnt < 0) | (cnt > R)).any() | ((cnt > 0) & ((chosen < 0) | (chosen >= num_slots))).any()
    if strict:
        bad = bad | (cnt == 0).any()
    return torch.where(cnt > 0, chosen, -1), bad


def group_by_slot(slot_ids: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """slot_ids [T, K] -> (order [T*K] sorted by slot, unroutable last; offsets [S+1]). Offsets by a
    search of the sorted slots: bincount would read its maximum back to the host."""
    key = torch.where(slot_ids < 0, num_slots, slot_ids).reshape(-1)
    sorted_key, order = torch.sort(key, stable=True)
    return order, torch.searchsorted(sorted_key, torch.arange(num_slots + 1, device=key.device))


def route_to_slots(topk_ids, log2phy, logcnt, num_slots, strict=False, load=None):
    E, _ = reference.route_args(topk_ids, log2phy, logcnt, num_slots, load)
    slot_ids, bad = choose_slots(topk_ids, log2phy, logcnt, num_slots, strict)
    if not _trusted(bad):
        return reference.route_to_slots_reference(topk_ids, log2phy, logcnt, num_slots, strict, load)
    if load is not None:  # only once every pair has passed the checks
        ids = topk_ids.reshape(-1).clamp(0, E - 1)
        load.index_add_(0, ids, torch.ones_like(ids))
    return (slot_ids, *group_by_slot(slot_ids, num_slots))


def _offsets_bad(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """The flag of offsets [S+1] that do not start at 0, decrease, or pass `rows`. (The reference
    accepts offsets[0] > 0, skipping those rows; a grouped GEMM's first group starts at row 0.)"""
    return (offsets[0] != 0) | (offsets[-1] > rows) | (offsets[1:] < offsets[:-1]).any()


def _swiglu(x: torch.Tensor, ends: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x [N, H], ends [S] int32 (slot s: rows ends[s-1] .. ends[s]) -> [N, H]; rows past ends[-1] unwritten."""
    inter = w13.shape[1] // 2
    h = torch._grouped_mm(x, w13.transpose(1, 2), offs=ends)
    return torch._grouped_mm(F.silu(h[:, :inter]) * h[:, inter:], w2.transpose(1, 2), offs=ends)


def _past(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows, 1] bool: the rows past offsets[-1], which a grouped GEMM leaves unwritten."""
    return torch.arange(rows, device=offsets.device).unsqueeze(1) >= offsets[-1]


def swiglu_rows(x: torch.Tensor, offsets: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """grouped_swiglu as two grouped GEMMs: x [N, H] grouped by slot, offsets [S+1] -> [N, H]; rows past
    offsets[-1] come out 0."""
    return _swiglu(x, offsets[1:].to(torch.int32), w13, w2).masked_fill_(_past(offsets, x.shape[0]), 0)


def grouped_swiglu(x, offsets, w13, w2):
    reference.expert_args(x, offsets, w13, w2)
    if not grouped_mm_fits(x, w13, w2) or not _trusted(_offsets_bad(offsets, x.shape[0])):
        return reference.grouped_swiglu_reference(x, offsets, w13, w2)
    return swiglu_rows(x, offsets, w13, w2)


def swiglu_rows_backward(grad_out, x, offsets, w13, w2):
    """grouped_swiglu_backward as grouped GEMMs, recomputing the activations: (grad_x [N, H],
    grad_w13 [S, 2I, H], grad_w2 [S, H, I]); slots without rows get zero gradients."""
    ends = offsets[1:].to(torch.int32)
    inter = w13.shape[1] // 2
    h = torch._grouped_mm(x, w13.transpose(1, 2), offs=ends)
    g, u = h[:, :inter], h[:, inter:]
    sig = torch.sigmoid(g)
    silu = g * sig
    grad_act = torch._grouped_mm(grad_out, w2, offs=ends)
    grad_h = torch.cat([grad_act * u * sig * (1 + g * (1 - sig)), grad_act * silu], dim=1)
    grad_x = torch._grouped_mm(grad_h, w13, offs=ends)
    # Weight gradients: the groups split the contraction (rows); an empty group's block is unwritten.
    grad_w2 = torch._grouped_mm(grad_out.t(), silu * u, offs=ends)
    grad_w13 = torch._grouped_mm(grad_h.t(), x, offs=ends)
    empty = (offsets[1:] == offsets[:-1]).view(-1, 1, 1)
    grad_x = grad_x.masked_fill_(_past(offsets, x.shape[0]), 0)
    return grad_x, grad_w13.masked_fill_(empty, 0), grad_w2.masked_fill_(empty, 0)


def grouped_swiglu_backward(grad_out, x, offsets, w13, w2):
    reference.expert_args(x, offsets, w13, w2)
    if grad_out.shape != x.shape:
        raise RuntimeError("grouped_swiglu_backward: grad_out must match x")
    fits = grouped_mm_fits(x, w13, w2) and grad_out.dtype == x.dtype
    if not fits or not _trusted(_offsets_bad(offsets, x.shape[0])):
        return reference.grouped_swiglu_backward_reference(grad_out, x, offsets, w13, w2)
    return swiglu_rows_backward(grad_out.contiguous(), x, offsets, w13, w2)


def slot_ends(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """combine_rows' ends from route_to_slots' offsets [S+1]: offsets[1:] as int32, the last at `rows`,
    so the last slot's GEMMs take the unroutable rows (sorted last)."""
    ends = offsets[1:].to(torch.int32)
    ends.select(0, -1).fill_(rows)
    return ends


def combine_rows(x, order, ends, slot_ids, topk_weights, w13, w2) -> torch.Tensor:
    """grouped_swiglu_combine with every value already trusted, x [T, H] -> [T, H]. ends [S] int32: where
    each slot's rows end in ``order``; they cover every row, the unroutable ones riding with some slot,
    whose GEMMs give them finite values that the combine weighs by 0 (rows a grouped GEMM leaves
    unwritten could hold NaN, and NaN * 0 is NaN)."""
    T, K = slot_ids.shape
    y = _swiglu(x[order // K], ends, w13, w2)
    y = torch.empty_like(y).index_copy_(0, order, y)
    # reference.combine with the k-sum as one fp32 multiply-sum (bf16 rows times fp32 weights), not cast + bmm
    weights = reference.live_weights(topk_weights, slot_ids)
    return (y.view(T, K, -1) * weights.unsqueeze(-1)).sum(1).to(y.dtype)


def _combine_bad(order, offsets) -> torch.Tensor:
    """The flag of an order [T*K] that is not a permutation, or of bad offsets."""
    n = order.shape[0]
    seen = torch.zeros(n, dtype=torch.long, device=order.device)
    seen.index_add_(0, order.clamp(0, max(n - 1, 0)), torch.ones_like(order))
    return ((order < 0) | (order >= n)).any() | (seen != 1).any() | _offsets_bad(offsets, n)


def grouped_swiglu_combine(x, order, offsets, slot_ids, topk_weights, w13, w2):
    reference.combine_args(x, order, slot_ids, topk_weights)
    reference.expert_args(x, None, w13, w2)
    if not grouped_mm_fits(x, w13, w2) or not _trusted(_combine_bad(order, offsets)):
        return reference.grouped_swiglu_combine_reference(x, order, offsets, slot_ids, topk_weights, w13, w2)
    return combine_rows(x, order, slot_ends(offsets, order.shape[0]), slot_ids, topk_weights, w13, w2)


def route_tokens(x, weight, k, normalize, log2phy, logcnt, num_slots, strict=False, load=None):
    reference.router_args(x, weight, k)
    logits, topk_weights, topk_ids = reference.softmax_router(x, weight, k, normalize)
    return (logits, topk_weights, topk_ids, *route_to_slots(topk_ids, log2phy, logcnt, num_slots, strict, load))


def moe_forward(x, gate_weight, k, normalize, log2phy, logcnt, num_slots, strict, w13, w2, scaling=1.0, load=None):
    tokens = x.reshape(-1, x.shape[-1])
    args = (x, gate_weight, k, normalize, log2phy, logcnt, num_slots, strict, w13, w2, scaling, load)
    if not grouped_mm_fits(tokens, w13, w2):
        return reference.moe_forward_reference(*args)
    reference.moe_args(tokens, w13, w2, num_slots)
    reference.router_args(tokens, gate_weight, k)
    logits, topk_weights, topk_ids = reference.softmax_router(tokens, gate_weight, k, normalize)
    reference.route_args(topk_ids, log2phy, logcnt, num_slots, load)
    if log2phy is None:
        slot_ids = topk_ids
    else:  # route_to_slots' choice, trusting ExpertPlacement's invariant: log2phy is -1 past each count
        cnt, slot_ids = _replica_choice(topk_ids, log2phy, logcnt)
        if strict and not _trusted((cnt == 0).any()):  # the reference raises, before `load` changes
            return reference.moe_forward_reference(*args)
    if load is not None:  # topk's ids are in range
        flat = topk_ids.view(-1)
        load.index_add_(0, flat, torch.ones_like(flat))
    # Unroutable pairs (-1) sort first and ride with slot 0 (see combine_rows): the slot ends come
    # straight from one search. Slots out of range (a bad table) sort past the last end: those rows stay
    # unwritten, their tokens' outputs undefined, but nothing is read out of bounds.
    sorted_key, order = torch.sort(slot_ids.view(-1), stable=True)
    ends = torch.searchsorted(sorted_key, torch.arange(1, num_slots + 1, device=x.device), out_int32=True)
    if scaling != 1.0:
        topk_weights = topk_weights * scaling
    out = combine_rows(tokens, order, ends, slot_ids, topk_weights, w13, w2)
    return out.view(x.shape), logits


# registered for the "cuda" dispatch key by ops/__init__.py
KERNELS = {
    "moe_forward": moe_forward,
    "route_to_slots": route_to_slots,
    "route_tokens": route_tokens,
    "grouped_swiglu": grouped_swiglu,
    "grouped_swiglu_backward": grouped_swiglu_backward,
    "grouped_swiglu_combine": grouped_swiglu_combine,
}
