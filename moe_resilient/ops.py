"""Python side of the C++ ops in csrc/: fake kernels (so torch.compile traces them), autograd, and
plain-PyTorch reference implementations used by tests and benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from moe_resilient import _C  # noqa: F401  (loading the library registers torch.ops.moe_resilient)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "moe_resilient._C is not built; install with `pip install --no-build-isolation -e .`"
    ) from exc

_ops = torch.ops.moe_resilient


def route_to_slots(
    topk_ids: torch.Tensor, log2phy: torch.Tensor | None, logcnt: torch.Tensor | None, num_slots: int,
    strict: bool = False, load: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replica choice and grouping by slot in one pass.

    topk_ids [T, K] int64 logical experts -> (slot_ids [T, K] (-1: no live replica),
    order [T*K] flat pair indices sorted by slot (unroutable last), offsets [S+1]).
    ``strict`` raises instead of marking a pair unroutable. ``load`` ([E] int64), if given, gets each
    expert's pair count added in place (nothing is added when the call raises)."""
    return _ops.route_to_slots(topk_ids, log2phy, logcnt, num_slots, strict, load)


def route_tokens(
    x: torch.Tensor, weight: torch.Tensor, k: int, normalize: bool, log2phy: torch.Tensor | None,
    logcnt: torch.Tensor | None, num_slots: int, strict: bool = False, load: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Inference only (no autograd): the softmax router and route_to_slots in one call. x [T, H], gate
    weight [E, H] -> (router_logits [T, E] in x's dtype, topk_weights [T, k] float32 (highest first,
    renormalized to sum 1 when ``normalize``), topk_ids [T, k], slot_ids, order, offsets)."""
    return _ops.route_tokens(x, weight, k, normalize, log2phy, logcnt, num_slots, strict, load)


def grouped_swiglu(x: torch.Tensor, offsets: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x [N, H] grouped by slot, offsets [S+1], w13 [S, 2I, H], w2 [S, H, I] -> [N, H]."""
    return _ops.grouped_swiglu(x, offsets, w13, w2)


def grouped_swiglu_combine(
    x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, slot_ids: torch.Tensor, topk_weights: torch.Tensor,
    w13: torch.Tensor, w2: torch.Tensor,
) -> torch.Tensor:
    """Inference only (no autograd): x [T, H] and route_to_slots' (order, offsets, slot_ids [T, K]) with
    topk_weights [T, K] float32 -> [T, H], the same as gathering x's rows, grouped_swiglu, restoring
    (token, k) order and ``layer.combine``, in one call."""
    return _ops.grouped_swiglu_combine(x, order, offsets, slot_ids, topk_weights, w13, w2)


@torch.library.register_fake("moe_resilient::route_tokens")
def _route_tokens_fake(x, weight, k, normalize, log2phy, logcnt, num_slots, strict=False, load=None):
    t, e = x.shape[0], weight.shape[0]
    ids = x.new_empty((t, k), dtype=torch.long)
    return (x.new_empty((t, e)), x.new_empty((t, k), dtype=torch.float32), ids, torch.empty_like(ids),
            ids.new_empty(t * k), ids.new_empty(num_slots + 1))


@torch.library.register_fake("moe_resilient::route_to_slots")
def _route_to_slots_fake(topk_ids, log2phy, logcnt, num_slots, strict=False, load=None):
    n = topk_ids.shape[0] * topk_ids.shape[1]
    return (
        torch.empty_like(topk_ids),
        topk_ids.new_empty(n),
        topk_ids.new_empty(num_slots + 1),
    )


@torch.library.register_fake("moe_resilient::grouped_swiglu")
def _grouped_swiglu_fake(x, offsets, w13, w2):
    torch._check(x.shape[1] == w13.shape[2], lambda: "grouped_swiglu: hidden size mismatch")
    return torch.empty_like(x)


@torch.library.register_fake("moe_resilient::grouped_swiglu_combine")
def _grouped_swiglu_combine_fake(x, order, offsets, slot_ids, topk_weights, w13, w2):
    torch._check(x.shape[1] == w13.shape[2], lambda: "grouped_swiglu_combine: hidden size mismatch")
    return torch.empty_like(x)


@torch.library.register_fake("moe_resilient::grouped_swiglu_backward")
def _grouped_swiglu_backward_fake(grad_out, x, offsets, w13, w2):
    return torch.empty_like(x), torch.empty_like(w13), torch.empty_like(w2)


def _grouped_swiglu_setup_context(ctx, inputs, output):
    x, offsets, w13, w2 = inputs
    ctx.save_for_backward(x, offsets, w13, w2)


def _grouped_swiglu_backward(ctx, grad_out):
    x, offsets, w13, w2 = ctx.saved_tensors
    grad_x, grad_w13, grad_w2 = _ops.grouped_swiglu_backward(grad_out, x, offsets, w13, w2)
    return grad_x, None, grad_w13, grad_w2


torch.library.register_autograd(
    "moe_resilient::grouped_swiglu", _grouped_swiglu_backward, setup_context=_grouped_swiglu_setup_context
)


# ---------------------------------------------------------------------------------------------
# Plain PyTorch references (same contracts as the C++ ops).


def route_to_slots_reference(topk_ids, log2phy, logcnt, num_slots, strict=False, load=None):
    T, K = topk_ids.shape
    token = torch.arange(T, device=topk_ids.device).unsqueeze(1).expand(T, K)
    cnt = logcnt[topk_ids]
    if strict and bool((cnt == 0).any()):
        e = int(topk_ids[cnt == 0][0])
        raise RuntimeError(f"route_to_slots: expert {e} has no live replica (degraded='raise')")
    if load is not None:
        load.index_add_(0, topk_ids.flatten(), torch.ones_like(topk_ids.flatten()))
    replica = token % cnt.clamp(min=1)
    slot_ids = torch.where(cnt > 0, log2phy[topk_ids, replica], torch.full_like(topk_ids, -1))
    key = torch.where(slot_ids < 0, num_slots, slot_ids).flatten()
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_slots + 1)[:num_slots]
    offsets = torch.zeros(num_slots + 1, dtype=torch.long, device=topk_ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return slot_ids, order, offsets


def grouped_swiglu_reference(x, offsets, w13, w2):
    out = torch.zeros_like(x)
    inter = w13.shape[1] // 2
    bounds = offsets.tolist()
    for s in range(w13.shape[0]):
        a, b = bounds[s], bounds[s + 1]
        if b > a:
            h = x[a:b] @ w13[s].t()
            out[a:b] = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[s].t()
    return out
