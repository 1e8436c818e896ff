"""Placement planning, compiled with numba at import (explicit signatures, on-disk cache), so no plan
is ever JIT-compiled during a recovery.

Every function is deterministic: the same inputs give the same plan on every rank, with no
communication. Ties break towards the lower expert, rank and slot index.

- ``initial_placement``: replicas by expected load (EPLB: repeatedly replicate the expert with the
  largest load per replica), packed heaviest first onto the least-loaded rank, with replicas of one
  expert on different ranks and, wherever the budget allows, different hosts.
- ``repair_plan``: after losing ranks, keep every surviving replica; give each expert left with no
  live replica a spare slot on a survivor (or reclaim a redundant replica's slot), and restore lost
  redundancy into remaining spares. Each copy's source is the cheapest over the topology model.
- ``rebalance``: a fresh placement for observed load, matched to the current one to move little.
- ``readmit_plan``: a repaired rank comes back empty; rebalance over the grown membership.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import numba
import numpy as np

# Where a copy comes from, cheapest first under the default topology.
SOURCE_LOCAL, SOURCE_PEER_HOST, SOURCE_SHADOW_MEMORY, SOURCE_PEER_REMOTE, SOURCE_SHADOW_DISK = range(5)
SOURCE_NAMES = ("local_replica", "peer_same_host", "shadow_memory", "peer_other_host", "shadow_disk")


@dataclass(frozen=True)
class Topology:
    """Ranks grouped into hosts, and the bandwidth (bytes/s) of each way an expert can be copied.

    Defaults describe a GPU server: NVLink between local peers, PCIe from host memory, one NIC
    between hosts, NVMe for disk. ``from_torchrec`` reads the same figures from torchrec's planner.
    """

    world_size: int
    local_world_size: int = 8
    intra_host_bw: float = 300e9
    ddr_bw: float = 25e9
    inter_host_bw: float = 12.5e9
    ssd_bw: float = 3e9

    def __post_init__(self):
        if self.world_size < 1 or self.local_world_size < 1:
            raise ValueError("world_size and local_world_size must be >= 1")

    @property
    def rank_host(self) -> np.ndarray:
        """[W] host index of each rank."""
        return np.arange(self.world_size, dtype=np.int64) // self.local_world_size

    @property
    def seconds_per_byte(self) -> np.ndarray:
        """[5] cost of one byte from each SOURCE_* kind (a local replica is free)."""
        return np.array(
            [0.0, 1 / self.intra_host_bw, 1 / self.ddr_bw, 1 / self.inter_host_bw, 1 / self.ssd_bw], dtype=np.float64
        )

    @classmethod
    def from_torchrec(cls, topology) -> Topology:
        """From ``torchrec.distributed.planner.types.Topology``, whose bandwidths are bytes per ms."""
        per_s = 1000.0
        return cls(
            world_size=topology.world_size,
            local_world_size=topology.local_world_size,
            intra_host_bw=float(topology.intra_host_bw) * per_s,
            ddr_bw=float(topology.ddr_mem_bw) * per_s,
            inter_host_bw=float(topology.inter_host_bw) * per_s,
            ssd_bw=float(topology.ssd_mem_bw) * per_s,
        )


@functools.lru_cache(maxsize=None)
def default_topology(world_size: int, local_world_size: int | None = None) -> Topology:
    """torchrec's planner Topology when torchrec is installed (CPU figures), else our defaults."""
    local = local_world_size or world_size
    try:
        from torchrec.distributed.planner.types import Topology as TorchrecTopology
    except Exception:  # torchrec is optional ([torchrec] extra)
        return Topology(world_size, local)
    logger = logging.getLogger("torchrec.distributed.planner.types")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it warns when built outside its TopologyFactory
    try:
        return Topology.from_torchrec(TorchrecTopology(world_size=world_size, compute_device="cpu", local_world_size=local))
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# numba kernels (eagerly compiled: explicit signatures; cached next to this file)

_i64, _f64, _b1 = numba.int64, numba.float64, numba.boolean


@numba.njit(_i64[:](_f64[:], _i64[:], _i64, _i64), cache=True)
def _replica_counts(load, start, num_replicas, max_per_expert):
    """[E] replicas per expert: ``start`` (at least one each), then the expert with the largest load
    per replica gets the next, until ``num_replicas`` in total or every expert has ``max_per_expert``
    (one per rank: a second copy on the same rank adds neither capacity nor safety)."""
    E = load.shape[0]
    counts = np.maximum(start, 1)
    for _ in range(num_replicas - counts.sum()):
        best, best_val = -1, -1.0
        for e in range(E):
            v = load[e] / counts[e]
            if counts[e] < max_per_expert and v > best_val:
                best, best_val = e, v
        if best < 0:
            break
        counts[best] += 1
    return counts


