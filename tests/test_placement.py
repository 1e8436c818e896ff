"""ExpertPlacement: derived tensors, in-place mutators, validation that leaves no partial state."""

import pytest
import torch

from moe_resilient import ExpertPlacement, PlacementError


def _snapshot(p):
    return {n: b.clone() for n, b in p.named_buffers()}


def _assert_unchanged(p, before):
    for n, b in p.named_buffers():
        assert torch.equal(b, before[n]), n


def test_default_placement_and_derived_tensors():
    p = ExpertPlacement(4, 6, world_size=2)
    assert p.phy2log.tolist() == [0, 1, 2, 3, -1, -1]
    assert p.slot_rank.tolist() == [0, 0, 0, 1, 1, 1]
    assert p.logcnt.tolist() == [1, 1, 1, 1]
    assert p.log2phy.shape == (4, 3)  # max_replicas = S - E + 1
    assert p.spare_slots() == [4, 5] and p.spare_slots(rank=0) == []


def test_mutators_are_in_place_and_consistent():
    p = ExpertPlacement(4, 6, world_size=2)
    ptrs = {n: b.data_ptr() for n, b in p.named_buffers()}
    p.assign(4, 1)
    p.assign(5, 1)
    assert p.slots_of(1) == [1, 4, 5] and p.logcnt[1] == 3
    p.remap([0, 1, 2, 3, 0, 3])  # replicas of 0 and 3 on rank 1
    assert p.slots_of(0) == [0, 4] and p.slots_of(3) == [3, 5]
    p.mark_dead(0, allow_uncovered=True)  # slots 0, 1, 2 leave routing; expert 1, 2 uncovered
    assert p.uncovered() == [1, 2] and p.slots_of(0) == [4]
    assert {n: b.data_ptr() for n, b in p.named_buffers()} == ptrs


def test_mark_dead_keeps_surviving_replicas():
    p = ExpertPlacement(4, 8, world_size=2, phy2log=[0, 1, 2, 3, 2, 3, 0, 1])
    p.mark_dead(0)
    assert p.dead_ranks() == [0]
    assert p.log2phy[:, 0].tolist() == [6, 7, 4, 5] and p.logcnt.tolist() == [1, 1, 1, 1]
    p.mark_alive(0)
    assert p.logcnt.tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda p: p.assign(9, 0), "slot 9 out of range"),
        (lambda p: p.assign(4, 7), "unknown expert 7"),
        (lambda p: p.clear(0), r"experts \[0\] would have no live replica"),
        (lambda p: p.remap([0, 1, 2, 3, 9, -1]), "unknown expert 9 in slot 4"),
        (lambda p: p.remap([0, 1, 2]), "phy2log must have shape"),
        (lambda p: p.mark_dead(1), r"experts \[3\] would have no live replica"),
        (lambda p: p.mark_dead(5), "rank 5 out of range"),
    ],
)
def test_invalid_edits_raise_and_change_nothing(edit, match):
    p = ExpertPlacement(4, 6, world_size=2)
    before = _snapshot(p)
    with pytest.raises(PlacementError, match=match):
        edit(p)
    _assert_unchanged(p, before)


def test_dead_rank_cannot_serve_and_uncovered_needs_consent():
    p = ExpertPlacement(4, 8, world_size=2)  # experts on rank 0, rank 1 all spare
    p.mark_dead(1)
    with pytest.raises(PlacementError, match="dead rank 1"):
        p.assign(6, 0)
    p.mark_alive(1)
    p.mark_dead(0, allow_uncovered=True)
    assert p.uncovered() == [0, 1, 2, 3] and p.logcnt.sum() == 0


def test_max_replicas_enforced():
    p = ExpertPlacement(2, 6, max_replicas=2)
    with pytest.raises(PlacementError, match="max_replicas=2"):
        p.remap([0, 1, 0, 0, -1, -1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_experts": 4, "num_slots": 3}, "num_slots"),
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": 2, "num_slots": 2, "world_size": 2, "slot_rank": [0, 2]}, "slot_rank"),
        ({"num_experts": 2, "num_slots": 3, "world_size": 2, "slot_rank": [0, 1, 0]}, "non-decreasing"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(PlacementError, match=match):
        ExpertPlacement(**kwargs)
