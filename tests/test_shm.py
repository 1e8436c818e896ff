"""The shared-memory transport among the ranks of one host (shm.py): what ElasticGroup uses for its
all-to-alls with transport "auto" whenever every member shares the host. Real processes under the
launcher."""

import datetime
import glob
import json
import os
import signal
import sys
import time

import pytest
import torch

from moe_resilient import shm
from moe_resilient.launch import Launcher

HERE = os.path.dirname(__file__)


def _run(tmp_path, *args, nproc=3, wake=None):
    """Run the worker on ``nproc`` ranks; ``wake``: a hung rank to SIGCONT once the others are done."""
    cmd = [sys.executable, os.path.join(HERE, "shm_worker.py"), str(tmp_path), *args]
    with Launcher(nproc, cmd, env={"MOE_RESILIENT_TRANSPORT": "auto"}, log_dir=str(tmp_path / "logs")) as launcher:
        if wake is not None:
            deadline = time.monotonic() + 120
            while len(glob.glob(str(tmp_path / "rank*.json"))) < nproc - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            launcher.kill(wake, signal.SIGCONT)
        codes = launcher.wait(120)
        job = f"{launcher.host}_{launcher.port}_"
    logs = {r: open(tmp_path / "logs" / f"rank{r}.log").read()[-2000:] for r in range(nproc)}
    results = {int(os.path.basename(p)[4:-5]): json.load(open(p)) for p in glob.glob(str(tmp_path / "rank*.json"))}
    return codes, logs, results, job


def test_exchanges_equal_gloo_bit_for_bit(tmp_path):
    """Random splits over 3 ranks (empty pairs, 0, 1, 5 rows, and 300k rows: several messages per pair),
    fp32 and bf16, 24 exchanges, half into given outputs: each equal to the same exchange through gloo.
    An output of the wrong shape is refused on every rank, and the group goes on. The launcher leaves
    no segment behind."""
    codes, logs, results, job = _run(tmp_path, "equal")
    assert codes == {0: 0, 1: 0, 2: 0}, logs
    for r, got in results.items():
        assert got["shm"] and len(got["equal"]) == 24 and all(got["equal"]), (r, got)
        assert "out must be a contiguous torch.float32 tensor of shape [3, 3]" in got["bad_out"]
        assert got["after_bad_out"] == 6  # the group goes on
    assert not glob.glob(os.path.join(shm.SHM_DIR, f"moe_resilient_{job.replace('.', '_')}*"))


@pytest.mark.parametrize("victim,side", [(1, "sender"), (0, "sender"), (2, "receiver")])
def test_a_rank_killed_mid_transfer_is_lost_and_survivors_go_on(tmp_path, victim, side):
    """The victim dies after posting (as a sender) or taking (as a receiver) its second 1 MiB message
    of a 4.6 MiB-per-pair exchange: the survivors see it gone on the liveness board, clear it in the
    exchange's live-rank mask, agree it away with RankFailure, and the next exchange (a fresh segment)
    goes through between them."""
    codes, logs, results, _ = _run(tmp_path, "kill", str(victim), *(["receiver"] if side == "receiver" else []))
    survivors = [r for r in range(3) if r != victim]
    assert codes == {r: -signal.SIGKILL if r == victim else 0 for r in range(3)}, logs
    assert sorted(results) == survivors
    for r in survivors:
        assert results[r]["lost"] == [victim] and "liveness board" in results[r]["error"], results[r]
        assert results[r]["after_rows"] == 2 * 7  # from the two survivors
        # the exchange that met the death cleared the victim in its mask; the new generation's is fresh
        assert results[r]["mask"] == [i != victim for i in range(3)] and all(results[r]["fresh_mask"])


def test_messages_are_published_last(tmp_path):
    """In one process, on a segment of 2 ranks: a message is taken only once posted, in order, and the
    next is posted only once the previous was taken; posting rings the receiver's doorbell, taking the
    sender's."""
    ex = shm.ShmExchange(str(tmp_path / "segment"), 0, 2, capacity=64)
    seg, slot, bell0, bell1 = ex.segment, ex.slot(0, 1), 0, shm.BELL

    def rung(offset):
        return int(seg[offset: offset + 4].view(torch.int32))

    a, b = torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)
    out = torch.empty(16, dtype=torch.uint8)
    assert not shm._take(seg, slot, out, 1, bell0)  # nothing posted
    assert shm._post(seg, slot, 64, a, 1, bell1) and rung(bell1) == 1
    assert not shm._post(seg, slot, 64, b, 2, bell1)  # message 1 not taken yet
    assert shm._take(seg, slot, out, 1, bell0) and torch.equal(out, a) and rung(bell0) == 1
    assert shm._post(seg, slot, 64, b, 2, bell1) and shm._take(seg, slot, out, 2, bell0) and torch.equal(out, b)
    with pytest.raises(RuntimeError, match="exceeds the slot's capacity"):
        shm._post(seg, slot, 64, torch.zeros(65, dtype=torch.uint8), 3, bell1)