@numba.njit(_i64[:](_f64[:], _i64[:], _i64[:], _i64[:], _b1[:], _i64[:]), cache=True)
def _pack(load, counts, phy2log, slot_rank, alive, rank_host):
    """Place ``counts[e]`` replicas of each expert into the free (-1) slots of alive ranks, heaviest
    first, each onto the least-loaded rank that does not hold e yet, preferring a host that does
    not hold e either as long as that keeps rank loads within the greedy bound (mean + heaviest).
    Slots already holding an expert stay and count towards loads. Returns the new phy2log."""
    E, S, W = load.shape[0], phy2log.shape[0], alive.shape[0]
    H = rank_host.max() + 1
    out = phy2log.copy()
    have = np.zeros(E, dtype=np.int64)
    rank_load = np.zeros(W, dtype=np.float64)
    rank_free = np.zeros(W, dtype=np.int64)
    on_rank = np.zeros((W, E), dtype=np.int64)
    on_host = np.zeros((H, E), dtype=np.int64)
    for s in range(S):
        r = slot_rank[s]
        if not alive[r]:
            continue
        e = out[s]
        if e < 0:
            rank_free[r] += 1
        else:
            have[e] += 1
    for s in range(S):
        r, e = slot_rank[s], out[s]
        if alive[r] and e >= 0:
            rank_load[r] += load[e] / max(counts[e], have[e])
            on_rank[r, e] += 1
            on_host[rank_host[r], e] += 1
    # items: the replicas still to place, heaviest first (stable by expert id)
    n_items = 0
    for e in range(E):
        n_items += max(counts[e] - have[e], 0)
    item_expert = np.empty(n_items, dtype=np.int64)
    item_weight = np.empty(n_items, dtype=np.float64)
    i = 0
    for e in range(E):
        for _ in range(max(counts[e] - have[e], 0)):
            item_expert[i] = e
            item_weight[i] = load[e] / counts[e]
            i += 1
    order = np.argsort(-item_weight, kind="mergesort")
    max_w = item_weight.max() if n_items > 0 else 0.0
    for j in range(n_items):
        e, w = item_expert[order[j]], item_weight[order[j]]
        # least-loaded rank with room that does not hold e; and the same among hosts without e
        best, diverse, any_room = -1, -1, False
        for r in range(W):
            if not alive[r] or rank_free[r] == 0:
                continue
            any_room = True
            if on_rank[r, e] > 0:
                continue
            if best < 0 or rank_load[r] < rank_load[best]:
                best = r
            if on_host[rank_host[r], e] == 0 and (diverse < 0 or rank_load[r] < rank_load[diverse]):
                diverse = r
        if not any_room:
            break  # no free slot left anywhere: the caller reports what is unplaced
        if best < 0:
            continue  # every rank with room already holds e
        # another host only while it stays within the greedy balance bound (+ heaviest replica)
        if diverse >= 0 and rank_load[diverse] + w <= rank_load[best] + max_w:
            best = diverse
        for s in range(S):
            if slot_rank[s] == best and out[s] < 0:
                out[s] = e
                break
        rank_free[best] -= 1
        rank_load[best] += w
        on_rank[best, e] += 1
        on_host[rank_host[best], e] += 1
    return out


