"""A plain reference MoE: loop over logical experts, HF-style. Used as ground truth in tests."""

import torch
import torch.nn.functional as F

from moe_resilient import ResilientMoE


def logical_weights(layer: ResilientMoE) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [E, 2I, H], w2 [E, H, I]) taken from each expert's first live slot."""
    slots = [layer.placement.slots_of(e)[0] for e in range(layer.config.num_experts)]
    return layer.experts.w13[slots], layer.experts.w2[slots]


def reference_moe(layer: ResilientMoE, x: torch.Tensor, w13=None, w2=None) -> torch.Tensor:
    """x [..., H] -> [..., H], computed expert by expert with ``layer``'s router and shared expert."""
    if w13 is None:
        w13, w2 = logical_weights(layer)
    flat = x.reshape(-1, x.shape[-1])
    _, topk_weights, topk_ids = layer.gate(flat)
    inter = w13.shape[1] // 2
    out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
    for e in range(w13.shape[0]):
        token, k = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        h = flat[token] @ w13[e].t()
        y = (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].t()
        out = out.index_add(0, token, y.float() * topk_weights[token, k, None])
    out = out.to(x.dtype)
    if layer.shared_expert is not None:
        shared = layer.shared_expert(flat)
        if layer.shared_expert_gate is not None:
            shared = torch.sigmoid(layer.shared_expert_gate(flat)) * shared
        out = out + shared
    return out.reshape(x.shape)
