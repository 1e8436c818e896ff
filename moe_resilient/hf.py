"""Swap ResilientMoE in for the MoE blocks of existing models.

Hugging Face transformers: Mixtral, Qwen2-MoE (gated shared expert), Qwen3-MoE, OLMoE, Qwen3-Next and
DeepSeek-V2/V3 style blocks, from the v5 fused layout (``experts.gate_up_proj [E, 2I, H]``,
``experts.down_proj [E, H, I]``, ``gate.weight [E, H]``) or the v4 per-expert layout
(``experts[i].w1/w2/w3`` or ``experts[i].gate_proj/up_proj/down_proj``).

torchtitan / gpt-fast: stacked ``w1 [E, I, H]``, ``w2 [E, H, I]``, ``w3 [E, I, H]`` state dicts.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from moe_resilient.layer import MoEConfig, ResilientMoE


class UnsupportedMoEBlockError(TypeError):
    """A module looks like an MoE block but its class is not one we know how to take over."""


# class name -> routing family
_SOFTMAX_BLOCKS = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen",
    "Qwen3MoeSparseMoeBlock": "qwen",
    "Qwen3NextSparseMoeBlock": "qwen",
    "OlmoeSparseMoeBlock": "qwen",
}
_DEEPSEEK_BLOCKS = {"DeepseekV3MoE", "DeepseekV2Moe"}


def supported_blocks() -> list[str]:
    return sorted([*_SOFTMAX_BLOCKS, *_DEEPSEEK_BLOCKS])


def _looks_like_moe_block(module: nn.Module) -> bool:
    names = dict(module.named_children())
    return "experts" in names and ("gate" in names or "router" in names)


def swap_moe_blocks(model: nn.Module, *, num_slots: int | None = None, world_size: int = 1,
                    num_replicas: int | None = None, expert_ranks=None) -> list[str]:
    """Replace every supported MoE block of ``model`` in place with an equivalent ResilientMoE.

    ``num_slots`` per layer (default: one per expert) leaves room for replicas and spares. Over
    ``world_size`` ranks (expert parallelism) with num_slots a multiple of it, slots are numbered rank
    by rank and ``num_replicas`` of them (default: all) hold experts: each expert once, then replicas
    on other ranks, so that losing a rank leaves as many experts covered as the slots allow; the rest
    are spare, spread over the ranks. ``expert_ranks`` (default: all): the ranks that hold slots, the
    others none (attention workers of disaggregated serving); num_slots is then a multiple of their
    number.
    Returns the qualified names of the replaced modules. Raises UnsupportedMoEBlockError, naming
    the class, for a block that has experts and a router but is not supported (nothing is swapped
    then: the check runs over the whole model first).
    """
    targets = []
    for name, module in model.named_modules():
        if isinstance(module, ResilientMoE):
            continue
        cls = type(module).__name__
        if cls in _SOFTMAX_BLOCKS or cls in _DEEPSEEK_BLOCKS:
            targets.append((name, module))
        elif _looks_like_moe_block(module):
            raise UnsupportedMoEBlockError(
                f"{name or 'model'} is a {cls}, which moe_resilient cannot swap; supported: {supported_blocks()}"
            )
    model_config = getattr(model, "config", None)
    for name, block in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, from_hf_block(block, model_config, num_slots=num_slots, world_size=world_size,
                                            num_replicas=num_replicas, expert_ranks=expert_ranks))
    return [name for name, _ in targets]


def from_hf_block(block: nn.Module, model_config=None, *, num_slots=None, world_size: int = 1,
                  num_replicas: int | None = None, expert_ranks=None) -> ResilientMoE:
    """Build a ResilientMoE equal to one Hugging Face MoE block (weights copied)."""
    cls = type(block).__name__
    w13, w2 = _hf_expert_weights(block)
    E, two_i, H = w13.shape
    router = block.gate
    router_weight = router.weight
    cfg = model_config

    def opt(name, default):
        for src in (router, block, cfg):
            if src is not None and hasattr(src, name):
                return getattr(src, name)
        return default

    top_k = opt("top_k", None) or opt("num_experts_per_tok", None)
    shared, shared_gate = None, None
    if cls in _SOFTMAX_BLOCKS:
        family = _SOFTMAX_BLOCKS[cls]
        kwargs = {"scoring": "softmax", "norm_topk_prob": True if family == "mixtral" else opt("norm_topk_prob", False)}
        shared = getattr(block, "shared_expert", None)
        shared_gate = getattr(block, "shared_expert_gate", None)
    elif cls in _DEEPSEEK_BLOCKS:
        kwargs = {
            "scoring": "sigmoid",
            "norm_topk_prob": opt("norm_topk_prob", True),
            "routed_scaling_factor": float(opt("routed_scaling_factor", 1.0)),
            "score_bias": getattr(router, "e_score_correction_bias", None) is not None,
            "num_groups": int(opt("num_group", None) or opt("n_group", 1)),
            "topk_groups": int(opt("topk_group", 1)),
            "router_dtype": torch.float32,
        }
        shared = getattr(block, "shared_experts", None)
    else:
        raise UnsupportedMoEBlockError(f"{cls} is not a supported MoE block; supported: {supported_blocks()}")
    config = MoEConfig(
        hidden_size=H,
        intermediate_size=two_i // 2,
        num_experts=E,
        top_k=int(top_k),
        num_slots=num_slots,
        world_size=world_size,
        shared_intermediate_size=shared.down_proj.weight.shape[1] if shared is not None else 0,
        shared_expert_gate=shared_gate is not None,
        **kwargs,
    )
    phy2log = slot_rank = None
    holders = sorted(set(expert_ranks)) if expert_ranks is not None else list(range(world_size))
    if not holders or holders[0] < 0 or holders[-1] >= world_size:
        raise ValueError(f"expert_ranks {expert_ranks} must be ranks of 0..{world_size - 1}")
    n = len(holders)
    if n < world_size and config.num_slots % n:
        raise ValueError(f"{config.num_slots} slots do not divide over the {n} expert ranks {holders}")
    if world_size > 1 and config.num_slots % n == 0:  # replicas on distinct ranks, every slot used
        from moe_resilient import planner

        plan, local = planner.initial_placement(np.ones(E), planner.Topology(n, n), config.num_slots // n,
                                                num_replicas)
        phy2log, slot_rank = plan.phy2log, np.asarray(holders)[local]
    layer = ResilientMoE(config, phy2log=phy2log, slot_rank=slot_rank, dtype=w13.dtype, device=w13.device)
    with torch.no_grad():
        layer.gate.weight.copy_(router_weight)
        if config.score_bias:
            layer.gate.e_score_correction_bias.copy_(router.e_score_correction_bias)
        layer.load_logical_weights(w13, w2)
        if shared is not None:
            layer.shared_expert.load_state_dict(
                {k: shared.get_parameter(k) for k in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")}
            )
        if shared_gate is not None:
            layer.shared_expert_gate.weight.copy_(shared_gate.weight)
    _keep_router_recordable(layer.gate, router)
    return layer


def _hf_expert_weights(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [E, 2I, H], w2 [E, H, I]) from the v5 fused or the v4 per-expert layout."""
    experts = block.experts
    if hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
        return experts.gate_up_proj.detach(), experts.down_proj.detach()
    if isinstance(experts, nn.ModuleList) and len(experts):
        first = experts[0]
        if all(hasattr(first, n) for n in ("w1", "w2", "w3")):  # Mixtral v4
            names = ("w1", "w3", "w2")
        elif all(hasattr(first, n) for n in ("gate_proj", "up_proj", "down_proj")):  # Qwen / OLMoE / DeepSeek v4
            names = ("gate_proj", "up_proj", "down_proj")
        else:
            raise UnsupportedMoEBlockError(f"{type(block).__name__}: unknown expert layout {type(first).__name__}")
        gate, up, down = ([getattr(e, n).weight.detach() for e in experts] for n in names)
        return torch.cat([torch.stack(gate), torch.stack(up)], dim=1), torch.stack(down)
    raise UnsupportedMoEBlockError(f"{type(block).__name__}: unknown experts container {type(experts).__name__}")


