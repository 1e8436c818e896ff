"""The liveness board with real processes: held slots read alive, a SIGKILLed holder reads dead, a
replacement takes the slot over; a group's survivors learn of a crash from the board before the dead
rank's sockets close."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from moe_resilient.launch import Launcher
from moe_resilient.liveness import LivenessBoard

HOLD = "import sys, time; from moe_resilient.liveness import LivenessBoard as B; B(sys.argv[1]).hold(int(sys.argv[2])); print('held', flush=True); time.sleep(60)"


@pytest.fixture
def board():
    b = LivenessBoard.create(3)
    yield b
    b.unlink()


def _holder(board, rank):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, board.path, str(rank)], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"held\n"
    return proc


def _until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.001)
    return False


def test_watchers_count_each_death_of_a_holder_and_release_the_slot(board):
    """A watcher thread blocked in a slot's lock is woken by the kernel the moment its holder dies: it
    counts the death (what wakes a shared-memory exchange), frees the slot again and watches the
    replacement, whose death it counts too."""
    from moe_resilient import _C

    board.watch([1])
    before = _C.liveness_deaths()
    first = _holder(board, 1)
    time.sleep(0.1)  # the watcher, polling for a holder every 5 ms, blocks in its lock
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert _until(lambda: _C.liveness_deaths() == before + 1)
    assert _until(lambda: board.dead([1]) == [1])  # the watcher does not keep the slot
    second = _holder(board, 1)
    time.sleep(0.1)
    assert board.dead([1]) == [] and _C.liveness_deaths() == before + 1
    second.kill()
    second.wait(timeout=30)
    assert _until(lambda: _C.liveness_deaths() == before + 2)


def test_sigkilled_holder_reads_dead_and_a_replacement_takes_over(board):
    assert board.dead([0, 1, 2]) == [0, 1, 2]  # nobody started
    first = _holder(board, 1)
    try:
        assert board.dead([0, 1, 2]) == [0, 2]
        os.kill(first.pid, signal.SIGKILL)
        assert _until(lambda: board.dead([1]) == [1])
        assert board.dead([1]) == [1]  # a probe only reads: every prober sees it
        second = _holder(board, 1)  # the dead holder's slot is taken over
        try:
            assert board.dead([0, 1, 2]) == [0, 2]
        finally:
            second.kill()
            second.wait(timeout=30)
    finally:
        first.kill()
        first.wait(timeout=30)


def test_holder_thread_and_own_slot(board):
    board.hold(0)
    board.hold(0)  # again by the holder: no deadlock
    assert board.dead([0]) == []  # a probe by the holder itself reads alive and keeps the hold
    assert board.dead([0]) == []
    t = threading.Thread(target=board.hold, args=(1,))
    t.start()
    t.join()
    # held by a thread that has ended: released (join returns before the OS thread has quite exited)
    assert _until(lambda: board.dead([1]) == [1])


def test_bad_input(board, tmp_path):
    with pytest.raises(ValueError, match="has 3 slots; rank 3 is out of range"):
        board.dead([0, 3])
    with pytest.raises(ValueError, match="rank -1 is out of range"):
        board.hold(-1)
    with pytest.raises(OSError, match="cannot create"):
        LivenessBoard.create(2, directory=str(tmp_path / "missing"))
    not_a_board = tmp_path / "empty"
    not_a_board.write_bytes(b"")
    with pytest.raises(ValueError, match="not a board"):
        LivenessBoard(str(not_a_board)).dead([0])
    with pytest.raises(ValueError, match="at least one slot"):
        LivenessBoard.create(0)


# Rank 2 carries 2 GiB of touched memory, so the kernel takes ~0.3 s freeing it before its sockets
# close; the survivors, waiting in the next collective, must learn of the death from the board.
BIG_VICTIM = """
import json, os, signal, sys, time
import torch
from moe_resilient.group import ElasticGroup, RankFailure
group = ElasticGroup.from_env(heartbeat_timeout=5.0).start()
ballast = torch.ones(2 ** 29) if group.rank == 2 else None
group.barrier()
if group.rank == 2:
    time.sleep(0.2)  # the survivors are waiting in the next collective
    open(os.path.join(sys.argv[1], "killed_at"), "w").write(repr(time.time()))
    os.kill(os.getpid(), signal.SIGKILL)
try:
    group.barrier()
    result = {"error": None}
except RankFailure as failure:
    result = {"error": str(failure), "lost": failure.lost_ranks, "t": time.time()}
open(os.path.join(sys.argv[1], f"rank{group.rank}.json"), "w").write(json.dumps(result))
group.finish()
os._exit(0)
"""


def test_group_learns_of_a_crash_from_the_board(tmp_path):
    script = tmp_path / "big_victim.py"
    script.write_text(BIG_VICTIM)
    with Launcher(3, [sys.executable, str(script), str(tmp_path)], log_dir=str(tmp_path / "logs")) as launcher:
        codes = launcher.wait(120)
    assert codes == {0: 0, 1: 0, 2: -signal.SIGKILL}, codes
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(x["lost"] == [2] for x in results), results
    # a survivor sees it on the board, or (between its board probe and its store poll) sees another
    # survivor already agreeing; none waits for the dead rank's sockets to close
    board = ["ranks [2] exited (liveness board)" in x["error"] for x in results]
    relayed = ["a survivor reported a failure" in x["error"] for x in results]
    assert any(board) and all(b or r for b, r in zip(board, relayed)), results
