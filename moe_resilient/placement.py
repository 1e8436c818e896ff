"""Expert placement as fixed-address tensors.

Routing reads these buffers indirectly, so a placement change is an in-place ``copy_`` and compiled
graphs never see it. ``phy2log``, ``slot_rank`` and ``active`` are the source of truth;
``log2phy`` and ``logcnt`` are derived from them. Every mutator builds the whole new state on the
host, validates it, and only then copies it in: a rejected edit leaves nothing half-updated.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np
import torch
from torch import nn


class PlacementError(ValueError):
    """An invalid placement edit (unknown expert, slot out of range, uncovered expert, dead rank)."""


# Which experts may be left with no live replica: none (False), any (True), or these.
AllowUncovered = bool | Collection[int]


class ExpertPlacement(nn.Module):
    """Placement tensors of one MoE layer.

    Buffers (addresses never change):
      phy2log   [S]     logical expert held by each physical slot, -1 = empty/spare.
      log2phy   [E, R]  live slots of each logical expert, ascending, padded with -1.
      logcnt    [E]     number of live replicas of each logical expert.
      slot_rank [S]     rank that owns each slot; non-decreasing (slots numbered rank by rank).
      active    [W]     whether each rank is alive.

    A slot is *live* when it holds an expert and its rank is active.
    """

    phy2log: torch.Tensor
    log2phy: torch.Tensor
    logcnt: torch.Tensor
    slot_rank: torch.Tensor
    active: torch.Tensor

    def __init__(
        self,
        num_experts: int,
        num_slots: int | None = None,
        *,
        world_size: int = 1,
        slot_rank: Sequence[int] | torch.Tensor | None = None,
        phy2log: Sequence[int] | torch.Tensor | None = None,
        max_replicas: int | None = None,
    ):
        super().__init__()
        num_slots = num_experts if num_slots is None else num_slots
        if num_experts < 1:
            raise PlacementError(f"num_experts must be >= 1, got {num_experts}")
        if num_slots < num_experts:
            raise PlacementError(f"num_slots ({num_slots}) must be >= num_experts ({num_experts})")
        if world_size < 1:
            raise PlacementError(f"world_size must be >= 1, got {world_size}")
        self.num_experts = num_experts
        self.num_slots = num_slots
        self.world_size = world_size
        self.max_replicas = max_replicas if max_replicas is not None else num_slots - num_experts + 1
        if self.max_replicas < 1:
            raise PlacementError(f"max_replicas must be >= 1, got {self.max_replicas}")

        if slot_rank is None:  # contiguous blocks of slots per rank
            slot_rank = [s * world_size // num_slots for s in range(num_slots)]
        slot_rank_t = torch.as_tensor(slot_rank, dtype=torch.long).clone()
        if slot_rank_t.shape != (num_slots,):
            raise PlacementError(f"slot_rank must have shape [{num_slots}], got {list(slot_rank_t.shape)}")
        if slot_rank_t.numel() and (slot_rank_t.min() < 0 or slot_rank_t.max() >= world_size):
            raise PlacementError(f"slot_rank entries must lie in [0, {world_size})")
        if bool((slot_rank_t[1:] < slot_rank_t[:-1]).any()):  # expert parallelism sends each rank one run
            raise PlacementError(f"slot_rank must be non-decreasing (slots numbered rank by rank), got "
                                 f"{slot_rank_t.tolist()}")
        if phy2log is None:  # experts in the first E slots, the rest spare
            phy2log = [s if s < num_experts else -1 for s in range(num_slots)]

        self.register_buffer("phy2log", torch.full((num_slots,), -1, dtype=torch.long))
        self.register_buffer("log2phy", torch.full((num_experts, self.max_replicas), -1, dtype=torch.long))
        self.register_buffer("logcnt", torch.zeros(num_experts, dtype=torch.long))
        self.register_buffer("slot_rank", slot_rank_t)
        self.register_buffer("active", torch.ones(world_size, dtype=torch.bool))
        self._commit(self._as_phy2log(phy2log), self.active.cpu(), allow_uncovered=False)

    # ----------------------------------------------------------------------------------- queries
    def live_mask(self) -> torch.Tensor:
        """[S] bool: slot holds an expert and its rank is alive."""
        return (self.phy2log >= 0) & self.active[self.slot_rank]

    def slots_of(self, expert: int) -> list[int]:
        """Live slots of a logical expert."""
        self._check_expert(expert)
        return [s for s in self.log2phy[expert].tolist() if s >= 0]

    def uncovered(self) -> list[int]:
        """Logical experts with no live replica."""
        return torch.nonzero(self.logcnt == 0).flatten().tolist()

    def spare_slots(self, rank: int | None = None) -> list[int]:
        """Empty slots on alive ranks (optionally on one rank)."""
        free = (self.phy2log < 0) & self.active[self.slot_rank]
        if rank is not None:
            free &= self.slot_rank == rank
        return torch.nonzero(free).flatten().tolist()

    def dead_ranks(self) -> list[int]:
        return torch.nonzero(~self.active).flatten().tolist()

    # ----------------------------------------------------------------------------------- mutators
    def assign(self, slot: int, expert: int, *, allow_uncovered: AllowUncovered = False) -> None:
        """Make ``slot`` hold ``expert`` (-1 empties it). Weights must already be in the slot."""
        self._check_slot(slot)
        if expert != -1:
            self._check_expert(expert)
            if not bool(self.active[self.slot_rank[slot]]):
                raise PlacementError(f"slot {slot} is on dead rank {int(self.slot_rank[slot])}; it cannot serve")
        new = self.phy2log.cpu().clone()
        new[slot] = expert
        self._commit(new, self.active.cpu(), allow_uncovered)

    def clear(self, slot: int, *, allow_uncovered: AllowUncovered = False) -> None:
        """Take ``slot`` out of service."""
        self.assign(slot, -1, allow_uncovered=allow_uncovered)

    def remap(self, phy2log: Sequence[int] | torch.Tensor, *, allow_uncovered: AllowUncovered = False) -> None:
        """Replace the whole slot -> expert map at once."""
        self._commit(self._as_phy2log(phy2log), self.active.cpu(), allow_uncovered)

    def mark_dead(self, rank: int | Sequence[int], *, allow_uncovered: AllowUncovered = False) -> None:
        """Take every slot of the rank(s) out of routing."""
        active = self.active.cpu().clone()
        for r in [rank] if isinstance(rank, int) else list(rank):
            self._check_rank(r)
            active[r] = False
        self._commit(self.phy2log.cpu().clone(), active, allow_uncovered)

    def set_state(self, phy2log, active, *, allow_uncovered: AllowUncovered = False) -> None:
        """Replace the slot -> expert map and the alive ranks together (a restored checkpoint, or a
        placement received from a peer)."""
        self._commit(self._as_phy2log(phy2log), self._as_active(active), allow_uncovered)

    def check(self, phy2log, active=None, *, allow_uncovered: AllowUncovered = False) -> None:
        """Raise PlacementError if ``phy2log`` (with ``active``, default the current one) would be
        rejected; changes nothing."""
        active = self.active.cpu() if active is None else self._as_active(active)
        self._derive(self._as_phy2log(phy2log), active, allow_uncovered)

    def mark_alive(self, rank: int) -> None:
        """Return a repaired rank's slots to routing (its slots keep whatever ``phy2log`` says)."""
        self._check_rank(rank)
        active = self.active.cpu().clone()
        active[rank] = True
        self._commit(self.phy2log.cpu().clone(), active, allow_uncovered=True)

    # ----------------------------------------------------------------------------------- internals
    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise PlacementError(f"slot {slot} out of range [0, {self.num_slots})")

    def _check_expert(self, expert: int) -> None:
        if not 0 <= expert < self.num_experts:
            raise PlacementError(f"unknown expert {expert}: experts are [0, {self.num_experts})")

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise PlacementError(f"rank {rank} out of range [0, {self.world_size})")

    def _as_phy2log(self, phy2log) -> torch.Tensor:
        t = torch.as_tensor(phy2log, dtype=torch.long).clone().cpu()
        if t.shape != (self.num_slots,):
            raise PlacementError(f"phy2log must have shape [{self.num_slots}], got {list(t.shape)}")
        bad = (t < -1) | (t >= self.num_experts)
        if bad.any():
            s = int(torch.nonzero(bad)[0])
            raise PlacementError(f"unknown expert {int(t[s])} in slot {s}: experts are [0, {self.num_experts})")
        return t

    def _as_active(self, active) -> torch.Tensor:
        t = torch.as_tensor(active, dtype=torch.bool).clone().cpu()
        if t.shape != (self.world_size,):
            raise PlacementError(f"active must have shape [{self.world_size}], got {list(t.shape)}")
        return t

    def _derive(self, phy2log: torch.Tensor, active: torch.Tensor, allow_uncovered: AllowUncovered):
        """Validate a whole state and return its (log2phy, logcnt). In NumPy: a recovery derives a
        state for every edit, and small torch ops cost microseconds each."""
        p2l = phy2log.numpy()
        slots = np.flatnonzero((p2l >= 0) & active.numpy()[self.slot_rank.cpu().numpy()])
        experts = p2l[slots]
        logcnt = np.bincount(experts, minlength=self.num_experts)
        if int(logcnt.max()) > self.max_replicas:
            e = int(logcnt.argmax())
            raise PlacementError(
                f"expert {e} would have {int(logcnt[e])} live replicas, more than max_replicas={self.max_replicas}"
            )
        if allow_uncovered is not True:
            allowed = set() if allow_uncovered is False else set(allow_uncovered)
            missing = sorted(set(np.flatnonzero(logcnt == 0).tolist()) - allowed)
            if missing:
                raise PlacementError(f"experts {missing} would have no live replica (pass allow_uncovered=True)")
        order = np.lexsort((slots, experts))  # by expert, then slot
        by_expert = experts[order]
        column = np.arange(order.size) - (np.cumsum(logcnt) - logcnt)[by_expert]
        log2phy = np.full((self.num_experts, self.max_replicas), -1, dtype=np.int64)
        log2phy[by_expert, column] = slots[order]
        return torch.from_numpy(log2phy), torch.from_numpy(logcnt.astype(np.int64))

    def _commit(self, phy2log: torch.Tensor, active: torch.Tensor, allow_uncovered: AllowUncovered,
                derived: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Copy a state in; ``derived``: its (log2phy, logcnt) from ``_derive``, already validated."""
        log2phy, logcnt = derived if derived is not None else self._derive(phy2log, active, allow_uncovered)
        with torch.no_grad():  # in place: compiled graphs hold these addresses
            self.phy2log.copy_(phy2log)
            self.log2phy.copy_(log2phy)
            self.logcnt.copy_(logcnt)
            self.active.copy_(active)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, slots={self.num_slots}, world_size={self.world_size}, "
            f"max_replicas={self.max_replicas}, dead_ranks={self.dead_ranks()}"
        )