@numba.njit(
    numba.types.Tuple((_i64[:], _i64[:, :]))(_i64[:], _i64[:], _b1[:], _f64[:], _i64[:], _f64[:], _b1, _b1, _f64[:],
                                             _f64),
    cache=True,
)
def _repair(phy2log, slot_rank, alive, load, rank_host, cost, shadow_in_memory, restore_redundancy, busy, slot_bytes):
    """Repair after losing the ranks with ``alive[r] == False``.

    Returns (new phy2log [S], copies [C, 4]: target slot, expert, source kind, source slot or -1).
    Slots of dead ranks are emptied. Experts with no live replica are placed first (heaviest
    first), into spare slots or, failing that, a reclaimed slot of the expert with the most
    replicas per unit load; then lost redundancy is restored into remaining spares.

    ``busy`` [W]: seconds of copying each rank already has to do (earlier layers' repairs); each
    target's owner makes its copy, so among equally good targets the least busy rank's is taken, and
    the copy's time (``slot_bytes`` at its source's cost) is added, in place."""
    E, S, W = load.shape[0], phy2log.shape[0], alive.shape[0]
    out = phy2log.copy()
    before = np.zeros(E, dtype=np.int64)
    live = np.zeros(E, dtype=np.int64)
    for s in range(S):
        e = phy2log[s]
        if e >= 0:
            before[e] += 1
            if alive[slot_rank[s]]:
                live[e] += 1
            else:
                out[s] = -1
    copies = np.full((E + S, 4), -1, dtype=np.int64)
    n_copies = 0
    rank_load = np.zeros(W, dtype=np.float64)
    for s in range(S):
        if out[s] >= 0:
            rank_load[slot_rank[s]] += load[out[s]] / live[out[s]]
    shadow_kind = 2 if shadow_in_memory else 4
    # pass 0: coverage for experts with no live replica; pass 1: redundancy lost with the dead ranks
    for pass_ in range(2 if restore_redundancy else 1):
        lost = np.empty(E, dtype=np.int64)
        n_lost = 0
        for e in range(E):
            if (pass_ == 0 and live[e] == 0) or (pass_ == 1 and 0 < live[e] < before[e]):
                lost[n_lost] = e
                n_lost += 1
        weights = np.empty(n_lost, dtype=np.float64)
        for i in range(n_lost):
            weights[i] = -load[lost[i]]
        order = np.argsort(weights, kind="mergesort")
        for i in range(n_lost):
            e = lost[order[i]]
            # target: a spare slot on the least-loaded alive rank not holding e
            target = -1
            for s in range(S):
                r = slot_rank[s]
                if not alive[r] or out[s] >= 0:
                    continue
                holds = False
                for s2 in range(S):
                    if slot_rank[s2] == r and out[s2] == e:
                        holds = True
                        break
                if holds:
                    continue  # a second copy on one rank adds neither capacity nor safety
                if target < 0 or rank_load[r] < rank_load[slot_rank[target]] or (
                        rank_load[r] == rank_load[slot_rank[target]] and busy[r] < busy[slot_rank[target]]):
                    target = s
            if target < 0 and pass_ == 0:  # no spare: reclaim the most redundant replica's slot
                best_val = -1.0
                for s in range(S):
                    e2 = out[s]
                    if e2 < 0 or not alive[slot_rank[s]] or live[e2] < 2:
                        continue
                    v = live[e2] / (load[e2] + 1e-12)
                    if v > best_val or (v == best_val and busy[slot_rank[s]] < busy[slot_rank[target]]):
                        target, best_val = s, v
                if target >= 0:
                    live[out[target]] -= 1
            if target < 0:
                continue  # nothing left to give: the caller reports e as uncovered
            tr = slot_rank[target]
            # source: the cheapest live replica (same rank free < same host < other host) or shadow
            kind, src = shadow_kind, -1
            for s in range(S):
                if out[s] != e or s == target:
                    continue
                r = slot_rank[s]
                k = 0 if r == tr else (1 if rank_host[r] == rank_host[tr] else 3)
                if cost[k] < cost[kind]:
                    kind, src = k, s
            out[target] = e
            live[e] += 1
            rank_load[tr] += load[e] / live[e]
            busy[tr] += cost[kind] * slot_bytes
            copies[n_copies, 0] = target
            copies[n_copies, 1] = e
            copies[n_copies, 2] = kind
            copies[n_copies, 3] = src
            n_copies += 1
    return out, copies[:n_copies]


@numba.njit(_i64[:](_f64[:], _i64[:], _i64[:], _b1[:]), cache=True)
def _fill_free(load, phy2log, slot_rank, alive):
    """Give each free slot of an alive rank, in slot order, a replica of the expert with the largest
    load per live replica (an uncovered expert first) among those the rank does not hold yet."""
    E, S = load.shape[0], phy2log.shape[0]
    out = phy2log.copy()
    counts = np.zeros(E, dtype=np.int64)
    for s in range(S):
        if out[s] >= 0 and alive[slot_rank[s]]:
            counts[out[s]] += 1
    for s in range(S):
        r = slot_rank[s]
        if out[s] >= 0 or not alive[r]:
            continue
        held = np.zeros(E, dtype=np.bool_)
        for s2 in range(S):
            if slot_rank[s2] == r and out[s2] >= 0:
                held[out[s2]] = True
        best, best_val = -1, -1.0
        for e in range(E):
            v = load[e] / counts[e] if counts[e] > 0 else np.inf  # uncovered experts first
            if not held[e] and v > best_val:
                best, best_val = e, v
        if best >= 0:
            out[s] = best
            counts[best] += 1
    return out


