"""The public op wrappers over ``torch.ops.moe_resilient``, with the fake kernels that let
torch.compile trace them and the autograd of the differentiable ones beside them."""

from __future__ import annotations

import torch

try:
    from moe_resilient import _C  # loading the library registers torch.ops.moe_resilient
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "moe_resilient._C is not built; install with `pip install --no-build-isolation -e .`"
    ) from exc

from moe_resilient.ops import cuda  # noqa: E402

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
    (token, k) order and ``combine`` (``gather_experts_combine``), in one call."""
    return _ops.grouped_swiglu_combine(x, order, offsets, slot_ids, topk_weights, w13, w2)


def moe_forward(
    x: torch.Tensor, gate_weight: torch.Tensor, k: int, normalize: bool, log2phy: torch.Tensor | None,
    logcnt: torch.Tensor | None, num_slots: int, strict: bool, w13: torch.Tensor, w2: torch.Tensor,
    scaling: float = 1.0, load: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference only (no autograd): a softmax-routed MoE block in one call, route_tokens then
    grouped_swiglu_combine with the top-k weights times ``scaling``. x [..., H] (T tokens), gate weight
    [E, H], w13 [S, 2I, H], w2 [S, H, I] -> (out [..., H], router_logits [T, E]). Eager CPU calls skip
    the dispatcher (csrc/eager_calls.cpp): after a step has streamed its experts through the caches, its
    door costs ~25 us more per call. Eager CUDA calls likewise call cuda.moe_forward directly."""
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        if x.is_cpu:
            return _C.moe_forward(x, gate_weight, k, normalize, log2phy, logcnt, num_slots, strict, w13, w2,
                                  float(scaling), load)
        if x.is_cuda:  # the CUDA kernel itself, without the dispatcher's way back into Python
            return cuda.moe_forward(x, gate_weight, k, normalize, log2phy, logcnt, num_slots, strict, w13, w2,
                                    scaling, load)
    return _ops.moe_forward(x, gate_weight, k, normalize, log2phy, logcnt, num_slots, strict, w13, w2, scaling, load)


@torch.library.register_fake("moe_resilient::moe_forward")
def _moe_forward_fake(x, gate_weight, k, normalize, log2phy, logcnt, num_slots, strict, w13, w2, scaling=1.0,
                      load=None):
    torch._check(x.shape[-1] == w13.shape[2], lambda: "moe_forward: hidden size mismatch")
    return torch.empty_like(x), x.new_empty((x.numel() // x.shape[-1], gate_weight.shape[0]))


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
