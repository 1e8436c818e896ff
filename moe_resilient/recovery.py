"""recover(): after losing ranks, restore full expert coverage in place and keep serving.

Per ResilientMoE layer, in three phases: ``plan_repair`` (numba, deterministic) -> ``remap`` (route
away from the dead ranks at once: experts with a surviving replica are served again, zero bytes moved)
-> ``restore`` (copy weights into target slots, each from its cheapest source, then flip the
placement). Nothing recompiles: every update is an in-place copy.

Replicas never disagree: a copy that only restores redundancy comes from a live replica, or from the
shadow store only when the shadow is current; an expert with no live copy left is restored from the
shadow whatever its age, and the report says how old it was.
"""

from __future__ import annotations

import operator
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from moe_resilient import planner
from moe_resilient.group import ElasticGroup, RankFailure
from moe_resilient.layer import ResilientMoE
from moe_resilient.placement import PlacementError
from moe_resilient.shadow import ShadowStore, resilient_layers
from moe_resilient.transfer import PeerCopy, transfer, write

_SHADOW_KINDS = (planner.SOURCE_SHADOW_MEMORY, planner.SOURCE_SHADOW_DISK)


@dataclass
class RecoveryReport:
    """What ``recover`` did. Times in seconds; bytes per source kind (planner.SOURCE_NAMES)."""

    lost_ranks: list[int]
    phase_seconds: dict[str, float] = field(default_factory=dict)
    bytes_by_source: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    experts_remapped: int = 0  # held on a lost rank, still served by a surviving replica: no bytes moved
    experts_restored: int = 0  # had no live replica left; weights copied into a slot from the shadow
    replicas_added: int = 0  # redundancy lost with the dead ranks, copied back from a current source
    # (layer, expert) -> steps the shadow copy restored was behind ``step`` (None: unknown, no step given;
    # 0 when the caller said the shadow is current)
    shadow_age_steps: dict[tuple[str, int], int | None] = field(default_factory=dict)
    # layer -> experts whose lost redundancy was not restored: the only source was a stale (or absent)
    # shadow, or a replica on another rank under expert parallelism
    redundancy_skipped: dict[str, list[int]] = field(default_factory=dict)
    uncovered: dict[str, list[int]] = field(default_factory=dict)
    single_homed: dict[str, list[int]] = field(default_factory=dict)
    recompiles: int = 0
    peer_transfers: int = 0  # redundancy copies sent between ranks over the group
    state_resets: int = 0  # slots here written from the shadow whose tracked optimizer state was zeroed
    # recover_across_ranks(step=...): the step each survivor met the failure in, by rank
    member_steps: dict[int, int] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return sum(self.phase_seconds.values())

    @property
    def stale_restores(self) -> dict[tuple[str, int], int]:
        """(layer, expert) -> age in steps of each expert restored from a shadow older than ``step``."""
        return {k: v for k, v in self.shadow_age_steps.items() if v is not None and v > 0}

    def summary(self) -> str:
        phases = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in self.phase_seconds.items())
        moved = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.bytes_by_source.items() if v) or "no bytes"
        lost = {k: v for k, v in self.uncovered.items() if v}
        text = (f"lost ranks {self.lost_ranks}: {phases}; remapped {self.experts_remapped}, restored "
                f"{self.experts_restored}, re-replicated {self.replicas_added}; moved {moved}; "
                f"uncovered {lost or 'none'}; recompiles {self.recompiles}")
        if self.stale_restores:
            text += "; restored from a STALE shadow: " + ", ".join(
                f"{n}[{e}] {age} steps old" for (n, e), age in sorted(self.stale_restores.items()))
        unknown = sorted(k for k, v in self.shadow_age_steps.items() if v is None)
        if unknown:
            text += f"; shadow age unknown (no step given) for {len(unknown)} restored experts"
        skipped = {k: v for k, v in self.redundancy_skipped.items() if v}
        if skipped:
            text += f"; redundancy not restored (no current source) {skipped}"
        return text


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (a recompile adds one)."""
    if "torch._dynamo" not in sys.modules:  # nothing compiled yet; importing dynamo costs seconds
        return 0
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def as_ranks(lost_ranks) -> list[int]:
    """Sorted distinct ranks from one integer-like (int, NumPy integer, integer 0-d tensor) or an
    iterable of them. Booleans, floats and strings are refused with a TypeError naming the value."""
    def one(r) -> int:
        bad = isinstance(r, (bool, np.bool_, str, bytes)) or (
            isinstance(r, torch.Tensor) and (r.numel() != 1 or r.dtype == torch.bool or r.is_floating_point()))
        if not bad:
            try:
                return operator.index(r)
            except TypeError:
                pass
        raise TypeError(f"recover: lost rank {r!r} ({type(r).__name__}) is not an integer")

    if isinstance(lost_ranks, (str, bytes)):
        raise TypeError(f"recover: lost_ranks {lost_ranks!r} is a string, not ranks")
    if isinstance(lost_ranks, torch.Tensor):
        items = list(lost_ranks.flatten()) if lost_ranks.dim() else [lost_ranks]
    else:
        try:  # a 0-d array has __iter__ but cannot be iterated
            items = list(lost_ranks)
        except TypeError:
            items = [lost_ranks]
    return sorted({one(r) for r in items})


def plan_repair(layers: dict[str, ResilientMoE], lost: list[int], *, topology: planner.Topology | None = None,
                load: dict[str, torch.Tensor] | None = None, local_rank: int | None = None,
                restore_redundancy: bool = True) -> dict[str, planner.Plan]:
    """Check the request against every layer and plan each repair; changes nothing. The layers'
    copies are spread over the survivors: each rank writes its own slots, all at once."""
    plans, busy = {}, None  # busy [W]: seconds of copying planned on each rank so far (planner.repair_plan)
    for name, layer in layers.items():
        p = layer.placement
        bad = [r for r in lost if not 0 <= r < p.world_size]
        if bad:
            raise PlacementError(f"recover: ranks {bad} out of range [0, {p.world_size}) in layer {name!r}")
        alive = p.active.cpu().numpy().copy()
        alive[lost] = False
        if load is not None and name in load:
            counts = load[name]
            if tuple(counts.shape) != (layer.config.num_experts,):
                raise ValueError(f"recover: load for layer {name!r} has shape {list(counts.shape)}, "
                                 f"expected [{layer.config.num_experts}]")
            tokens = counts.cpu().numpy().astype(np.float64) + 1.0
        elif local_rank is None:
            tokens = layer.expert_load.cpu().numpy().astype(np.float64) + 1.0  # unseen experts still count
        else:  # each rank counted only its own tokens: plan on what every rank knows alike
            tokens = np.ones(layer.config.num_experts)
        if busy is None:
            busy = np.zeros(p.world_size)
        plans[name] = planner.repair_plan(
            p.phy2log.cpu().numpy(), p.slot_rank.cpu().numpy(), alive, tokens,
            topology or planner.default_topology(p.world_size), restore_redundancy=restore_redundancy,
            busy=busy, slot_bytes=layer.experts.slot_bytes,
        )
    return plans


def remap(layers: dict[str, ResilientMoE], lost: list[int], report: RecoveryReport) -> dict[str, set[int]]:
    """Take the lost ranks' slots out of routing in every layer. Returns each layer's experts left with
    no live replica."""
    uncovered = {}
    for name, layer in layers.items():
        p = layer.placement
        on_lost = set(p.phy2log[torch.isin(p.slot_rank, torch.tensor(lost, device=p.slot_rank.device))].tolist()) - {-1}
        p.mark_dead(lost, allow_uncovered=True)
        uncovered[name] = set(p.uncovered())
        report.experts_remapped += len(on_lost - uncovered[name])
    return uncovered


def restore(name: str, layer: ResilientMoE, plan: planner.Plan, uncovered: set[int], report: RecoveryReport, *,
            shadow: ShadowStore | None, shadow_current: bool, step: int | None, local_rank: int | None,
            topology: planner.Topology, peers: bool = False) -> list[tuple[PeerCopy, int]]:
    """Carry out ``plan``'s copies into ``layer``. A copy for an expert in ``uncovered`` (no live
    replica) comes from the shadow. A redundancy copy comes from the cheapest source that agrees with
    the live replicas: a live replica this process can read (``peers``: any member's, over the group),
    or the shadow when ``shadow_current``; with none, it is skipped and reported. Under ``local_rank``
    every rank evaluates the same conditions, so all make the same placement edits, and each writes
    only the slots it owns. Returns the copies to run over the group, with their source kinds: their
    targets are left unrouted until the transfer has succeeded (``recover`` runs it)."""
    p = layer.placement
    owner = p.slot_rank.tolist()
    cost = topology.seconds_per_byte
    need = set(uncovered)
    skipped, deferred = [], []
    for target, expert, kind, src in plan.copies.tolist():
        shadow_kind = kind if kind in _SHADOW_KINDS else planner.SOURCE_SHADOW_MEMORY
        if expert in need:  # coverage: the shadow is the only copy left
            if shadow is None:
                continue  # reported as uncovered
            kind, src = shadow_kind, -1
        else:  # redundancy: never from a source that may disagree with the live replicas
            options = [(cost[planner.peer_kind(topology, owner[s], owner[target])], s) for s in p.slots_of(expert)
                       if local_rank is None or peers or owner[s] == owner[target]]
            if shadow is not None and shadow_current:
                options.append((cost[shadow_kind], -1))
            if not options:
                skipped.append(expert)
                continue
            src = min(options)[1]
            kind = shadow_kind if src < 0 else planner.peer_kind(topology, owner[src], owner[target])
            if local_rank is not None and src >= 0 and owner[src] != owner[target]:
                deferred.append((PeerCopy(name, expert, src, target), kind))
                continue
        if local_rank is not None and owner[target] != local_rank:
            p.assign(target, expert, allow_uncovered=True)  # its owner writes the weights
        elif src < 0:
            report.bytes_by_source[planner.SOURCE_NAMES[kind]] += shadow.restore(layer, name, expert, target)
        else:
            layer.add_replica(expert, target, src_slot=src)
            report.bytes_by_source[planner.SOURCE_NAMES[kind]] += layer.experts.slot_bytes
        if expert in need:
            need.discard(expert)
            age = (step - shadow.step(name)) if step is not None else (0 if shadow_current else None)
            report.shadow_age_steps[(name, expert)] = age
            report.experts_restored += 1
        else:
            report.replicas_added += 1
    report.redundancy_skipped[name] = sorted(set(skipped))
    report.uncovered[name] = p.uncovered()
    report.single_homed[name] = plan.single_homed
    return deferred


def run_peer_copies(layers: dict[str, ResilientMoE], copies: list[tuple[PeerCopy, int]], group: ElasticGroup | None,
                    report: RecoveryReport, *, shadow: ShadowStore | None, shadow_current: bool, name: str) -> None:
    """Run redundancy ``copies`` ((copy, source kind)) over ``group``, then route to their targets on
    every member. If the transfer fails (a member lost: every member sees it fail, through its commit),
    or there is no group to run it on, each copy comes from a current shadow instead, or is skipped
    and reported; the RankFailure is not raised, since the group has already moved on, and the next
    catch-up repairs the new loss."""
    if not copies:
        return
    received = None
    if group is not None:
        try:
            received = transfer(layers, [c for c, _ in copies], group, name)
            write(layers, received)
        except RankFailure:
            pass
    if received is not None:
        report.peer_transfers += len(copies)
        for c, kind in copies:
            if c in received:
                report.bytes_by_source[planner.SOURCE_NAMES[kind]] += layers[c.layer].experts.slot_bytes
            layers[c.layer].placement.assign(c.target, c.expert, allow_uncovered=True)
            report.replicas_added += 1
        return
    for c, _ in copies:
        layer = layers[c.layer]
        if shadow is None or not shadow_current:
            report.redundancy_skipped[c.layer] = sorted({*report.redundancy_skipped.get(c.layer, []), c.expert})
            continue
        if layer.experts.holds(c.target):
            report.bytes_by_source[planner.SOURCE_NAMES[planner.SOURCE_SHADOW_MEMORY]] += shadow.restore(
                layer, c.layer, c.expert, c.target)
        else:
            layer.placement.assign(c.target, c.expert, allow_uncovered=True)
        report.replicas_added += 1


def recover(
    model: nn.Module,
    lost_ranks,
    *,
    shadow: ShadowStore | None = None,
    topology: planner.Topology | None = None,
    step: int | None = None,
    shadow_current: bool | None = None,
    restore_redundancy: bool = True,
    probe: torch.Tensor | None = None,
    local_rank: int | None = None,
    load: dict[str, torch.Tensor] | None = None,
    peers: ElasticGroup | None = None,
) -> RecoveryReport:
    """Restore coverage of every ResilientMoE layer of ``model`` (eager or ``torch.compile``d) after
    losing ``lost_ranks`` (a rank or ranks: ints, NumPy integers or integer tensors).

    ``shadow`` supplies experts that lost every replica; without it they stay uncovered (reported,
    and served degraded). ``step`` (current optimizer step) dates experts restored from shadow.
    ``shadow_current``: whether the shadow holds the model's current weights (serving: True); by
    default only when ``step`` equals every layer's shadow step. Only a current shadow may supply a
    redundancy copy. ``probe``, if given, is run through ``model`` afterwards and any compile it
    triggers is counted.

    ``load`` ({layer name: [E] tokens per expert}) is what the plan balances; by default each layer's
    own counters, or uniform load under ``local_rank``.

    Under expert parallelism every rank calls this with the same arguments and its ``local_rank``:
    the plan is deterministic and uses no rank-local input (each rank counted only its own tokens, so
    pass ``load`` summed over ranks, as ``elastic.recover_across_ranks`` does, or the plan assumes
    uniform load), so all ranks make the same placement edits, and each rank writes weights only into
    the slots it owns. ``peers`` (the group, at the generation that lost ``lost_ranks``): a redundancy
    copy whose cheapest source is a replica on another rank travels over it (``transfer.py``); without
    it, such a copy comes from a current shadow, or is skipped and reported.
    """
    lost = as_ranks(lost_ranks)
    layers = resilient_layers(model)
    if not layers:
        raise ValueError("recover: the model has no ResilientMoE layer")
    report = RecoveryReport(lost)
    compiles_before = compiled_graphs()
    resets_before = sum(layer.experts.state_resets for layer in layers.values())
    t0 = time.perf_counter()
    plans = plan_repair(layers, lost, topology=topology, load=load, local_rank=local_rank,
                        restore_redundancy=restore_redundancy)
    if shadow is not None:
        shadow.validate(model)
        if shadow_current is None:
            shadow_current = step is not None and all(shadow.step(n) == step for n in layers)
    report.phase_seconds["plan"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    uncovered = remap(layers, lost, report)
    report.phase_seconds["remap"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    deferred = []
    for name, layer in layers.items():
        deferred += restore(name, layer, plans[name], uncovered[name], report, shadow=shadow,
                            shadow_current=bool(shadow_current), step=step, local_rank=local_rank,
                            topology=topology or planner.default_topology(layer.placement.world_size),
                            peers=peers is not None)
    run_peer_copies(layers, deferred, peers, report, shadow=shadow, shadow_current=bool(shadow_current),
                    name="repair")
    report.phase_seconds["restore"] = time.perf_counter() - t0

    if probe is not None:
        with torch.no_grad():
            model(probe)
    report.recompiles = compiled_graphs() - compiles_before
    report.state_resets = sum(layer.experts.state_resets for layer in layers.values()) - resets_before
    report.bytes_by_source = dict(report.bytes_by_source)
    return report


def memory_report(model: nn.Module) -> dict:
    """Bytes of redundant replicas and spare slots against one copy of every expert, over all layers
    (ReviveMoE reports ~8% for its standbys)."""
    totals = defaultdict(int)
    for layer in resilient_layers(model).values():
        for k, v in layer.memory_overhead().items():
            if k != "overhead":
                totals[k] += v
    totals = dict(totals)
    totals["overhead"] = (totals["replica_bytes"] + totals["spare_bytes"]) / max(totals["base_bytes"], 1)
    return totals