@numba.njit(_i64[:](_i64[:], _i64[:], _i64[:], _b1[:]), cache=True)
def _match(current, target, slot_rank, alive):
    """Reorder ``target`` within each rank so slots keep their current expert where they can."""
    S = current.shape[0]
    out = np.full(S, -1, dtype=np.int64)
    used = np.zeros(S, dtype=np.bool_)  # target entries already placed
    for s in range(S):  # keep: a target entry on the same rank with the same expert
        if not alive[slot_rank[s]] or current[s] < 0:
            continue
        for t in range(S):
            if not used[t] and slot_rank[t] == slot_rank[s] and target[t] == current[s]:
                out[s] = current[s]
                used[t] = True
                break
    for t in range(S):  # the rest go to the rank's first slot still undecided
        if used[t] or target[t] < 0:
            continue
        for s in range(S):
            if slot_rank[s] == slot_rank[t] and out[s] < 0:
                out[s] = target[t]
                used[t] = True
                break
    return out


# ---------------------------------------------------------------------------------------------
# Python entry points (argument checks, then one numba call each)


@dataclass
class Plan:
    """A placement plan for one layer.

    phy2log [S] the new map; copies: (target slot, expert, source kind, source slot or -1) rows;
    uncovered: experts left with no live replica; single_homed: experts whose live replicas all
    sit on one host (a host failure would need a shadow reload)."""

    phy2log: np.ndarray
    copies: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.int64))
    uncovered: list[int] = field(default_factory=list)
    single_homed: list[int] = field(default_factory=list)


def _i64a(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.int64))


def _finish(phy2log, slot_rank, alive, rank_host, num_experts, copies=None) -> Plan:
    live = (phy2log >= 0) & alive[slot_rank]
    hosts = [set() for _ in range(num_experts)]
    for s in np.nonzero(live)[0]:
        hosts[phy2log[s]].add(int(rank_host[slot_rank[s]]))
    uncovered = [e for e in range(num_experts) if not hosts[e]]
    single = [e for e in range(num_experts) if len(hosts[e]) == 1]
    return Plan(phy2log, copies if copies is not None else np.zeros((0, 4), np.int64), uncovered, single)


def initial_placement(
    load, topology: Topology, slots_per_rank: int, num_replicas: int | None = None
) -> tuple[Plan, np.ndarray]:
    """Returns (plan, slot_rank [S]) for S = world_size * slots_per_rank slots, ranks in contiguous
    blocks. ``num_replicas`` (default: every slot) replicas in total; the rest stay spare."""
    load = np.ascontiguousarray(np.asarray(load, dtype=np.float64))
    E, W = load.shape[0], topology.world_size
    S = W * slots_per_rank
    num_replicas = S if num_replicas is None else num_replicas
    if not E <= num_replicas <= S:
        raise ValueError(f"num_replicas must lie in [num_experts={E}, num_slots={S}], got {num_replicas}")
    if (load < 0).any() or not np.isfinite(load).all():
        raise ValueError("load must be finite and non-negative")
    slot_rank = np.repeat(np.arange(W, dtype=np.int64), slots_per_rank)
    alive = np.ones(W, dtype=np.bool_)
    counts = _replica_counts(load, np.ones(E, dtype=np.int64), num_replicas, W)
    phy2log = _pack(load, counts, np.full(S, -1, dtype=np.int64), slot_rank, alive, topology.rank_host)
    return _finish(phy2log, slot_rank, alive, topology.rank_host, E), slot_rank


def repair_plan(
    phy2log, slot_rank, alive, load, topology: Topology, *, shadow_in_memory: bool = True,
    restore_redundancy: bool = True, busy: np.ndarray | None = None, slot_bytes: float = 1.0,
) -> Plan:
    """Plan coverage (and then redundancy) for the ranks with ``alive[r] == False``. ``busy`` [W]
    float64 (updated in place): seconds of copying each rank already has, from the plans of other
    layers, whose experts take ``slot_bytes`` each; ties between targets go to the least busy rank,
    so the copies of a multi-layer repair run on all the survivors at once."""
    phy2log, slot_rank = _i64a(phy2log), _i64a(slot_rank)
    alive = np.ascontiguousarray(np.asarray(alive, dtype=np.bool_))
    load = np.ascontiguousarray(np.asarray(load, dtype=np.float64))
    if alive.shape[0] != topology.world_size:
        raise ValueError(f"alive has {alive.shape[0]} ranks, topology has {topology.world_size}")
    if not alive.any():
        raise ValueError("no rank is alive: nothing to repair onto")
    if busy is None:
        busy = np.zeros(topology.world_size)
    if busy.shape != (topology.world_size,) or busy.dtype != np.float64:
        raise ValueError(f"busy must be float64 [{topology.world_size}], got {busy.dtype} {list(busy.shape)}")
    new, copies = _repair(
        phy2log, slot_rank, alive, load, topology.rank_host, topology.seconds_per_byte,
        shadow_in_memory, restore_redundancy, busy, float(slot_bytes),
    )
    return _finish(new, slot_rank, alive, topology.rank_host, load.shape[0], copies)


