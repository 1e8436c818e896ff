"""Expert parallelism for a whole model in one call: ``parallelize(model, group)``.

After it, every ResilientMoE layer of ``model`` holds only the expert slots its rank owns, and its own
forward is expert-parallel (route -> dispatch -> local experts -> combine, dispatch.py), so
``model(x)``, a training step and ``model.generate()`` run unchanged on every rank, each on its own
tokens. A peer lost mid-forward raises RankFailure; ``StepRunner`` repairs every layer alike and
re-runs the step, and admits replacements at step boundaries.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_resilient.dispatch import Loopback, ep_forward
from moe_resilient.elastic import MembershipChange, rebalance_across_ranks, recover_across_ranks
from moe_resilient.recovery import RecoveryReport
from moe_resilient.group import ElasticGroup, RankFailure
from moe_resilient.layer import ResilientMoE
from moe_resilient.shadow import resilient_layers


def parallelize(model: nn.Module, group: ElasticGroup, *, compiled: bool = False) -> dict[str, ResilientMoE]:
    """Shard every ResilientMoE layer of ``model`` to ``group.rank``'s slots and route its forward
    through ``group``. ``compiled``: each layer's forward, exchanges included, runs as one compiled
    graph (``dispatch.compiled_forward``: no recompile on a batch size, membership or placement
    change), compiled here on synthetic rows; call it before ``group.start()``, so that no peer waits out a
    first compile (seconds) in a collective. Every layer's placement must span ``group.world_size``
    ranks with each rank's slots contiguous. Checks every layer before it changes any; returns the
    layers by name."""
    layers = resilient_layers(model)
    if not layers:
        raise ValueError("the model holds no ResilientMoE layer (swap its MoE blocks first: hf.swap_moe_blocks)")
    for name, layer in layers.items():
        if layer.placement.world_size != group.world_size:
            raise ValueError(f"layer {name} is placed over {layer.placement.world_size} ranks, the group has "
                             f"{group.world_size}")
        if layer.experts.sharded:
            raise ValueError(f"layer {name} is already sharded")
        try:
            layer.owned_slots(group.rank)
        except ValueError as exc:
            raise ValueError(f"layer {name}: {exc}") from None

    # Outside any enclosing torch.compile graph: with ``compiled`` it runs as dispatch's own graph, whose
    # unbacked row counts an enclosing graph would specialise.
    @torch.compiler.disable
    def forward(layer: ResilientMoE, x):
        return ep_forward(layer, x, group, compiled=compiled, return_router_logits=True)

    for layer in layers.values():
        layer.shard(group.rank)
        layer.expert_parallel = forward
        if compiled:
            with torch.no_grad():
                ep_forward(layer, layer.experts.w13.new_zeros(2, layer.config.hidden_size),
                           Loopback(group.world_size, layer.experts.held), compiled=True)
    return layers


@torch.no_grad()
def reduce_gradients(model: nn.Module, group: ElasticGroup, *, average: bool = True) -> None:
    """Training under expert parallelism, after backward: make each rank's gradients those of the whole
    step. Dense parameters (attention, routers, embeddings: the same on every rank) are summed over the
    members. A slot's gradient already holds every rank's tokens routed to it (the all-to-all's
    backward brings them to its owner); the replicas of an expert, on this rank or others, then each
    get the expert's summed gradient, so replicas stay identical. ``average`` divides by the number of
    members: the gradient of the members' mean loss. A missing gradient counts as zero, so every rank
    steps the same parameters. One all-reduce; RankFailure if a member is lost."""
    layers = resilient_layers(model).values()
    slot_params = {id(p) for layer in layers for p in (layer.experts.w13, layer.experts.w2)}
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    dense = [p for p in params if id(p) not in slot_params]
    parts, experts = [p.grad.reshape(-1) for p in dense], []
    for layer in layers:
        pl, held = layer.placement, layer.experts.held
        experts_of = pl.phy2log[held.start:held.stop]
        routed = torch.nonzero((experts_of >= 0) & pl.active[pl.slot_rank[held.start:held.stop]]).flatten()
        mine, inverse = torch.unique(experts_of[routed], return_inverse=True)
        # only experts with routed replicas on two ranks or more need the all-reduce
        live = (pl.phy2log >= 0) & pl.active[pl.slot_rank]
        ranks_of = torch.zeros(layer.config.num_experts, pl.world_size, dtype=torch.bool)
        ranks_of[pl.phy2log[live], pl.slot_rank[live]] = True
        spanning = torch.nonzero(ranks_of.sum(1) > 1).flatten()
        position = torch.full((layer.config.num_experts,), -1, dtype=torch.long)
        position[spanning] = torch.arange(len(spanning))
        shared = position[mine] >= 0
        for param in (layer.experts.w13, layer.experts.w2):
            sums = param.new_zeros((len(mine), *param.shape[1:])).index_add_(0, inverse, param.grad[routed])
            wide = param.new_zeros((len(spanning), *param.shape[1:]))
            wide[position[mine[shared]]] = sums[shared]
            parts.append(wide.reshape(-1))
            experts.append((param, routed, inverse, sums, shared, position[mine[shared]], wide.shape))
    flat = torch.cat(parts)
    group.all_reduce(flat)
    at = 0
    for p in dense:
        p.grad.copy_(flat[at: at + p.numel()].view_as(p))
        at += p.numel()
    for param, routed, inverse, sums, shared, rows, shape in experts:
        n = shape.numel()
        sums[shared] = flat[at: at + n].view(shape)[rows]
        at += n
        param.grad.zero_()[routed] = sums[inverse]  # unrouted slots (spares, dead ranks' copies) stay 0
    if average:
        for p in params:
            p.grad.div_(len(group.members))


class StepRunner:
    """Runs each step of a loop through failures: ``out = runner(fn, *args)`` on every member, once per
    step. A RankFailure anywhere in ``fn`` (any layer, forward or backward) repairs every layer alike
    (``elastic.recover_across_ranks``) and re-runs ``fn``. A step ends with ``group.commit``, which
    succeeds on every member or on none, so every member releases each step's result exactly once and
    all stand at the same step. Replacements are admitted at step boundaries; on a replacement the
    runner takes the members' placement and step when it is built. ``recover_kwargs`` go to
    ``recover`` (``shadow_current=True`` when serving fixed weights). ``changes``: every membership
    change it applied.

    Training: with ``optimizer`` (built after ``parallelize``), each attempt starts from zero
    gradients, ``fn`` runs forward and backward, ``reduce_gradients`` completes them, and the optimizer
    steps once the step has committed, on every member alike. Its per-slot state moves with the
    weights when a repair copies a replica (``SlotExperts.track_optimizer``); an expert restored from
    the shadow starts from zero state (``report.state_resets``). A replacement cannot join a training
    run: its dense weights and optimizer state would be stale (restart the run from a checkpoint)."""

    def __init__(self, model: nn.Module, group: ElasticGroup, *, shadow=None, optimizer=None, **recover_kwargs):
        if optimizer is not None and group.joined:
            raise RuntimeError(f"rank {group.rank} joined a running group: a replacement cannot join a training run "
                               "(its dense weights and optimizer state would be stale); restart from a checkpoint")
        self.model, self.group, self.shadow, self.recover_kwargs = model, group, shadow, recover_kwargs
        self.optimizer = optimizer
        for layer in resilient_layers(model).values():
            layer.experts.track_optimizer(optimizer)
        self.step = 0
        self.changes: list[MembershipChange] = []
        if group.joined:
            self.step = self._catch_up(None).step or 0

    def rebalance(self) -> RecoveryReport | None:
        """Re-place every layer's experts for the load the members have routed since the last one
        (``elastic.rebalance_across_ranks``); call it on every member between the same two steps. A
        failure during it changes no placement; the loss is repaired and None returned."""
        try:
            return rebalance_across_ranks(self.model, self.group, f"step{self.step}", shadow=self.shadow,
                                          shadow_current=bool(self.recover_kwargs.get("shadow_current")))
        except RankFailure:
            self._catch_up(self.step)
            return None

    def _catch_up(self, step: int | None) -> MembershipChange:
        change = recover_across_ranks(self.model, self.group, step=step, shadow=self.shadow, **self.recover_kwargs)
        self.changes.append(change)
        return change

    def __call__(self, fn, *args, **kwargs):
        while True:
            try:
                if self.optimizer is not None:
                    self.optimizer.zero_grad(set_to_none=True)
                out = fn(*args, **kwargs)
                if self.optimizer is not None:
                    reduce_gradients(self.model, self.group)
                self.group.commit(f"step{self.step}")
                break
            except RankFailure:
                self._catch_up(self.step)
        if self.optimizer is not None:
            self.optimizer.step()
        self.step += 1
        while True:
            try:
                if self.group.step_boundary():
                    self._catch_up(self.step)
                return out
            except RankFailure:
                self._catch_up(self.step)
