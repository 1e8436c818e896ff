"""A step's commit succeeds on every member or on none, even when one member gives up on a dead peer
while another counts in late: the outcome is decided once in the store."""

import datetime

import pytest
import torch.distributed as dist

from moe_resilient.group import _StoreBarrier


@pytest.fixture
def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=30))


def test_a_member_counting_in_after_another_gave_up_fails_too(store):
    x = _StoreBarrier(store, "c", 3)  # counts in, then dies
    z = _StoreBarrier(store, "c", 3)  # sees x dead, gives up
    assert not z.is_completed() and not z.abandon()
    y = _StoreBarrier(store, "c", 3)  # late: the count is now complete, but the barrier has failed
    with pytest.raises(RuntimeError, match="gave up"):
        y.is_completed()
    assert not x.abandon()


def test_giving_up_after_the_count_completed_is_success(store):
    members = [_StoreBarrier(store, "c", 3) for _ in range(3)]
    assert members[0].is_completed()
    assert members[1].abandon()  # it saw a peer die, but the barrier had completed for everyone
    assert members[2].is_completed()


def test_the_first_decision_stands_for_every_member(store):
    members = [_StoreBarrier(store, "c", 2) for _ in range(2)]
    assert not members[0].abandon()  # first to decide: the barrier fails, though every member counted in
    with pytest.raises(RuntimeError):
        members[1].is_completed()