def _keep_router_recordable(new_router: nn.Module, old_router: nn.Module) -> None:
    """HF v5 records ``router_logits`` with hooks on modules of the router's class (output index 0,
    which our router also returns first). Make our router an instance of that class too, and carry
    over any hooks already installed."""
    old_cls = type(old_router)
    if old_cls is nn.Linear or isinstance(new_router, old_cls):
        return
    new_router.__class__ = type(f"Resilient{old_cls.__name__}", (type(new_router), old_cls), {})
    for hook_id, hook in old_router._forward_hooks.items():
        new_router._forward_hooks[hook_id] = hook


# ---------------------------------------------------------------------------------------------
# torchtitan / gpt-fast stacked layouts

_STACKED_KEYS = {
    # layout: (w1, w2, w3, router weight, optional selection bias)
    "torchtitan": ("experts.w1", "experts.w2", "experts.w3", "router.gate.weight", "expert_bias"),
    "gpt-fast": ("cond_ffn.w1", "cond_ffn.w2", "cond_ffn.w3", "gate.weight", None),
}


def load_stacked_state_dict(
    layer: ResilientMoE, state_dict: Mapping[str, torch.Tensor], prefix: str = "", *, layout: str = "torchtitan"
) -> None:
    """Load a torchtitan (``moe.experts.w1`` ...) or gpt-fast (``block_sparse_moe.cond_ffn.w1`` ...) MoE
    state dict into ``layer``. w1/w3 are [E, I, H] and w2 [E, H, I]; the older torchtitan layout
    (w1/w3 [E, H, I], w2 [E, I, H]) is recognised by shape and transposed. Shared experts
    (torchtitan ``shared_experts.w1/w2/w3.weight``) load into ``layer.shared_expert``.
    """
    if layout not in _STACKED_KEYS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(_STACKED_KEYS)}")
    k1, k2, k3, kr, kb = (prefix + k if k else None for k in _STACKED_KEYS[layout])
    missing = [k for k in (k1, k2, k3, kr) if k not in state_dict]
    if missing:
        raise KeyError(f"state dict lacks {missing} for layout {layout!r}")
    E, I, H = layer.config.num_experts, layer.config.intermediate_size, layer.config.hidden_size
    w1, w2, w3 = state_dict[k1], state_dict[k2], state_dict[k3]
    if w1.shape == (E, H, I) and w2.shape == (E, I, H) and H != I:  # legacy torchtitan: x @ w1
        w1, w2, w3 = w1.transpose(1, 2), w2.transpose(1, 2), w3.transpose(1, 2)
    if w1.shape != (E, I, H) or w3.shape != (E, I, H) or w2.shape != (E, H, I):
        raise ValueError(
            f"{layout} expert weights w1 {list(w1.shape)}, w2 {list(w2.shape)}, w3 {list(w3.shape)} do not match "
            f"experts={E}, hidden={H}, intermediate={I}"
        )
    with torch.no_grad():
        layer.gate.weight.copy_(state_dict[kr])
        if kb and kb in state_dict:
            if layer.gate.e_score_correction_bias is None:
                raise ValueError(f"{kb} present but the layer was built without score_bias")
            layer.gate.e_score_correction_bias.copy_(state_dict[kb])
        layer.load_logical_weights(torch.cat([w1, w3], dim=1), w2)
        shared_prefix = prefix + "shared_experts."
        if layer.shared_expert is not None and shared_prefix + "w1.weight" in state_dict:
            se = layer.shared_expert
            for ours, theirs in ((se.gate_proj, "w1"), (se.up_proj, "w3"), (se.down_proj, "w2")):
                ours.weight.copy_(state_dict[f"{shared_prefix}{theirs}.weight"])
