"""Plain PyTorch implementations of every op, with the same contracts and errors as the C++ ops: the
references the C++ and CUDA kernels are tested against, and what the CUDA kernels fall back to (correct,
not fast: each call reads values back to the host, as the C++ checks do, and loops over the slots).
The *_args functions are their checks of shapes and dtypes, which need nothing from the device.
``combine`` and its helpers are plain compositions the layer uses directly."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def combine(topk_weights: torch.Tensor, slot_ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Weighted sum over k: topk_weights [T, K], slot_ids [T, K], expert outputs y [T*K, H] in
    (token, k) order -> [T, H]. A degraded step (slot -1: no live replica) rescales the surviving
    entries to the full top-k mass (exactly 1 when all are live)."""
    T, K = slot_ids.shape
    weights = live_weights(topk_weights, slot_ids)
    return torch.bmm(weights.unsqueeze(1), y.view(T, K, y.shape[-1]).float()).squeeze(1).to(y.dtype)


def live_weights(topk_weights: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """combine's weights [T, K]: 0 for an unroutable pair (slot -1), the others rescaled to the full
    top-k mass (unchanged when all are live)."""
    live = torch.where(slot_ids >= 0, topk_weights, 0.0)
    return live * (topk_weights.sum(-1, keepdim=True) / live.sum(-1, keepdim=True).clamp_min(1e-20))


def gather_experts_combine(x, order, offsets, slot_ids, topk_weights, experts) -> torch.Tensor:
    """What grouped_swiglu_combine computes, step by step: x [T, H]'s rows gathered in slot order,
    ``experts(rows, offsets)`` -> [T*K, H] (any grouped SwiGLU: the layer's differentiable one, or the
    reference), put back in (token, k) order, and ``combine``d -> [T, H]."""
    y_rows = experts(x[order // slot_ids.shape[1]], offsets)
    return combine(topk_weights, slot_ids, torch.empty_like(y_rows).index_copy_(0, order, y_rows))


def _first(ids: torch.Tensor, bad: torch.Tensor) -> int:
    return int(ids[bad][0])


def route_args(topk_ids, log2phy, logcnt, num_slots, load) -> tuple[int, int]:
    """route_to_slots' checks of shapes and dtypes -> (E, R): logical experts, replica columns."""
    if topk_ids.dim() != 2:
        raise RuntimeError(f"route_to_slots: topk_ids must be [T, K], got {list(topk_ids.shape)}")
    if topk_ids.dtype != torch.long:
        raise RuntimeError("route_to_slots: topk_ids must be int64")
    if num_slots <= 0:
        raise RuntimeError("route_to_slots: num_slots must be positive")
    if (log2phy is None) != (logcnt is None):
        raise RuntimeError("route_to_slots: pass both log2phy and logcnt or neither")
    identity = log2phy is None
    if not identity:
        if log2phy.dim() != 2 or logcnt.dim() != 1 or log2phy.shape[0] != logcnt.shape[0]:
            raise RuntimeError("route_to_slots: log2phy must be [E, R] and logcnt [E]")
        if log2phy.dtype != torch.long or logcnt.dtype != torch.long:
            raise RuntimeError("route_to_slots: log2phy and logcnt must be int64")
    E, R = (num_slots, 1) if identity else tuple(log2phy.shape)
    if load is not None and (load.dim() != 1 or load.shape[0] != E or load.dtype != torch.long
                             or not load.is_contiguous()):
        raise RuntimeError(f"route_to_slots: load must be a contiguous int64 [{E}], got {list(load.shape)}")
    return E, R


def route_to_slots_reference(topk_ids, log2phy, logcnt, num_slots, strict=False, load=None):
    E, R = route_args(topk_ids, log2phy, logcnt, num_slots, load)
    identity = log2phy is None
    T = topk_ids.shape[0]
    ids = topk_ids.reshape(-1)
    out_of_range = (ids < 0) | (ids >= E)
    if bool(out_of_range.any()):
        raise RuntimeError(f"route_to_slots: expert id {_first(ids, out_of_range)} out of range [0, {E})")
    if identity:
        slot_ids = topk_ids.clone()
    else:
        cnt = logcnt[topk_ids]
        bad = (cnt < 0) | (cnt > R)
        if bool(bad.any()):
            e = _first(topk_ids, bad)
            raise RuntimeError(f"route_to_slots: logcnt[{e}] = {int(logcnt[e])} outside [0, {R}]")
        if strict and bool((cnt == 0).any()):
            raise RuntimeError(f"route_to_slots: expert {_first(topk_ids, cnt == 0)} has no live replica "
                               "(degraded='raise'); run recover() or use degraded='renormalize'")
        token = torch.arange(T, device=topk_ids.device).unsqueeze(1)
        chosen = log2phy[topk_ids, token % cnt.clamp(min=1)]
        bad = (cnt > 0) & ((chosen < 0) | (chosen >= num_slots))
        if bool(bad.any()):
            raise RuntimeError(f"route_to_slots: log2phy[{_first(topk_ids, bad)}] names slot {_first(chosen, bad)} "
                               f"outside [0, {num_slots})")
        slot_ids = torch.where(cnt > 0, chosen, -1)
    if load is not None:  # only once every pair has passed the checks
        load.index_add_(0, ids, torch.ones_like(ids))
    key = torch.where(slot_ids < 0, num_slots, slot_ids).reshape(-1)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_slots + 1)[:num_slots]
    offsets = torch.zeros(num_slots + 1, dtype=torch.long, device=topk_ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return slot_ids, order, offsets


def expert_args(x, offsets, w13, w2) -> None:
    """grouped_swiglu's (and its backward's) checks of shapes and dtypes; offsets None: the experts' alone."""
    if x.dim() != 2:
        raise RuntimeError(f"grouped_swiglu: x must be [N, H], got {list(x.shape)}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise RuntimeError("grouped_swiglu: w13 must be [S, 2I, H] and w2 [S, H, I]")
    S, H, I = w13.shape[0], w13.shape[2], w13.shape[1] // 2
    if w13.shape[1] != 2 * I or tuple(w2.shape) != (S, H, I):
        raise RuntimeError(f"grouped_swiglu: w13 {list(w13.shape)} and w2 {list(w2.shape)} disagree")
    if x.shape[1] != H:
        raise RuntimeError(f"grouped_swiglu: x has hidden size {x.shape[1]}, experts expect {H}")
    if offsets is not None and (offsets.dim() != 1 or offsets.shape[0] != S + 1 or offsets.dtype != torch.long):
        raise RuntimeError(f"grouped_swiglu: offsets must be int64 [S+1] = [{S + 1}]")
    if not x.dtype == w13.dtype == w2.dtype:
        raise RuntimeError("grouped_swiglu: dtype mismatch between x and expert weights")


def _busy_slots(x, offsets, w13, w2) -> list[tuple[int, int, int]]:
    """The C++ op's checks (grouped_swiglu and its backward), then (slot, first row, end row) of every
    slot that has rows."""
    expert_args(x, offsets, w13, w2)
    bounds = offsets.tolist()
    if bounds[0] < 0 or bounds[-1] > x.shape[0]:
        raise RuntimeError(f"grouped_swiglu: offsets outside [0, {x.shape[0]}]")
    if any(b < a for a, b in zip(bounds, bounds[1:])):
        raise RuntimeError("grouped_swiglu: offsets must be non-decreasing")
    return [(s, a, b) for s, (a, b) in enumerate(zip(bounds, bounds[1:])) if b > a]


def grouped_swiglu_reference(x, offsets, w13, w2):
    busy = _busy_slots(x, offsets, w13, w2)
    out = torch.zeros_like(x)
    inter = w13.shape[1] // 2
    for s, a, b in busy:
        h = x[a:b] @ w13[s].t()
        out[a:b] = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[s].t()
    return out


def grouped_swiglu_backward_reference(grad_out, x, offsets, w13, w2):
    """(grad_x, grad_w13, grad_w2) of grouped_swiglu, recomputing each slot's activations."""
    busy = _busy_slots(x, offsets, w13, w2)
    if grad_out.shape != x.shape:
        raise RuntimeError("grouped_swiglu_backward: grad_out must match x")
    inter = w13.shape[1] // 2
    grad_x, grad_w13, grad_w2 = torch.zeros_like(x), torch.zeros_like(w13), torch.zeros_like(w2)
    for s, a, b in busy:
        xs, go = x[a:b], grad_out[a:b]
        h = xs @ w13[s].t()
        g, u = h[:, :inter], h[:, inter:]
        sig = torch.sigmoid(g)
        silu = g * sig
        grad_w2[s] = go.t() @ (silu * u)
        grad_act = go @ w2[s]
        grad_h = torch.cat([grad_act * u * sig * (1 + g * (1 - sig)), grad_act * silu], dim=1)
        grad_w13[s] = grad_h.t() @ xs
        grad_x[a:b] = grad_h @ w13[s]
    return grad_x, grad_w13, grad_w2


def combine_args(x, order, slot_ids, topk_weights) -> None:
    """grouped_swiglu_combine's checks of shapes and dtypes (the experts' are expert_args)."""
    if x.dim() != 2 or slot_ids.dim() != 2 or slot_ids.shape[0] != x.shape[0]:
        raise RuntimeError("grouped_swiglu_combine: x must be [T, H] and slot_ids [T, K]")
    T, K = slot_ids.shape
    if order.dim() != 1 or order.shape[0] != T * K or order.dtype != torch.long:
        raise RuntimeError(f"grouped_swiglu_combine: order must be int64 [T*K] = [{T * K}]")
    if slot_ids.dtype != torch.long:
        raise RuntimeError("grouped_swiglu_combine: slot_ids must be int64")
    if topk_weights.shape != slot_ids.shape or topk_weights.dtype != torch.float32:
        raise RuntimeError(f"grouped_swiglu_combine: topk_weights must be float32 {list(slot_ids.shape)}")


def grouped_swiglu_combine_reference(x, order, offsets, slot_ids, topk_weights, w13, w2):
    combine_args(x, order, slot_ids, topk_weights)
    T, K = slot_ids.shape
    if not torch.equal(torch.sort(order).values, torch.arange(T * K, device=order.device)):
        raise RuntimeError(f"grouped_swiglu_combine: order is not a permutation of [0, {T * K})")
    return gather_experts_combine(x, order, offsets, slot_ids, topk_weights,
                                  lambda rows, offsets: grouped_swiglu_reference(rows, offsets, w13, w2))


def router_args(x, weight, k) -> None:
    """route_tokens' checks of shapes and dtypes."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise RuntimeError(f"route_tokens: x must be [T, H] and weight [E, H], got {list(x.shape)} and "
                           f"{list(weight.shape)}")
    if x.dtype != weight.dtype:
        raise RuntimeError("route_tokens: x and weight dtypes differ")
    if not 1 <= k <= weight.shape[0]:
        raise RuntimeError(f"route_tokens: k = {k} outside [1, {weight.shape[0]}]")


def softmax_router(x, weight, k, normalize):
    """x [T, H], weight [E, H] -> (logits [T, E] in x's dtype, topk_weights [T, k] float32, topk_ids [T, k])."""
    logits = F.linear(x, weight)
    topk_weights, topk_ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), k, dim=-1)
    if normalize:
        topk_weights = topk_weights / (topk_weights.sum(-1, keepdim=True) + 1e-20)
    return logits, topk_weights, topk_ids


def route_tokens_reference(x, weight, k, normalize, log2phy, logcnt, num_slots, strict=False, load=None):
    router_args(x, weight, k)
    logits, topk_weights, topk_ids = softmax_router(x, weight, k, normalize)
    routed = route_to_slots_reference(topk_ids, log2phy, logcnt, num_slots, strict, load)
    return (logits, topk_weights, topk_ids, *routed)


def moe_args(tokens, w13, w2, num_slots) -> None:
    """moe_forward's checks of the experts' shapes and dtypes against tokens [T, H] and num_slots."""
    expert_args(tokens, None, w13, w2)
    if w13.shape[0] != num_slots:
        raise RuntimeError(f"moe_forward: w13 holds {w13.shape[0]} slots, num_slots is {num_slots}")


def moe_forward_reference(x, gate_weight, k, normalize, log2phy, logcnt, num_slots, strict, w13, w2, scaling=1.0,
                          load=None):
    tokens = x.reshape(-1, x.shape[-1])
    moe_args(tokens, w13, w2, num_slots)  # before `load` changes
    logits, topk_weights, _, slot_ids, order, offsets = route_tokens_reference(
        tokens, gate_weight, k, normalize, log2phy, logcnt, num_slots, strict, load)
    out = grouped_swiglu_combine_reference(tokens, order, offsets, slot_ids, topk_weights * scaling, w13, w2)
    return out.view(x.shape), logits