def test_a_withdrawn_message_is_never_taken(tmp_path):
    """Two ranks of one segment in one process: rank 0 posts to rank 1 and gives up (abandon withdraws
    what was not taken); rank 1 then takes nothing, and its output keeps its old bytes."""
    ex = [shm.ShmExchange(str(tmp_path / "segment"), r, 2, capacity=64) for r in (0, 1)]
    nothing = torch.empty(0, dtype=torch.uint8)
    recv = torch.full((64,), 7, dtype=torch.uint8)
    sender = ex[0].all_to_all(nothing, torch.arange(64, dtype=torch.uint8), [0, 0], [0, 64], (0, 1))
    assert not sender.is_completed() and sender.state.tolist() == [1, 0]  # posted; nothing from rank 1 yet
    assert not sender.abandon()
    receiver = ex[1].all_to_all(recv, nothing, [64, 0], [0, 0], (0, 1))
    assert not receiver.is_completed() and receiver.state.tolist() == [1, 0]  # its own post; nothing taken
    assert torch.equal(recv, torch.full((64,), 7, dtype=torch.uint8))


def test_rows_off_the_host_ride_gloo(tmp_path):
    """Shared memory carries rows in host memory only: CUDA rows go through gloo, which stages them
    (here a meta tensor stands in for a device tensor)."""
    from moe_resilient.collectives import Collectives

    calls = []

    class Gloo:
        def alltoall_base(self, *args):
            calls.append("gloo")

    class Group(Collectives):
        members = (0, 1)
        _shm = shm.ShmExchange(str(tmp_path / "segment"), 0, 2, capacity=64)

    group = Group()
    group._shm.all_to_all = lambda *args: calls.append("shm")
    for device in ("cpu", "meta"):
        rows = torch.empty(2, 4, device=device)
        group._alltoall(lambda: Gloo(), rows, rows, [1, 1], [1, 1])
    assert calls == ["shm", "gloo"]


def test_an_exchange_resumes_across_slices_and_chunks(tmp_path):
    """Two ranks of one segment in two threads, 200 bytes each way through 64-byte slots (4 messages a
    pair): slices of 1 ms that run out mid-exchange resume where they stopped; rank 1 starts late, so
    rank 0's first slices time out; every byte arrives."""
    import threading

    path = str(tmp_path / "segment")
    ex = [shm.ShmExchange(path, r, 2, capacity=64) for r in (0, 1)]
    send = [torch.randint(0, 255, (200,), dtype=torch.uint8, generator=torch.Generator().manual_seed(r)) for r in (0, 1)]
    recv = [torch.zeros(200, dtype=torch.uint8) for _ in (0, 1)]
    slices = [0, 0]

    def run(r):
        if r == 1:
            time.sleep(0.02)
        work = ex[r].all_to_all(recv[r], send[r], [0, 200] if r == 0 else [200, 0],
                                [0, 200] if r == 0 else [200, 0], (0, 1))
        while True:
            try:
                work.wait(datetime.timedelta(milliseconds=1))
                return
            except TimeoutError:
                slices[r] += 1

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert torch.equal(recv[0], send[1]) and torch.equal(recv[1], send[0])
    assert slices[0] >= 5 and ex[0].sent[1] == ex[0].taken[1] == 4


def test_two_senders_killed_at_once(tmp_path):
    """Ranks 1 and 2 of 4 die mid-transfer together: the two survivors agree both away and go on."""
    codes, logs, results, _ = _run(tmp_path, "kill", "1,2", nproc=4)
    assert codes == {0: 0, 1: -signal.SIGKILL, 2: -signal.SIGKILL, 3: 0}, logs
    for r in (0, 3):
        assert sorted(results[r]["lost"]) == [1, 2], results[r]  # agreed in one round or two
        assert results[r]["after_rows"] == 2 * 7 and results[r]["mask"][0] and results[r]["mask"][3]


@pytest.mark.parametrize("how", ["sender", "receiver"])
def test_a_rank_hung_mid_transfer_is_fenced_when_it_wakes(tmp_path, how):
    """Rank 1 SIGSTOPs itself mid-transfer: as a sender, having posted two of its 1 MiB messages; as
    a receiver of a one-message exchange, having taken one peer's message (it may have completed that
    exchange: the others then lose it in the next, where they have posted to it before they notice).
    The survivors see its heartbeat stall, agree it away, withdraw what it had not taken and go on;
    woken afterwards, it cannot complete what they abandoned, finds itself fenced and exits, never
    reading a torn row."""
    codes, logs, results, _ = _run(tmp_path, "kill", "1", "stop", *(["receiver", "small"] if how == "receiver" else []),
                                   wake=1)
    assert codes == {0: 0, 1: 3, 2: 0}, logs
    assert results[1] == {"fenced": True}
    for r in (0, 2):
        assert results[r]["lost"] == [1], results[r]
        assert results[r]["after_rows"] == 2 * 7 and results[r]["mask"] == [True, False, True]
    assert any("heartbeat of ranks [1] stalled" in results[r]["error"] for r in (0, 2))  # the first to see it
