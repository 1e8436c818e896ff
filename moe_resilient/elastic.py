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
from moe_resilient.group import ElasticGroup, RankFailure
from moe_resilient.layer import ResilientMoE
from moe_resilient.recovery import RecoveryReport, recover
from moe_resilient.shadow import ShadowStore, resilient_layers
from moe_resilient.transfer import PeerCopy, transfer, write


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
    back by the deterministic readmission plan, each target slot filled from a live replica (over
    the group when it is on another rank) or from ``shadow``. ``step``: where this rank stands (None on a replacement). ``carry``: any JSON value
    (the application's own state, e.g. the work each rank had in flight) posted with the inputs;
    ``change.carried`` holds every member's, alike on every member. ``recover_kwargs`` go to
    ``recover``. With no generation to catch up on, nothing changes."""
    layers = resilient_layers(model)
    topology = topology or group.topology()
    change = MembershipChange()
    g = group.placement_generation
    while g < group.generation:  # a peer transfer cut by a new failure moves the group on meanwhile
        g += 1
        peers = group if g == group.generation else None  # the members of an older generation may be gone
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
            change.report = _readmit(layers, posted[min(members)]["placement"], joiners, shadow,
                                     bool(recover_kwargs.get("shadow_current")), group.rank, topology, peers)
        else:
            load = {name: torch.tensor([sum(p["load"][i][e] for p in members.values()) for e in range(
                layer.config.num_experts)]) for i, (name, layer) in enumerate(layers.items())} if lost else None
            change.report = recover(model, lost, local_rank=group.rank, load=load, shadow=shadow, topology=topology,
                                    peers=peers, **recover_kwargs)
        change.lost += lost
        change.admitted += [r for r in joiners if r not in change.admitted]
        change.member_steps = {r: p["step"] for r, p in posted.items() if p["step"] is not None}
        change.carried = {r: p["carry"] for r, p in posted.items()}
        group.placement_generation = g
    change.lost = sorted(set(change.lost))
    return change


def pick_source(expert: int, target: int, phy2log, owner, active, topology: planner.Topology, peers: bool,
                shadow: ShadowStore | None, shadow_current: bool) -> tuple[int | None, int]:
    """(source kind, source slot or -1 for the shadow) of a copy of ``expert`` into slot ``target``: the
    cheapest of its live replicas this rank can read (any member's with ``peers``) and the shadow when
    it is current (or when the expert has no live replica at all); (None, -1) when there is none.
    Every member decides alike from the same tables."""
    cost = topology.seconds_per_byte
    live = [s for s, e in enumerate(phy2log) if e == expert and active[owner[s]]]
    options = [(cost[planner.peer_kind(topology, owner[s], owner[target])], s) for s in live
               if peers or owner[s] == owner[target]]
    if shadow is not None and (shadow_current or not live):
        options.append((cost[planner.SOURCE_SHADOW_MEMORY], -1))
    if not options:
        return None, -1
    src = min(options)[1]
    return (planner.SOURCE_SHADOW_MEMORY if src < 0 else planner.peer_kind(topology, owner[src], owner[target])), src


def _readmit(layers: dict[str, ResilientMoE], placements: list, joiners: list[int], shadow: ShadowStore | None,
             shadow_current: bool, rank: int, topology: planner.Topology, peers: ElasticGroup | None
             ) -> RecoveryReport:
    """Adopt ``placements`` ([phy2log, active] per layer, from the previous generation), then give the
    joiners slots back by the deterministic readmission plan. Each target slot is filled from its
    cheapest source (``pick_source``): a replica on its own rank, a replica on another member over
    ``peers`` (in one transfer for every layer), or ``shadow``; with none, it stays empty. Targets are
    out of routing (a joiner's slot is on a dead rank, any other is spare) until one flip per layer
    at the end; if the transfer fails, its copies come from the shadow, or stay empty without one."""
    report = RecoveryReport([])
    plans, local, deferred = {}, [], []
    for (name, layer), (phy2log, active) in zip(layers.items(), placements):
        owner = layer.placement.slot_rank.tolist()
        plans[name] = plan = planner.readmit_plan(phy2log, owner, active, joiners, np.ones(layer.config.num_experts),
                                                  topology)
        for target, expert, _, _ in plan.copies.tolist():
            kind, src = pick_source(expert, target, phy2log, owner, active, topology, peers is not None, shadow,
                                    shadow_current)
            if kind is None:  # no source that agrees with the live replicas: the slot stays empty
                plan.phy2log[target] = -1
                report.redundancy_skipped.setdefault(name, []).append(expert)
            elif src >= 0 and owner[src] != owner[target]:
                deferred.append((PeerCopy(name, expert, src, target), kind))
            elif owner[target] == rank:  # each target's owner writes it
                local.append((name, target, expert, kind, src))
    for (name, layer), (phy2log, active) in zip(layers.items(), placements):
        layer.placement.set_state(torch.tensor(phy2log), torch.tensor(active), allow_uncovered=True)
    for name, target, expert, kind, src in local:
        layer = layers[name]
        if src >= 0:
            layer.experts.copy_slot(target, src)
        else:
            layer.experts.write_slot(target, *shadow.read_expert(name, expert))
        report.bytes_by_source[planner.SOURCE_NAMES[kind]] += layer.experts.slot_bytes
        report.replicas_added += 1
    failed = []
    if deferred:
        try:
            received = transfer(layers, [c for c, _ in deferred], peers, "readmit")
            write(layers, received)
            report.peer_transfers = len(deferred)
            for c, kind in deferred:
                if c in received:
                    report.bytes_by_source[planner.SOURCE_NAMES[kind]] += layers[c.layer].experts.slot_bytes
            report.replicas_added += len(deferred)
        except RankFailure:  # on every member alike: the shadow, else an empty slot
            failed = [c for c, _ in deferred]
    for c in failed:
        layer = layers[c.layer]
        if shadow is None:
            plans[c.layer].phy2log[c.target] = -1
            continue
        if layer.experts.holds(c.target):
            layer.experts.write_slot(c.target, *shadow.read_expert(c.layer, c.expert))
            report.bytes_by_source[planner.SOURCE_NAMES[planner.SOURCE_SHADOW_MEMORY]] += layer.experts.slot_bytes
        report.replicas_added += 1
    for name, layer in layers.items():
        p = layer.placement
        now_active = p.active.clone()
        now_active[joiners] = True
        p.set_state(plans[name].phy2log, now_active, allow_uncovered=True)  # may still be short
    report.bytes_by_source = dict(report.bytes_by_source)
    return report


def rebalance_across_ranks(model: nn.Module, group: ElasticGroup, name: str, *, shadow: ShadowStore | None = None,
                           shadow_current: bool = False, topology: planner.Topology | None = None) -> RecoveryReport:
    """Re-place every layer's experts for the members' summed load counters (``planner.rebalance``),
    called by every member at the same step boundary; ``name`` tells rebalances apart (e.g. the step).
    Each changed slot takes its new expert from its cheapest source (``pick_source``): a replica on its
    own rank, a peer's over the group, or ``shadow`` (when current, or for an expert with no live
    replica). Every new slot's weights (and tracked
    optimizer state) are read before any slot is written, and all are written and routed only once the
    members have committed, so a failure during it changes nothing anywhere: it raises RankFailure
    with every member's placement as before. The load counters restart from zero."""
    layers = resilient_layers(model)
    topology = topology or group.topology()
    posted = group.gather(f"rebalance/{name}", json.dumps([layer.expert_load.tolist() for layer in layers.values()]))
    report = RecoveryReport([])
    plans, staged, peer = {}, [], []
    for i, (lname, layer) in enumerate(layers.items()):
        p = layer.placement
        load = np.array([sum(json.loads(v)[i][e] for v in posted.values()) for e in range(layer.config.num_experts)],
                        dtype=np.float64)
        plans[lname] = plan = planner.rebalance(p.phy2log.numpy(), p.slot_rank.numpy(), p.active.numpy(), load,
                                                topology)
        owner, phy2log, active = p.slot_rank.tolist(), p.phy2log.tolist(), p.active.tolist()
        for target, expert, _, _ in plan.copies.tolist():
            kind, src = pick_source(expert, target, phy2log, owner, active, topology, True, shadow, shadow_current)
            if kind is None:  # checked before anything changes
                raise ValueError(f"rebalance: expert {expert} of layer {lname!r} has no live replica; it needs "
                                 "the shadow store")
            if src >= 0 and owner[src] != owner[target]:
                peer.append(PeerCopy(lname, expert, src, target))
            elif owner[target] == group.rank:  # read now: a source slot may be another copy's target
                e = layer.experts
                pieces = ([t.clone() for t in (*e.slot_weights(src), *e.slot_state(src))] if src >= 0
                          else [*shadow.read_expert(lname, expert)])
                staged.append((lname, target, pieces, planner.SOURCE_NAMES[kind]))
    received = transfer(layers, peer, group, f"rebalance/{name}") if peer else group.commit(f"rebalance/{name}")
    for lname, target, (w13, w2, *state), source in staged:
        layers[lname].experts.write_slot(target, w13, w2, state=state or None)
        report.bytes_by_source[source] += layers[lname].experts.slot_bytes
    for c in received or {}:
        kind = planner.peer_kind(topology, int(layers[c.layer].placement.slot_rank[c.src]), group.rank)
        report.bytes_by_source[planner.SOURCE_NAMES[kind]] += layers[c.layer].experts.slot_bytes
    write(layers, received or {})
    for lname, layer in layers.items():
        layer.placement.set_state(plans[lname].phy2log, layer.placement.active, allow_uncovered=True)
        layer.read_load(reset=True)
    report.peer_transfers = len(peer)
    report.replicas_added = sum(len(plan.copies) for plan in plans.values())
    report.bytes_by_source = {k: v for k, v in report.bytes_by_source.items() if v}
    return report
