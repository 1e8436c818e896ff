"""Expert placement that follows an ElasticGroup's membership, alike on every rank.

The placement of every rank is a deterministic function of the group's generation history: each
generation either lost members (repair: ``recovery.recover``) or admitted replacements (readmission:
``planner.readmit_plan``). ``recover_across_ranks`` applies, in order, every generation since the one
the rank's placement reflects (``group.placement_generation``). The inputs of each generation's edit
(the members' placement checksums, load counters, steps, and for a readmission the placement itself)
are exchanged through ``group.gather``: store traffic decided once per generation, so a survivor that
met a failure late, or in the middle of a repair, or a second failure during the first, applies the
same edits from the same inputs as everyone else. No collective runs here: a collective can complete
on some members and fail on others, which would leave their placements apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from moe_resilient import planner
from moe_resilient.group import ElasticGroup
from moe_resilient.layer import ResilientMoE
from moe_resilient.recovery import RecoveryReport, recover
from moe_resilient.shadow import ShadowStore, resilient_layers


class PlacementMismatchError(RuntimeError):
    """Ranks disagree on a layer's placement: routing would send tokens to the wrong slots."""


@dataclass
class MembershipChange:
    """What ``recover_across_ranks`` applied: ``lost`` and ``admitted`` ranks over every generation it
    went through; ``member_steps`` {rank: step} as each member of the last one posted it (survivors can
    meet a failure one step apart: a collective can complete on one member and fail on another);
    ``report`` of the last repair (None if there was none)."""

    lost: list[int] = field(default_factory=list)
    admitted: list[int] = field(default_factory=list)
    member_steps: dict[int, int] = field(default_factory=dict)
    report: RecoveryReport | None = None
    carried: dict[int, object] = field(default_factory=dict)  # each member's ``carry``, same on every member

    @property
    def step(self) -> int | None:
        """The step to go on from: the latest any member had reached."""
        return max(self.member_steps.values()) if self.member_steps else None


def _placement_checksums(layers: dict[str, ResilientMoE]) -> list[int]:
    """One polynomial hash per layer of its phy2log and active tensors."""
    sums = []
    for layer in layers.values():
        h = 0
        for v in layer.placement.phy2log.tolist() + layer.placement.active.long().tolist():
            h = (h * 1_000_003 + v + 2) % 67_108_859
        sums.append(h)
    return sums


def check_placement_consistent(layers: dict[str, ResilientMoE], group: ElasticGroup) -> None:
    """Compare every layer's placement across the members (one all-gather of checksums)."""
    sums = torch.tensor(_placement_checksums(layers), dtype=torch.float64)
    lo, hi = group.all_reduce(sums.clone(), "max"), -group.all_reduce(-sums, "max")
    bad = [name for i, name in enumerate(layers) if lo[i] != hi[i]]
    if bad:
        raise PlacementMismatchError(f"ranks disagree on the placement of layers {bad}")


def recover_across_ranks(model: nn.Module, group: ElasticGroup, *, step: int | None = None,
                         shadow: ShadowStore | None = None, topology: planner.Topology | None = None,
                         carry=None, **recover_kwargs) -> MembershipChange:
    """Bring this rank's placement up to ``group``'s generation, on every member alike: after a
    RankFailure (survivors), after ``step_boundary()`` admitted replacements (members), and on a
    replacement once ``start()`` returns. For a generation that lost members: ``recover`` with the
    members' summed load counters (this rank writes only the slots it owns). For one that admitted
    replacements: the placement of the previous generation's lowest member, then the joiners' slots
    back by the deterministic readmission plan, each target slot's owner loading its weights from
    ``shadow``. ``step``: where this rank stands (None on a replacement). ``carry``: any JSON value
    (the application's own state, e.g. the work each rank had in flight) posted with the inputs;
    ``change.carried`` holds every member's, alike on every member. ``recover_kwargs`` go to
    ``recover``. With no generation to catch up on, nothing changes."""
    layers = resilient_layers(model)
    topology = topology or planner.Topology(group.world_size, group.world_size)
    change = MembershipChange()
    for g in range(group.placement_generation + 1, group.generation + 1):
        before, now = set(group.members_of(g - 1)), set(group.members_of(g))
        lost, joiners = sorted(before - now), sorted(now - before)
        joining = group.rank in joiners
        mine = {"step": step, "carry": carry, "sums": None if joining else _placement_checksums(layers),
                "load": [layer.expert_load.tolist() for layer in layers.values()] if lost else None,
                "placement": [[layer.placement.phy2log.tolist(), layer.placement.active.tolist()]
                              for layer in layers.values()] if joiners and not joining else None}
        posted = {r: json.loads(v) for r, v in group.gather("membership", json.dumps(mine), g).items()}
        members = {r: p for r, p in posted.items() if p["sums"] is not None}
        bad = [name for i, name in enumerate(layers) if len({p["sums"][i] for p in members.values()}) > 1]
        if bad:
            raise PlacementMismatchError(f"ranks disagree on the placement of layers {bad} (generation {g})")
        if joiners:
            _readmit(layers, posted[min(members)]["placement"], joiners, shadow, group.rank, topology, joining)
        else:
            load = {name: torch.tensor([sum(p["load"][i][e] for p in members.values()) for e in range(
                layer.config.num_experts)]) for i, (name, layer) in enumerate(layers.items())} if lost else None
            change.report = recover(model, lost, local_rank=group.rank, load=load, shadow=shadow, topology=topology,
                                    **recover_kwargs)
        change.lost += lost
        change.admitted += [r for r in joiners if r not in change.admitted]
        change.member_steps = {r: p["step"] for r, p in posted.items() if p["step"] is not None}
        change.carried = {r: p["carry"] for r, p in posted.items()}
        group.placement_generation = g
    change.lost = sorted(set(change.lost))
    return change


def _readmit(layers: dict[str, ResilientMoE], placements: list, joiners: list[int], shadow: ShadowStore | None,
             rank: int, topology: planner.Topology, joining: bool) -> None:
    """Adopt ``placements`` ([phy2log, active] per layer, from the previous generation), then give the
    joiners slots back; each target slot's owner loads its weights from ``shadow``. A joining rank
    loads every slot it owns that the new placement routes to: what its fresh process holds there need
    not be the expert the group's placement names."""
    if shadow is None:
        raise ValueError("readmitting replacements needs the shadow store to load their experts from")
    for (name, layer), (phy2log, active) in zip(layers.items(), placements):
        p = layer.placement
        p.set_state(torch.tensor(phy2log), torch.tensor(active), allow_uncovered=True)
        plan = planner.readmit_plan(p.phy2log.numpy(), p.slot_rank.numpy(), p.active.numpy(), joiners,
                                    np.ones(layer.config.num_experts), topology)
        # every target slot is out of routing until the single commit below (a joiner's slot is on
        # a dead rank, any other is spare), so owners write weights first, then all flip at once
        targets = {int(t): int(e) for t, e, _, _ in plan.copies.tolist() if int(p.slot_rank[t]) == rank}
        if joining:
            targets.update({s: int(e) for s, e in enumerate(plan.phy2log.tolist()) if e >= 0
                            and int(p.slot_rank[s]) == rank})
        for target, expert in sorted(targets.items()):
            layer.experts.write_slot(target, *shadow.read_expert(name, expert))
        now_active = p.active.clone()
        now_active[joiners] = True
        p.set_state(plan.phy2log, now_active, allow_uncovered=True)  # may still be short
