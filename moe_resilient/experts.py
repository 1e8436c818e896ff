"""Expert weight slots: stacked SwiGLU weights, one row per physical slot, and grouped compute."""

from __future__ import annotations

import ctypes
import sys

import torch
import torch.nn.functional as F
from torch import nn

from moe_resilient import ops


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask Linux to back the whole 2 MiB pages inside ``t``'s storage with transparent huge pages.
    Call before the pages are first written (fresh ``torch.empty``), so the kernel faults them in huge:
    a decode step streams every expert weight once, and 512x fewer TLB entries made it ~4% faster
    here (benchmarks/RESULTS.md). Returns whether the advice was given; a no-op elsewhere."""
    if not sys.platform.startswith("linux") or t.device.type != "cpu":
        return False
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    end = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    if end <= start:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE) == 0


class SlotNotHeldError(LookupError):
    """A slot's weights are held by another rank (sharded storage under expert parallelism)."""


class SlotExperts(nn.Module):
    """SwiGLU experts stored per physical slot: the rows of the slots in ``held`` (all by default; under
    expert parallelism, the contiguous block of slots this rank owns).

    w13 [len(held), 2I, H]: gate (w1) rows then up (w3) rows, the HF v5 ``gate_up_proj`` layout.
    w2  [len(held), H, I]:  down projection.
    Methods take global slot ids; ``row(slot)`` is the slot's row here.
    """

    def __init__(self, num_slots: int, hidden_size: int, intermediate_size: int, *, held: range | None = None,
                 dtype=None, device=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_slots = num_slots
        self.held = range(num_slots) if held is None else held
        if self.held.step != 1 or not 0 <= self.held.start <= self.held.stop <= num_slots:
            raise ValueError(f"held slots {self.held} must be a contiguous range inside [0, {num_slots})")
        kw = {"dtype": dtype, "device": device}
        self.w13 = nn.Parameter(torch.empty(len(self.held), 2 * intermediate_size, hidden_size, **kw))
        self.w2 = nn.Parameter(torch.empty(len(self.held), hidden_size, intermediate_size, **kw))
        for w in (self.w13, self.w2):
            advise_huge_pages(w)
        self.reset_parameters()
        self._optimizer = None
        self.state_resets = 0  # slots whose tracked optimizer state was reset (written from outside)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w13, std=self.hidden_size**-0.5)
        nn.init.normal_(self.w2, std=self.intermediate_size**-0.5)

    @property
    def sharded(self) -> bool:
        return len(self.held) != self.num_slots

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot's weights (w13 and w2), also on a rank that holds no slot."""
        return (self.w13.shape[1:].numel() + self.w2.shape[1:].numel()) * self.w13.element_size()

    def holds(self, slot: int) -> bool:
        return slot in self.held

    def row(self, slot: int) -> int:
        """``slot``'s row in w13 / w2; SlotNotHeldError if another rank holds it."""
        if slot not in self.held:
            raise SlotNotHeldError(f"slot {slot} is held by another rank (this one holds slots "
                                   f"{self.held.start}..{self.held.stop - 1})")
        return slot - self.held.start

    @torch.no_grad()
    def keep(self, held: range) -> None:
        """Keep only the rows of ``held`` (a contiguous range of the slots held now, or an empty one)
        and free the rest."""
        if held.step != 1 or (len(held) and not (held.start in self.held and held.stop - 1 in self.held)):
            raise ValueError(f"cannot keep slots {held}: this storage holds {self.held}")
        a, b = (self.row(held.start), self.row(held.stop - 1) + 1) if len(held) else (0, 0)
        for name in ("w13", "w2"):
            old = getattr(self, name)
            new = torch.empty_like(old[a:b])
            advise_huge_pages(new)
            new.copy_(old[a:b])
            setattr(self, name, nn.Parameter(new, requires_grad=old.requires_grad))
        self.held = held

    def forward(self, x_rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x_rows [N, H] grouped by held slot (row order), offsets [len(held)+1] -> [N, H]."""
        return ops.grouped_swiglu(x_rows, offsets, self.w13, self.w2)

    # ----------------------------------------------------------------------------------- optimizer state
    def track_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Move ``optimizer``'s per-slot state (its tensors shaped like w13 and w2, e.g. Adam's moments)
        with the weights: a slot copied from another slot, here or on a peer, takes that slot's state;
        one written from outside (the shadow store) starts from zero state, counted in ``state_resets``.
        Build the optimizer after ``shard``, which replaces the parameters."""
        self._optimizer = optimizer

    def _state_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        opt = self._optimizer
        s13, s2 = (opt.state.get(self.w13), opt.state.get(self.w2)) if opt is not None else (None, None)
        if not s13 or not s2:
            return []
        return [(s13[k], s2[k]) for k in sorted(s13) if torch.is_tensor(s13[k]) and s13[k].shape == self.w13.shape
                and torch.is_tensor(s2.get(k)) and s2[k].shape == self.w2.shape]

    @property
    def slot_state_bytes(self) -> int:
        """Bytes of one slot's rows of the tracked optimizer state."""
        return sum(t[0].numel() * t.element_size() for pair in self._state_pairs() for t in pair)

    def slot_state(self, slot: int) -> list[torch.Tensor]:
        """Views of ``slot``'s rows of the tracked optimizer state (per entry: w13's row, then w2's)."""
        r = self.row(slot)
        return [t[r] for pair in self._state_pairs() for t in pair]

    @torch.no_grad()
    def write_slot(self, slot: int, w13: torch.Tensor, w2: torch.Tensor, state: list[torch.Tensor] | None = None
                   ) -> None:
        """Copy one expert's weights (w13 [2I, H], w2 [H, I]) into ``slot`` in place, with ``state``
        (rows as ``slot_state`` lists them) for the tracked optimizer state, else zero state."""
        if w13.shape != self.w13.shape[1:] or w2.shape != self.w2.shape[1:]:
            raise ValueError(
                f"expert weights of shape w13 {list(w13.shape)}, w2 {list(w2.shape)} do not fit slots of "
                f"w13 {list(self.w13.shape[1:])}, w2 {list(self.w2.shape[1:])}"
            )
        r = self.row(slot)
        self.w13[r].copy_(w13)
        self.w2[r].copy_(w2)
        if state is None:
            self.reset_state(slot)
        for row, value in zip(self.slot_state(slot), state or []):
            row.copy_(value)

    @torch.no_grad()
    def reset_state(self, slot: int) -> None:
        """Zero ``slot``'s rows of the tracked optimizer state: its weights came from outside."""
        rows = self.slot_state(slot)
        for row in rows:
            row.zero_()
        self.state_resets += bool(rows)

    @torch.no_grad()
    def copy_slot(self, dst: int, src: int) -> None:
        d, s = self.row(dst), self.row(src)
        self.w13[d].copy_(self.w13[s])
        self.w2[d].copy_(self.w2[s])
        for pair in self._state_pairs():
            for t in pair:
                t[d].copy_(t[s])

    def slot_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2I, H], w2 [H, I]) of ``slot``: views of its row, without autograd history."""
        r = self.row(slot)
        return self.w13.detach()[r], self.w2.detach()[r]


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP (the shared expert), HF naming: gate_proj, up_proj, down_proj."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, dtype=None, device=None):
        super().__init__()
        kw = {"bias": False, "dtype": dtype, "device": device}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