def rebalance(phy2log, slot_rank, alive, load, topology: Topology, num_replicas: int | None = None) -> Plan:
    """A placement for ``load`` over the alive ranks, matched to ``phy2log`` to move few experts.
    copies lists every slot whose expert changes, with its cheapest live source."""
    phy2log, slot_rank = _i64a(phy2log), _i64a(slot_rank)
    alive = np.ascontiguousarray(np.asarray(alive, dtype=np.bool_))
    load = np.ascontiguousarray(np.asarray(load, dtype=np.float64))
    free = np.where(alive[slot_rank], -1, phy2log)  # dead ranks keep their (unrouted) entries
    capacity = int(alive[slot_rank].sum())
    E = load.shape[0]
    num_replicas = capacity if num_replicas is None else min(num_replicas, capacity)
    if num_replicas < E:
        raise ValueError(f"{capacity} live slots cannot hold {E} experts")
    counts = _replica_counts(load, np.ones(E, dtype=np.int64), num_replicas, int(alive.sum()))
    target = _pack(load, counts, free, slot_rank, alive, topology.rank_host)
    new = _match(np.where(alive[slot_rank], phy2log, -1), np.where(alive[slot_rank], target, -1), slot_rank, alive)
    new = np.where(alive[slot_rank], new, phy2log)
    return _finish(new, slot_rank, alive, topology.rank_host, E, _copies(phy2log, new, slot_rank, alive, topology))


def readmit_plan(phy2log, slot_rank, alive, ranks, load, topology: Topology) -> Plan:
    """Repaired ``ranks`` (one rank or a list) rejoin with empty slots. Every live replica stays where
    it is; the rejoined ranks' slots (and any spares) get the next replicas by load, one per expert
    per rank, each sourced from the cheapest live replica or the host shadow."""
    phy2log, slot_rank = _i64a(phy2log), _i64a(slot_rank)
    alive = np.array(alive, dtype=np.bool_)
    load = np.ascontiguousarray(np.asarray(load, dtype=np.float64))
    ranks = [ranks] if isinstance(ranks, (int, np.integer)) else list(ranks)
    for rank in ranks:
        if not 0 <= rank < alive.shape[0] or alive[rank]:
            raise ValueError(f"rank {rank} is not a dead rank of this placement")
    joining = np.isin(slot_rank, ranks)
    alive[ranks] = True
    current = np.where(alive[slot_rank] & ~joining, phy2log, -1)
    new = _fill_free(load, current, slot_rank, alive)
    new = np.where(alive[slot_rank], new, phy2log)
    return _finish(new, slot_rank, alive, topology.rank_host, load.shape[0], _copies(current, new, slot_rank, alive, topology))


def peer_kind(topology: Topology, src_rank: int, dst_rank: int) -> int:
    """Source kind of a copy from a replica on ``src_rank`` into a slot on ``dst_rank``."""
    if src_rank == dst_rank:
        return SOURCE_LOCAL
    host = topology.rank_host
    return SOURCE_PEER_HOST if host[src_rank] == host[dst_rank] else SOURCE_PEER_REMOTE


def _copies(old, new, slot_rank, alive, topology: Topology) -> np.ndarray:
    """Rows (slot, expert, source kind, source slot) for every live slot whose expert changes,
    sourced from the cheapest slot that holds the expert in ``old`` (on an alive rank)."""
    cost = topology.seconds_per_byte
    rows = []
    for s in np.nonzero((new != old) & (new >= 0) & alive[slot_rank])[0]:
        e, r = int(new[s]), int(slot_rank[s])
        best = (SOURCE_SHADOW_MEMORY, -1)
        for s2 in np.nonzero((old == e) & alive[slot_rank])[0]:
            k = peer_kind(topology, int(slot_rank[s2]), r)
            if cost[k] < cost[best[0]]:
                best = (k, int(s2))
        rows.append((int(s), e, *best))
    return np.array(rows, dtype=np.int64).reshape(-1, 4)
