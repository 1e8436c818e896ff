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


def test_rebalance_moves_experts_between_ranks_and_serves_on(tmp_path):
    """Every rank rebalances for the load it routed in steps 0-2: slots change experts, each filled from
    a replica on its own rank or over the group, then routed everywhere at once; outputs stay right."""
    codes, logs, results = _run(tmp_path, "rebalance")
    assert codes == {r: 0 for r in range(W)}, (codes, logs)
    assert sorted(results) == ["rank0_0", "rank1_0", "rank2_0", "rank3_0"]
    received = 0
    for got in results.values():
        assert got["out_err"] < 1e-5 and got["weights_err"] == 0.0, got
        done = got["rebalanced"]
        assert done["copies"] > 0 and done["peer_transfers"] > 0 and done["before"] != got["placement"], done
        assert set(done["bytes"]) <= {"local_replica", "peer_same_host"}, done
        received += done["bytes"].get("peer_same_host", 0)
        assert got["placement"] == results["rank0_0"]["placement"]
    assert received == done["peer_transfers"] * got["slot_bytes"]


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


def test_training_through_a_loss_keeps_every_replica_identical(tmp_path):
    """AdamW over 4 ranks, rank 3 killed at step 3: each survivor's losses equal single-process
    training on the same batches (all 4 ranks' before the loss, the 3 survivors' after); every replica
    of an expert, on any rank, equals the single-process expert, and so does its Adam state, including
    the replicas a repair copied from a peer, weights and state together."""
    import torch

    from transfer_worker import STEPS, batch, target

    codes, logs, _ = _run(tmp_path, "train")
    assert codes == {0: 0, 1: 0, 2: 0, 3: -signal.SIGKILL}, (codes, logs)
    ref = build()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    want = {r: [] for r in range(W)}
    for step in range(STEPS):
        members = range(W) if step < 3 else range(3)
        opt.zero_grad()
        losses = [(ref(batch(r, step)) - target(r, step)).square().mean() for r in members]
        (sum(losses) / len(losses)).backward()
        for layer in ref:
            layer.reduce_replica_grads()
        opt.step()
        for r, loss in zip(members, losses):
            want[r].append(loss.item())
    copied, replicas = 0, {}
    for r in range(3):
        got = torch.load(tmp_path / f"train{r}.pt")
        assert got["losses"] == pytest.approx(want[r], rel=1e-4, abs=1e-6), (r, got["losses"], want[r])
        copied += got["peer_transfers"]
        assert got["state_resets"] == 0
        for (i, slot), (expert, *tensors) in got["slots"].items():
            layer = ref[i]
            s = layer.placement.slots_of(expert)[0]  # the single-process model's replicas are all alike
            state = opt.state[layer.experts.w13], opt.state[layer.experts.w2]
            expect = [*layer.experts.slot_weights(s)] + [t[layer.experts.row(s)] for k in sorted(state[0])
                                                          if state[0][k].dim() for t in (state[0][k], state[1][k])]
            assert len(tensors) == len(expect) == 6  # w13, w2, exp_avg x2, exp_avg_sq x2
            for a, b in zip(tensors, expect):  # Adam's steps magnify float noise in the summed gradients
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=f"rank {r} layer {i} slot {slot}")
            replicas.setdefault((i, expert), []).append(tensors)
    assert copied > 0  # the repair did copy replicas from peers, state included
    for key, copies in replicas.items():  # replicas on different ranks: bit for bit alike
        assert all(torch.equal(a, b) for other in copies[1:] for a, b in zip(copies[0], other)), key
    assert max(len(c) for c in replicas.values()) > 1
