"""Every wait in ElasticGroup has a deadline: each test makes one wait meet a member that never comes
(alive by heartbeat, so no other rule ends the wait) and checks it ends within its bound, typed."""

import datetime
import json
import threading
import time

import pytest
import torch
import torch.distributed as dist

from moe_resilient import shm
from moe_resilient.group import ElasticGroup, RankFailure

SLACK = 3.0  # seconds of scheduling noise allowed over a deadline on a loaded 2-core host


@pytest.fixture
def store():
    s = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=30))
    yield s
    shm.unlink_job(f"127.0.0.1_{s.port}_")  # the segments of groups a test never closed


def _group(store, rank, world, **kw):
    kw.setdefault("timeout", 0.5)
    kw.setdefault("agree_timeout", 0.5)
    return ElasticGroup("127.0.0.1", store.port, rank, world, **kw)


def _in_threads(*fns):
    """Run fns concurrently; returns their results (or exceptions)."""
    out = [None] * len(fns)

    def run(i, fn):
        try:
            out[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i, fn), daemon=True) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def _started(store, world, **kw):
    groups = [_group(store, r, world, **kw) for r in range(world)]
    assert all(isinstance(g, ElasticGroup) for g in _in_threads(*[g.start for g in groups]))
    return groups


def test_start_waits_for_every_rank_until_start_timeout(store):
    group = _group(store, 0, 2, start_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"waited 0.5 s for every rank to start; still missing \['init/1'\]"):
        group.start()
    assert time.monotonic() - t0 < 0.5 + SLACK
    group.close()


def test_a_replacement_nobody_admits_gives_up_at_join_timeout(store):
    groups = _started(store, 2)
    groups[1].close()
    late = _group(store, 1, 2, join_timeout=0.5)  # a new incarnation of rank 1; no member runs a step
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="rank 1 was not admitted within 0.5 s"):
        late.start()
    assert time.monotonic() - t0 < 0.5 + SLACK
    for g in (groups[0], late):
        g.close()


def test_agreement_stops_waiting_for_a_live_member_at_agree_timeout(store):
    """Rank 1 beats but never enters the collective nor agreement: the collective ends at ``timeout``,
    agreement at ``agree_timeout``, and rank 0 goes on alone."""
    groups = _started(store, 2)
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"lost ranks \[1\].*collective timed out after 0.5 s") as info:
        groups[0].all_reduce(torch.ones(1))
    assert time.monotonic() - t0 < 0.5 + 0.5 + SLACK
    assert info.value.lost_ranks == [1] and groups[0].members == (0,)
    assert groups[0].all_reduce(torch.ones(1)).item() == 1.0
    for g in groups:
        g.close()


def test_a_member_that_never_shows_up_is_agreed_away_at_agree_timeout(store):
    """Rank 2 checks in to agreement, then never builds the next generation (alive by heartbeat):
    the others stop waiting for it at ``agree_timeout``, agree once more without it, and go on."""
    groups = _started(store, 3)

    def check_in_and_stall():
        groups[2]._form = lambda g, members: time.sleep(5)  # stuck outside the new group, still beating
        groups[2]._agree()

    def timed(group):
        t0 = time.monotonic()
        try:
            group.all_reduce(torch.ones(1))
        except RankFailure as exc:
            return exc, time.monotonic() - t0

    results = _in_threads(lambda: timed(groups[0]), lambda: timed(groups[1]), check_in_and_stall)
    for r in (0, 1):
        failure, elapsed = results[r]
        assert failure.lost_ranks == [2], results
        assert groups[r].members == (0, 1) and groups[r].generation == 2
        assert elapsed < 2 * 0.5 + SLACK  # agree_timeout twice: the missing wait, then its agreement
    sums = _in_threads(*[lambda g=g: g.all_reduce(torch.ones(1)).item() for g in groups[:2]])
    assert sums == [2.0, 2.0]
    for g in groups:
        g.close()


def test_a_join_request_never_written_is_voided_at_agree_timeout(store):
    """A replacement killed between counting its request and writing it: the members void the request
    after ``agree_timeout`` (every member reads the same), admit nobody, and go on."""
    groups = _started(store, 2)
    prefixed = dist.PrefixStore("moe_resilient", store)
    prefixed.add("join/count", 1)  # counted, never written
    deadline = time.monotonic() + 5
    while any(g.detector.joins() < 1 for g in groups) and time.monotonic() < deadline:
        time.sleep(0.01)
    counts = torch.zeros(2, dtype=torch.long)
    _in_threads(*[lambda g=g: g.exchange_counts(counts) for g in groups])
    assert all(g.pending_admission() for g in groups)
    t0 = time.monotonic()
    assert _in_threads(*[g.step_boundary for g in groups]) == [[], []]
    assert time.monotonic() - t0 < 0.5 + SLACK
    assert json.loads(prefixed.get("join/seq/1")) is None and all(g.generation == 1 for g in groups)
    assert all(not g.pending_admission() for g in groups)
    for g in groups:
        g.close()


def test_finish_waits_for_the_others_only_until_its_timeout(store):
    groups = _started(store, 2)
    t0 = time.monotonic()
    groups[0].finish(timeout=0.5)  # rank 1 never finishes
    assert time.monotonic() - t0 < 0.5 + SLACK
    groups[1].close()
