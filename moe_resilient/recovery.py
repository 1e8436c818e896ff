"""recover(): after losing ranks, restore full expert coverage in place and keep serving.

Per ResilientMoE layer: plan (numba, deterministic) -> route away from the dead ranks at once (experts
with a surviving replica are served again by a pure remap, zero bytes moved) -> copy weights into
target slots, each from its cheapest source (a live replica, or the shadow store), then flip the
placement. Nothing recompiles: every update is an in-place copy.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from moe_resilient import planner
from moe_resilient.placement import PlacementError
from moe_resilient.shadow import ShadowStore, resilient_layers


@dataclass
class RecoveryReport:
    """What ``recover`` did. Times in seconds; bytes per source kind (planner.SOURCE_NAMES)."""

    lost_ranks: list[int]
    phase_seconds: dict[str, float] = field(default_factory=dict)
    bytes_by_source: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    experts_remapped: int = 0  # served again by a surviving replica, no bytes moved
    experts_restored: int = 0  # had no live replica; weights copied into a slot
    replicas_added: int = 0  # redundancy lost with the dead ranks, copied back from a live replica
    shadow_age_steps: dict[tuple[str, int], int] = field(default_factory=dict)
    uncovered: dict[str, list[int]] = field(default_factory=dict)
    single_homed: dict[str, list[int]] = field(default_factory=dict)
    recompiles: int = 0
    # recover_across_ranks(step=...): the step each survivor met the failure in, by rank
    member_steps: dict[int, int] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return sum(self.phase_seconds.values())

    def summary(self) -> str:
        phases = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in self.phase_seconds.items())
        moved = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.bytes_by_source.items() if v) or "no bytes"
        lost = {k: v for k, v in self.uncovered.items() if v}
        return (f"lost ranks {self.lost_ranks}: {phases}; remapped {self.experts_remapped}, restored "
                f"{self.experts_restored}, re-replicated {self.replicas_added}; moved {moved}; "
                f"uncovered {lost or 'none'}; recompiles {self.recompiles}")


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (a recompile adds one)."""
    if "torch._dynamo" not in sys.modules:  # nothing compiled yet; importing dynamo costs seconds
        return 0
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def recover(
    model: nn.Module,
    lost_ranks,
    *,
    shadow: ShadowStore | None = None,
    topology: planner.Topology | None = None,
    step: int | None = None,
    restore_redundancy: bool = True,
    probe: torch.Tensor | None = None,
    local_rank: int | None = None,
    load: dict[str, torch.Tensor] | None = None,
) -> RecoveryReport:
    """Restore coverage of every ResilientMoE layer of ``model`` after losing ``lost_ranks``.

    ``shadow`` supplies experts that lost every replica; without it they stay uncovered (reported,
    and served degraded). ``step`` (current optimizer step) dates experts restored from shadow.
    ``probe``, if given, is run through ``model`` afterwards and any compile it triggers is counted.

    ``load`` ({layer name: [E] tokens per expert}) is what the plan balances; by default each layer's
    own counters, or uniform load under ``local_rank``.

    Under expert parallelism every rank calls this with the same arguments and its ``local_rank``:
    the plan is deterministic and uses no rank-local input (each rank counted only its own tokens, so
    pass ``load`` summed over ranks, as ``dispatch.recover_across_ranks`` does, or the plan assumes
    uniform load), so all ranks make the same placement edits, and each rank writes
    weights only into the slots it owns (a source replica on another rank is replaced by the shadow
    store, which every rank of a host reads from the same page cache).
    """
    lost = sorted({int(r) for r in ([lost_ranks] if isinstance(lost_ranks, int) else lost_ranks)})
    layers = resilient_layers(model)
    if not layers:
        raise ValueError("recover: the model has no ResilientMoE layer")
    report = RecoveryReport(lost)
    topologies = {n: topology or planner.default_topology(m.placement.world_size) for n, m in layers.items()}
    compiles_before = compiled_graphs()
    plans = {}
    t0 = time.perf_counter()
    for name, layer in layers.items():  # validate and plan everything before touching anything
        p = layer.placement
        bad = [r for r in lost if not 0 <= r < p.world_size]
        if bad:
            raise PlacementError(f"recover: ranks {bad} out of range [0, {p.world_size}) in layer {name!r}")
        topo = topologies[name]
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
        plans[name] = planner.repair_plan(
            p.phy2log.cpu().numpy(), p.slot_rank.cpu().numpy(), alive, tokens, topo,
            restore_redundancy=restore_redundancy,
        )
    if shadow is not None:
        shadow.validate(model)
    report.phase_seconds["plan"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for name, layer in layers.items():
        p = layer.placement
        on_lost = set(p.phy2log[torch.isin(p.slot_rank, torch.tensor(lost, device=p.slot_rank.device))].tolist()) - {-1}
        p.mark_dead(lost, allow_uncovered=True)  # dead slots leave routing now
        report.experts_remapped += len(on_lost - set(p.uncovered()))
    report.phase_seconds["remap"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for name, layer in layers.items():
        plan = plans[name]
        slot_bytes = (layer.experts.w13[0].numel() + layer.experts.w2[0].numel()) * layer.experts.w13.element_size()
        owner = layer.placement.slot_rank.tolist()
        for target, expert, kind, src in plan.copies.tolist():
            from_shadow = kind in (planner.SOURCE_SHADOW_MEMORY, planner.SOURCE_SHADOW_DISK)
            # a replica on another rank than the target's owner comes from the shadow instead;
            # every rank evaluates the same conditions, so all make the same placement edits
            remote = not from_shadow and local_rank is not None and owner[src] != owner[target]
            if (from_shadow or remote) and shadow is None:
                continue  # reported as uncovered (or less redundant)
            if local_rank is not None and owner[target] != local_rank:
                layer.placement.assign(target, expert, allow_uncovered=True)  # its owner writes the weights
            elif from_shadow or remote:
                kind = kind if from_shadow else planner.SOURCE_SHADOW_MEMORY
                report.bytes_by_source[planner.SOURCE_NAMES[kind]] += shadow.restore(layer, name, expert, target)
            else:
                layer.add_replica(expert, target, src_slot=src)
                report.bytes_by_source[planner.SOURCE_NAMES[kind]] += slot_bytes
            if from_shadow:
                report.shadow_age_steps[(name, expert)] = (step - shadow.step(name)) if step is not None else 0
                report.experts_restored += 1
            else:
                report.replicas_added += 1
        report.uncovered[name] = layer.placement.uncovered()
        report.single_homed[name] = plan.single_homed
    report.phase_seconds["restore"] = time.perf_counter() - t0

    if probe is not None:
        with torch.no_grad():
            model(probe)
    report.recompiles = compiled_graphs() - compiles_before
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
