"""ResilientMoE: a Mixture-of-Experts block whose expert placement is mutable runtime state.

forward: route (top-k logical experts) -> pick a live replica through the placement tensors and
group the (token, k) pairs by slot (one C++ op) -> grouped SwiGLU over slots (C++ op) -> weighted
combine. No Python control flow depends on tensor values, so ``torch.compile(fullgraph=True)``
captures it once and placement edits (in-place copies) never recompile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from moe_resilient import ops
from moe_resilient.experts import SlotExperts, SwiGLU
from moe_resilient.placement import ExpertPlacement, PlacementError


@dataclass(frozen=True)
class MoEConfig:
    """Shape and routing semantics of one MoE block.

    scoring: "softmax" (Mixtral, Qwen, OLMoE) or "sigmoid" (DeepSeek-V3).
    score_bias: a selection-only bias added to scores before top-k (DeepSeek ``e_score_correction_bias``).
    num_groups / topk_groups: group-limited routing (DeepSeek-V3); 1/1 disables it.
    shared_intermediate_size: size of an always-on shared SwiGLU expert (0: none);
    shared_expert_gate: scale it by sigmoid(Linear(H, 1)) as Qwen2-MoE does.
    router_dtype: compute router logits in this dtype (None: the input's; DeepSeek uses float32).
    degraded: what a step does for a top-k entry whose expert has no live replica:
      "renormalize" (default) drops it and rescales the remaining weights to the original top-k
      mass; "raise" fails the step with a RuntimeError naming the expert. Dead slots are never read.
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    num_slots: int | None = None
    world_size: int = 1
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    score_bias: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False
    router_dtype: torch.dtype | None = None
    static_placement: bool = False
    degraded: Literal["renormalize", "raise"] = "renormalize"

    def __post_init__(self):
        slots = self.num_experts if self.num_slots is None else self.num_slots
        problems = []
        if min(self.hidden_size, self.intermediate_size, self.num_experts) < 1:
            problems.append("hidden_size, intermediate_size and num_experts must be >= 1")
        if not 1 <= self.top_k <= self.num_experts:
            problems.append(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if slots < self.num_experts:
            problems.append(f"num_slots ({slots}) must be >= num_experts ({self.num_experts})")
        if self.scoring not in ("softmax", "sigmoid"):
            problems.append(f"scoring must be 'softmax' or 'sigmoid', got {self.scoring!r}")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            problems.append(f"num_groups ({self.num_groups}) must divide num_experts ({self.num_experts})")
        if not 1 <= self.topk_groups <= self.num_groups:
            problems.append(f"topk_groups must be in [1, num_groups={self.num_groups}]")
        if self.static_placement and slots != self.num_experts:
            problems.append("static_placement needs num_slots == num_experts")
        if self.degraded not in ("renormalize", "raise"):
            problems.append(f"degraded must be 'renormalize' or 'raise', got {self.degraded!r}")
        if problems:
            raise ValueError("invalid MoEConfig: " + "; ".join(problems))
        object.__setattr__(self, "num_slots", slots)


class TopKRouter(nn.Module):
    """Gate: hidden [T, H] -> (router_logits [T, E], topk_weights [T, K] float32, topk_ids [T, K])."""

    def __init__(self, config: MoEConfig, *, dtype=None, device=None):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(
            torch.empty(config.num_experts, config.hidden_size, dtype=config.router_dtype or dtype, device=device)
        )
        nn.init.normal_(self.weight, std=config.hidden_size**-0.5)
        if config.score_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts, device=device))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        x = x.reshape(-1, c.hidden_size)
        if c.router_dtype is not None:
            logits = F.linear(x.to(c.router_dtype), self.weight.to(c.router_dtype))
        else:
            logits = F.linear(x, self.weight)
        if c.scoring == "softmax":
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        else:
            scores = torch.sigmoid(logits.float())
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if c.num_groups > 1:  # keep only the experts of the best topk_groups groups
            grouped = choice.view(-1, c.num_groups, c.num_experts // c.num_groups)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
            group_idx = group_scores.topk(c.topk_groups, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
            keep = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, c.num_experts)
            choice = choice.masked_fill(~keep, float("-inf"))
        topk_ids = choice.topk(c.top_k, dim=-1, sorted=False).indices
        topk_weights = scores.gather(1, topk_ids)
        if c.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(-1, keepdim=True) + 1e-20)
        if c.routed_scaling_factor != 1.0:
            topk_weights = topk_weights * c.routed_scaling_factor
        return logits, topk_weights, topk_ids

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether the fused ops (route_tokens, moe_forward) may stand in for calling this module on x:
        serving (autograd off) on CPU or CUDA, softmax scoring with no groups, bias or separate router
        dtype, and no hooks to run (HF records router logits with a forward hook on the router). The config
        checks come first: after a step has streamed its experts, each attribute read costs microseconds."""
        c = self.config
        if c.scoring != "softmax" or c.num_groups != 1 or c.router_dtype not in (None, x.dtype):
            return False
        hooked = self._forward_hooks or self._forward_pre_hooks or _global_forward_hooks or _global_forward_pre_hooks
        serving = not torch.is_grad_enabled() and (x.is_cpu or x.is_cuda)
        return self.e_score_correction_bias is None and not hooked and serving


class ResilientMoE(nn.Module):
    """MoE block with indirect, mutable expert placement.

    Input [..., H] -> output [..., H] (plus router logits [T, E] when ``return_router_logits``).
    Submodules: ``gate`` (TopKRouter), ``experts`` (SlotExperts, [S, ...] stacked weights, or only this
    rank's slots once ``shard``ed),
    ``placement`` (ExpertPlacement), optional ``shared_expert`` and ``shared_expert_gate``.
    """

    def __init__(
        self,
        config: MoEConfig,
        *,
        phy2log=None,
        slot_rank=None,
        return_router_logits: bool = False,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.config = config
        self.return_router_logits = return_router_logits
        self.gate = TopKRouter(config, dtype=dtype, device=device)
        self.experts = SlotExperts(
            config.num_slots, config.hidden_size, config.intermediate_size, dtype=dtype, device=device
        )
        self.placement = ExpertPlacement(
            config.num_experts, config.num_slots, world_size=config.world_size, phy2log=phy2log, slot_rank=slot_rank
        )
        if device is not None:
            self.placement.to(device)
        self.shared_expert = None
        self.shared_expert_gate = None
        if config.shared_intermediate_size:
            self.shared_expert = SwiGLU(
                config.hidden_size, config.shared_intermediate_size, dtype=dtype, device=device
            )
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False, dtype=dtype, device=device)
        # ep_forward bound to a group by parallel.parallelize: (layer, x) -> (out, router_logits)
        self.expert_parallel = None
        # Tokens routed to each logical expert since the last reset (feeds rebalancing).
        self.register_buffer("expert_load", torch.zeros(config.num_experts, dtype=torch.long, device=device))
        # Replica slots start as copies of their expert's first slot.
        with torch.no_grad():
            for e in range(config.num_experts):
                slots = self.placement.slots_of(e)
                for s in slots[1:]:
                    self.experts.copy_slot(s, slots[0])

    # ----------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor):
        c = self.config
        if hidden_states.shape[-1] != c.hidden_size:
            raise ValueError(
                f"ResilientMoE expects hidden size {c.hidden_size}, got input of shape {list(hidden_states.shape)}"
            )
        if self.expert_parallel is not None:  # parallel.parallelize attached a group: dispatch, combine
            out, router_logits = self.expert_parallel(self, hidden_states)
            return (out, router_logits) if self.return_router_logits else out
        if self.experts.sharded:
            raise RuntimeError("this layer holds only its rank's expert slots: run it through its group "
                               "(moe_resilient.parallelize(model, group))")
        served = self._serve(hidden_states)
        if served is not None:
            out, router_logits = served
        else:
            x = hidden_states.reshape(-1, c.hidden_size)  # [T, H]
            router_logits, topk_weights, _, slot_ids, order, offsets = self.route(x)
            if torch.is_grad_enabled():
                routed = ops.gather_experts_combine(x, order, offsets, slot_ids, topk_weights, self.experts)
            else:  # the same in one op
                routed = ops.grouped_swiglu_combine(
                    x, order, offsets, slot_ids, topk_weights, self.experts.w13, self.experts.w2
                )
            out = self.add_shared_expert(x, routed).reshape(hidden_states.shape)
        return (out, router_logits) if self.return_router_logits else out

    def _serve(self, x: torch.Tensor):
        """Serving (gate.fusable): the whole block in one op call -> (out [..., H], router_logits [T, E]);
        None where the gate must run as a module. Reads the submodules' tensors from their dicts: right
        after a step has streamed its experts through the caches, every nn.Module attribute lookup (a
        Python call) costs ~10 us, and the dozen here were an eighth of a 1-token bf16 step."""
        gate = self._modules["gate"]
        if not gate.fusable(x):
            return None
        c, weights, placement = self.config, self._modules["experts"]._parameters, self._modules["placement"]._buffers
        log2phy, logcnt = (None, None) if c.static_placement else (placement["log2phy"], placement["logcnt"])
        out, logits = ops.moe_forward(
            x, gate._parameters["weight"], c.top_k, c.norm_topk_prob, log2phy, logcnt, c.num_slots,
            c.degraded == "raise", weights["w13"], weights["w2"], c.routed_scaling_factor, self._buffers["expert_load"],
        )
        return self.add_shared_expert(x, out), logits

    def route(self, x: torch.Tensor):
        """x [T, H] -> (router_logits [T, E], topk_weights [T, K], topk_ids [T, K], slot_ids [T, K],
        order [T*K], offsets [S+1]): top-k, live replica per pair, pairs grouped by slot. Counts
        the load of each logical expert on the way."""
        c, p = self.config, self.placement
        log2phy, logcnt = (None, None) if c.static_placement else (p.log2phy, p.logcnt)
        strict, load = c.degraded == "raise", self.expert_load  # load: counted in place, compile-safe
        if self.gate.fusable(x):  # serving: one call for the gate's six and route_to_slots
            logits, topk_weights, *rest = ops.route_tokens(
                x, self.gate.weight, c.top_k, c.norm_topk_prob, log2phy, logcnt, c.num_slots, strict, load
            )
            if c.routed_scaling_factor != 1.0:
                topk_weights = topk_weights * c.routed_scaling_factor
            return (logits, topk_weights, *rest)
        router_logits, topk_weights, topk_ids = self.gate(x)
        routed = ops.route_to_slots(topk_ids, log2phy, logcnt, c.num_slots, strict, load)
        return (router_logits, topk_weights, topk_ids, *routed)

    def add_shared_expert(self, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """routed [..., H] plus the shared expert's output on x [..., H] (sigmoid-gated if configured)."""
        if self.shared_expert is None:
            return routed
        shared = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return routed + shared

    # ----------------------------------------------------------------------------------- sharding
    def owned_slots(self, rank: int) -> range:
        """The slots ``rank`` owns (``placement.slot_rank``): one contiguous block, as
        ``planner.initial_placement`` numbers them (else ValueError), or none (``range(0)``: a rank
        that runs no expert, such as an attention worker of disaggregated serving)."""
        if not 0 <= rank < self.placement.world_size:
            raise ValueError(f"rank {rank} is outside this layer's world_size {self.placement.world_size}")
        owned = torch.nonzero(self.placement.slot_rank == rank).flatten().tolist()
        if not owned:
            return range(0)
        if owned != list(range(owned[0], owned[-1] + 1)):
            raise ValueError(f"rank {rank}'s slots {owned} are not one contiguous block; number slots rank by rank")
        return range(owned[0], owned[-1] + 1)

    def shard(self, rank: int) -> None:
        """Keep only the expert slots ``rank`` owns (``owned_slots``) and free the others' weights. The
        placement tables stay global. Irreversible: the other slots now live on their owners."""
        self.experts.keep(self.owned_slots(rank))

    # ----------------------------------------------------------------------------------- statistics
    def read_load(self, reset: bool = False) -> torch.Tensor:
        """[E] tokens routed to each logical expert since the last reset (a copy)."""
        load = self.expert_load.clone()
        if reset:
            self.expert_load.zero_()
        return load

    def memory_overhead(self) -> dict:
        """Bytes of expert slots beyond one copy per logical expert (redundant replicas and spares)."""
        per_slot = self.experts.slot_bytes
        held = self.placement.phy2log >= 0
        replicas = int(held.sum()) - int(torch.unique(self.placement.phy2log[held]).numel())
        spares = int((~held).sum())
        base = self.config.num_experts * per_slot
        return {
            "base_bytes": base,
            "replica_bytes": replicas * per_slot,
            "spare_bytes": spares * per_slot,
            "overhead": (replicas + spares) * per_slot / base,
            "held_bytes": len(self.experts.held) * per_slot,  # on this rank
        }

    # ----------------------------------------------------------------------------------- placement edits
    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2I, H], w2 [H, I]) of a live replica of ``expert`` (views, not copies)."""
        slots = [s for s in self.placement.slots_of(expert) if self.experts.holds(s)]
        if not slots:
            raise PlacementError(f"expert {expert} has no live replica on this rank")
        return self.experts.w13[self.experts.row(slots[0])], self.experts.w2[self.experts.row(slots[0])]

    @torch.no_grad()
    def load_logical_weights(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Load every logical expert (w13 [E, 2I, H], w2 [E, H, I]) into all slots that hold it."""
        E = self.config.num_experts
        want13, want2 = (E, *self.experts.w13.shape[1:]), (E, *self.experts.w2.shape[1:])
        if tuple(w13.shape) != want13 or tuple(w2.shape) != want2:
            raise ValueError(
                f"logical expert weights w13 {list(w13.shape)}, w2 {list(w2.shape)}; expected {list(want13)}, {list(want2)}"
            )
        slots = self.experts.held
        experts_of = self.placement.phy2log[slots.start:slots.stop]
        rows = torch.nonzero(experts_of >= 0).flatten()
        self.experts.w13[rows] = w13.to(self.experts.w13)[experts_of[rows]]
        self.experts.w2[rows] = w2.to(self.experts.w2)[experts_of[rows]]

    def add_replica(self, expert: int, slot: int, src_slot: int | None = None) -> None:
        """Copy ``expert`` from a live replica (``src_slot``, default its first) into ``slot``, then route to it."""
        if src_slot is None:
            w13, w2 = self.expert_weights(expert)
            self.load_expert(expert, slot, w13, w2)
            return
        if src_slot not in self.placement.slots_of(expert):
            raise PlacementError(f"slot {src_slot} is not a live replica of expert {expert}")
        if self.experts.holds(slot):
            self.experts.row(src_slot)  # a copy from another rank's slot needs peer transfer
        self._edit(slot, expert, lambda: self.experts.copy_slot(slot, src_slot))

    def move_expert(self, expert: int, dst_slot: int, src_slot: int | None = None) -> None:
        """Move one replica of ``expert`` from ``src_slot`` (default: its first live slot) to ``dst_slot``."""
        p = self.placement
        src = p.slots_of(expert)[0] if src_slot is None else src_slot
        p._check_slot(src)
        if int(p.phy2log[src]) != expert:
            raise PlacementError(f"slot {src} does not hold expert {expert}")
        if src == dst_slot:
            raise PlacementError(f"cannot move expert {expert} onto its own slot {src}")
        if self.experts.holds(dst_slot):
            self.experts.row(src)  # a copy from another rank's slot needs peer transfer
        self._edit(dst_slot, expert, lambda: self.experts.copy_slot(dst_slot, src), vacate=src)

    def load_expert(self, expert: int, slot: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Write external weights of ``expert`` (w13 [2I, H], w2 [H, I]) into ``slot``, then route to it."""
        if w13.shape != self.experts.w13.shape[1:] or w2.shape != self.experts.w2.shape[1:]:
            raise ValueError(
                f"weights for expert {expert} have shapes w13 {list(w13.shape)}, w2 {list(w2.shape)}; "
                f"slots take w13 {list(self.experts.w13.shape[1:])}, w2 {list(self.experts.w2.shape[1:])}"
            )
        self._edit(slot, expert, lambda: self.experts.write_slot(slot, w13, w2))

    def write_expert(self, expert: int, slot: int, writer) -> None:
        """Let ``writer(w13 [2I, H], w2 [H, I])`` write ``expert``'s weights into ``slot``'s views in
        place, then route to it. If ``writer`` raises, ``slot`` stays out of routing."""
        def write():
            writer(*self.experts.slot_weights(slot))
            self.experts.reset_state(slot)

        self._edit(slot, expert, write)

    def _edit(self, slot: int, expert: int, write, vacate: int | None = None) -> None:
        """Validate the final placement, take ``slot`` out of routing, write its weights (if this rank
        holds the slot: under expert parallelism its owner writes), then flip the placement (``slot`` ->
        ``expert``, ``vacate`` -> empty) in one commit."""
        p = self.placement
        if self.config.static_placement:
            raise PlacementError("this layer was built with static_placement=True; its placement is constant")
        p._check_slot(slot)
        p._check_expert(expert)
        if not bool(p.active[p.slot_rank[slot]]):
            raise PlacementError(f"slot {slot} is on dead rank {int(p.slot_rank[slot])}; it cannot serve")
        final = p.phy2log.cpu().clone()
        final[slot] = expert
        if vacate is not None:
            final[vacate] = -1
        uncovered_before = p.uncovered()  # restoring one expert need not cover the others first
        active = p.active.cpu()
        derived = p._derive(final, active, uncovered_before)  # the final state, validated once
        if int(p.phy2log[slot]) >= 0:
            p.clear(slot, allow_uncovered=True)
        if self.experts.holds(slot):
            write()
        p._commit(final, active, uncovered_before, derived)

    # ----------------------------------------------------------------------------------- training
    @torch.no_grad()
    def reduce_replica_grads(self) -> None:
        """Give every replica the summed gradient of its logical expert, so replicas stay identical."""
        if self.experts.sharded:
            raise RuntimeError("replica gradients of a sharded layer span ranks: sum them across its group")
        held = torch.nonzero(self.placement.phy2log >= 0).flatten()
        experts_of = self.placement.phy2log[held]
        for param in (self.experts.w13, self.experts.w2):
            if param.grad is None:
                continue
            summed = torch.zeros((self.config.num_experts, *param.shape[1:]), dtype=param.grad.dtype,
                                 device=param.grad.device)
            summed.index_add_(0, experts_of, param.grad[held])
            param.grad[held] = summed[experts_of]

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"hidden={c.hidden_size}, intermediate={c.intermediate_size}, experts={c.num_experts}, "
            f"slots={c.num_slots}, top_k={c.top_k}, scoring={c.scoring}"
        )
