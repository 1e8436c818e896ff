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

from moe_resilient.dispatch import ep_forward
from moe_resilient.elastic import MembershipChange, recover_across_ranks
from moe_resilient.group import ElasticGroup, RankFailure
from moe_resilient.layer import ResilientMoE
from moe_resilient.shadow import resilient_layers


def parallelize(model: nn.Module, group: ElasticGroup, *, compiled: bool = False) -> dict[str, ResilientMoE]:
    """Shard every ResilientMoE layer of ``model`` to ``group.rank``'s slots and route its forward
    through ``group``. ``compiled``: the compute between the collectives runs as compiled graphs
    (``dispatch.compiled_stages``: no recompile on a batch size, membership or placement change).
    Every layer's placement must span ``group.world_size`` ranks with each rank's slots contiguous.
    Checks every layer before it changes any; returns the layers by name."""
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

    # Outside any enclosing torch.compile graph: the collectives are Python (a graph break anyway), and
    # with ``compiled`` the compute between them runs as dispatch's own compiled stages.
    @torch.compiler.disable
    def forward(layer: ResilientMoE, x):
        return ep_forward(layer, x, group, compiled=compiled, return_router_logits=True)

    for layer in layers.values():
        layer.shard(group.rank)
        layer.expert_parallel = forward
    return layers


class StepRunner:
    """Runs each step of a loop through failures: ``out = runner(fn, *args)`` on every member, once per
    step. A RankFailure anywhere in ``fn`` (any layer, forward or backward) repairs every layer alike
    (``elastic.recover_across_ranks``) and re-runs ``fn``. A step ends with ``group.commit``, which
    succeeds on every member or on none, so every member releases each step's result exactly once and
    all stand at the same step. Replacements are admitted at step boundaries; on a replacement the
    runner takes the members' placement and step when it is built. ``recover_kwargs`` go to
    ``recover`` (``shadow_current=True`` when serving fixed weights). ``changes``: every membership
    change it applied."""

    def __init__(self, model: nn.Module, group: ElasticGroup, *, shadow=None, **recover_kwargs):
        self.model, self.group, self.shadow, self.recover_kwargs = model, group, shadow, recover_kwargs
        self.step = 0
        self.changes: list[MembershipChange] = []
        if group.joined:
            self.step = self._catch_up(None).step or 0

    def _catch_up(self, step: int | None) -> MembershipChange:
        change = recover_across_ranks(self.model, self.group, step=step, shadow=self.shadow, **self.recover_kwargs)
        self.changes.append(change)
        return change

    def __call__(self, fn, *args, **kwargs):
        while True:
            try:
                out = fn(*args, **kwargs)
                self.group.commit(f"step{self.step}")
                break
            except RankFailure:
                self._catch_up(self.step)
        self.step += 1
        while True:
            try:
                if self.group.step_boundary():
                    self._catch_up(self.step)
                return out
            except RankFailure:
                self._catch_up(self.step)
