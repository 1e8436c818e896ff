"""Peer weight transfer over real processes, with no shadow store anywhere: a repair restores lost
redundancy from the live replicas' owners, a replacement gets every slot back from its peers, and a
transfer cut by a second death leaves every survivor's placement alike (see transfer_worker.py)."""

import glob
import json
import os
import signal
import sys

import pytest

from moe_resilient import ShadowStore
from moe_resilient.launch import Launcher
from transfer_worker import build

HERE = os.path.dirname(__file__)
W = 4


def _run(tmp_path, mode, respawn=False, *extra):
    cmd = [sys.executable, os.path.join(HERE, "transfer_worker.py"), str(tmp_path), mode, *extra]
    with Launcher(W, cmd, respawn=respawn, log_dir=str(tmp_path / "logs")) as launcher:
        codes = launcher.wait(180)
    logs = {r: open(tmp_path / "logs" / f"rank{r}.log").read()[-3000:] for r in range(W)}
    results = {os.path.basename(p)[:-5]: json.load(open(p)) for p in glob.glob(str(tmp_path / "rank*.json"))}
    return codes, logs, results


def test_repair_restores_redundancy_from_peers(tmp_path):
    codes, logs, results = _run(tmp_path, "repair")
    assert codes == {0: 0, 1: 0, 2: 0, 3: -signal.SIGKILL}, (codes, logs)
    assert sorted(results) == ["rank0_0", "rank1_0", "rank2_0"]
    received = 0
    for got in results.values():
        assert got["out_err"] < 1e-5 and got["weights_err"] == 0.0, got
        [change] = got["changes"]
        assert change["lost"] == [3] and change["peer_transfers"] > 0, change
        # every byte came from a peer on this host: there is no shadow to read
        assert set(change["bytes"]) <= {"peer_same_host"}, change
        received += change["bytes"].get("peer_same_host", 0)
    # each copy the plan made (the same count on every rank) was received by exactly one rank
    assert received == change["peer_transfers"] * got["slot_bytes"]
    assert all(r["placement"] == results["rank0_0"]["placement"] for r in results.values())


def test_a_replacement_gets_its_slots_back_from_peers(tmp_path):
    codes, logs, results = _run(tmp_path, "rejoin", respawn=True)
    assert codes == {r: 0 for r in range(W)}, (codes, logs)
    assert sorted(results) == ["rank0_0", "rank1_0", "rank2_0", "rank3_1"]
    joiner = results["rank3_1"]
    assert joiner["joined"] and joiner["weights_err"] == 0.0 and joiner["out_err"] < 1e-5, joiner
    [readmit] = [c for c in joiner["changes"] if c["admitted"] == [3]]
    assert set(readmit["bytes"]) == {"peer_same_host"} and readmit["bytes"]["peer_same_host"] > 0, readmit
    for got in results.values():
        assert got["out_err"] < 1e-5 and got["weights_err"] == 0.0, got
        assert got["steps"] == joiner["steps"] and got["placement"] == joiner["placement"]


@pytest.mark.parametrize("attempt", range(2))
def test_a_transfer_cut_by_a_death_leaves_every_survivor_alike(tmp_path, attempt):
    """Rank 2 dies as the repair for rank 3 starts its transfer: the transfer fails on every survivor,
    its redundancy copies are skipped (the shadow is stale: step 0), and the same catch-up repairs for
    rank 2, restoring experts both dead ranks held from the shadow; outputs stay right."""
    shadow = str(tmp_path / "shadow")
    ShadowStore.export(build(), shadow)
    codes, logs, results = _run(tmp_path, "cut", False, shadow)
    assert codes == {0: 0, 1: 0, 2: -signal.SIGKILL, 3: -signal.SIGKILL}, (codes, logs)
    assert sorted(results) == ["rank0_0", "rank1_0"]
    for got in results.values():
        assert got["out_err"] < 1e-5 and got["weights_err"] == 0.0, got
        assert sorted(r for c in got["changes"] for r in c["lost"]) == [2, 3], got
    assert results["rank0_0"]["placement"] == results["rank1_0"]["placement"]
