"""Expert parallelism across real processes (gloo on CPU) that really die: SIGKILL, SIGSTOP, two at
once, a replacement that rejoins; outputs checked against a single-process reference."""

import datetime
import glob
import importlib
import json
import os
import signal
import sys
import time

import pytest
import torch
import torch.distributed as dist

from drill_helpers import records, wait_for
from moe_resilient.drill import DrillModel, make_batch
from moe_resilient.group import ElasticGroup
from moe_resilient.launch import Launcher
from moe_resilient.shadow import ShadowStore

W, SPR, TOKENS = 4, 3, 16


@pytest.fixture(scope="module")
def reference():
    return DrillModel(W, SPR, seed=0).eval()


@pytest.fixture(scope="module")
def roomy_reference():  # 4 slots per rank: two ranks lost still leave a slot for every expert
    return DrillModel(W, SPR + 1, seed=0).eval()


def _served(out_dir, rank):
    return [r for r in records(out_dir, rank) if "batch_of" in r]


def _drill(tmp_path, reference, *, steps=10, extra=(), respawn=False, heartbeat_timeout=1.0, spr=SPR):
    out, shadow = str(tmp_path / "out"), str(tmp_path / "shadow")
    os.makedirs(out, exist_ok=True)
    ShadowStore.export(reference, shadow)
    worker = os.path.join(os.path.dirname(__file__), "drill_faults_worker.py")  # the drill's worker, + faults
    cmd = [sys.executable, worker, "--out-dir", out, "--shadow", shadow, "--steps", str(steps), "--tokens", str(TOKENS),
           "--slots-per-rank", str(spr), "--save-outputs", "--step-sleep", "0.03",
           "--heartbeat-timeout", str(heartbeat_timeout), *extra]
    return Launcher(W, cmd, respawn=respawn, log_dir=str(tmp_path / "logs")), out


def _check_outputs(out, reference, steps, ranks):
    """Every (step, batch) of ``ranks`` was served exactly as the single-process model serves it."""
    with torch.no_grad():
        for step in range(steps):
            for b in ranks:
                got = torch.load(os.path.join(out, f"out_s{step}_b{b}.pt"))
                torch.testing.assert_close(got, reference(make_batch(step, b, TOKENS)), rtol=1e-5, atol=1e-5)


def _log(tmp_path, rank):
    return open(tmp_path / "logs" / f"rank{rank}.log").read()


@pytest.mark.parametrize("victim, compiled", [(2, True), (0, False)], ids=["rank2-compiled", "rank0-eager"])
def test_sigkill_one_rank_survivors_continue(tmp_path, reference, victim, compiled):
    launcher, out = _drill(tmp_path, reference, steps=10, extra=["--compile"] if compiled else [])
    with launcher:
        wait_for(lambda: len(_served(out, victim)) >= 4, 120, "4 steps served")
        t_kill = launcher.kill(victim, signal.SIGKILL)
        codes = launcher.wait(120)
    survivors = [r for r in range(W) if r != victim]
    assert codes[victim] == -signal.SIGKILL and all(codes[r] == 0 for r in survivors), codes
    failures = {r: [x for x in records(out, r) if x.get("event") == "failure"] for r in survivors}
    assert all(len(f) == 1 and f[0]["lost"] == [victim] for f in failures.values()), failures
    assert all(f[0]["uncovered"] == {"moe.0": [], "moe.1": []} for f in failures.values())
    lost_step = failures[survivors[0]][0]["step"]
    makeups = [x for r in survivors for x in _served(out, r) if x.get("makeup")]
    # the in-flight batch, and the one before (the victim may have died before its output)
    assert sorted((m["step"], m["batch_of"]) for m in makeups) == [(lost_step - 1, victim), (lost_step, victim)]
    _check_outputs(out, reference, 10, survivors)  # no lost tokens, right answers
    _check_outputs(out, reference, lost_step + 1, [victim])
    detect = min(f[0]["t_detect"] for f in failures.values()) - t_kill
    assert 0 < detect < 10  # sanity only: speed is measured by the drill, not asserted here
    if compiled:  # the one EP graph, compiled before serving; nothing after, recovery included
        graphs = {r: [x["graphs"] for x in records(out, r) if "graphs" in x] for r in survivors}
        assert all(g == [1, 1] for g in graphs.values()), graphs


def test_hung_rank_is_fenced_and_survivors_continue(tmp_path, reference):
    launcher, out = _drill(tmp_path, reference, steps=12, heartbeat_timeout=0.5)
    with launcher:
        wait_for(lambda: len(_served(out, 1)) >= 3, 120, "3 steps served")
        launcher.kill(1, signal.SIGSTOP)
        wait_for(lambda: all(any(x.get("event") == "failure" for x in records(out, r)) for r in (0, 2, 3)), 60,
                  "survivors to exclude the hung rank")
        launcher.kill(1, signal.SIGCONT)
        codes = launcher.wait(120)
    assert codes == {0: 0, 1: 3, 2: 0, 3: 0}, codes  # the stale rank exits with FencedError (code 3)
    fenced = [x for x in records(out, 1) if x.get("event") == "fenced"]
    assert fenced and "presumed dead" in fenced[0]["error"]
    _check_outputs(out, reference, 12, [0, 2, 3])
    failures = [x for r in (0, 2, 3) for x in records(out, r) if x.get("event") == "failure"]
    assert all(x["lost"] == [1] for x in failures)
    # detected by its heartbeat, not by a collective deadline (10 s in the drill)
    assert any("heartbeat of ranks [1] stalled" in x["cause"] for x in failures), [x["cause"] for x in failures]


def test_two_ranks_lost_then_replacements_rejoin(tmp_path, roomy_reference):
    reference = roomy_reference
    launcher, out = _drill(tmp_path, reference, steps=12, respawn=True, extra=["--until-full"], spr=SPR + 1)
    with launcher:
        wait_for(lambda: len(_served(out, 3)) >= 3, 120, "3 steps served")
        launcher.kill(1, signal.SIGKILL)
        launcher.kill(3, signal.SIGKILL)
        codes = launcher.wait(180)
    assert codes == {0: 0, 1: 0, 2: 0, 3: 0}, (codes, launcher.exits)
    failures = [x for x in records(out, 0) if x.get("event") == "failure"]
    assert sorted(r for f in failures for r in f["lost"]) == [1, 3]
    admitted = [x for x in records(out, 0) if x.get("event") == "admitted"]
    assert sorted(r for a in admitted for r in a["ranks"]) == [1, 3]
    for r in (1, 3):  # the replacements served steps after rejoining, with their slots back
        rejoin = [x for x in records(out, r) if x.get("event") == "admitted"]
        assert rejoin and any(x.get("step", -1) >= rejoin[-1]["step"] for x in _served(out, r))
    _check_outputs(out, reference, 12, [0, 2])
    for r in (1, 3):
        for path in glob.glob(os.path.join(out, f"out_s*_b{r}.pt")):
            step = int(os.path.basename(path).split("_")[1][1:])
            with torch.no_grad():
                torch.testing.assert_close(torch.load(path), reference(make_batch(step, r, TOKENS)), rtol=1e-5,
                                           atol=1e-5)


def test_rank_lost_during_recovery_is_repaired_too(tmp_path, roomy_reference):
    """Rank 3 dies while the survivors repair for rank 2 (it SIGKILLs itself on meeting the failure,
    before it posts its recovery inputs): the survivors stop waiting for it once it is known dead,
    repair for rank 2, meet rank 3's loss, and repair for it in turn."""
    reference = roomy_reference
    launcher, out = _drill(tmp_path, reference, steps=10, extra=["--die-during-recovery", "3"], spr=SPR + 1)
    with launcher:
        wait_for(lambda: len(_served(out, 2)) >= 4, 120, "4 steps served")
        launcher.kill(2, signal.SIGKILL)
        codes = launcher.wait(120)
    assert codes == {0: 0, 1: 0, 2: -signal.SIGKILL, 3: -signal.SIGKILL}, (codes, launcher.exits)
    for r in (0, 1):
        failures = [x for x in records(out, r) if x.get("event") == "failure"]
        # rank 3's loss is met in the re-run step, or by the repair's peer transfer (one catch-up for both)
        assert [r for f in failures for r in f["lost"]] == [2, 3], failures
        assert failures[-1]["uncovered"] == {"moe.0": [], "moe.1": []}
    lost_at = {r: f["step"] for f in failures for r in f["lost"]}
    makeups = {(x["step"], x["batch_of"]) for r in (0, 1) for x in _served(out, r) if x.get("makeup")}
    assert {(lost_at[2], 2), (lost_at[3], 3)} <= makeups, makeups
    _check_outputs(out, reference, 10, [0, 1])
    _check_outputs(out, reference, lost_at[2] + 1, [2])
    _check_outputs(out, reference, lost_at[3] + 1, [3])


SLOW_PEER = """
import json, os, sys, time
import torch
from moe_resilient.group import ElasticGroup, FencedError
group = ElasticGroup.from_env(timeout=3.0, heartbeat_timeout=0.5, agree_timeout=1.0).start()
log = {}
for late in (2.0, 6.0):  # 4x the heartbeat timeout, then past timeout + agree_timeout
    if group.rank == 1:
        time.sleep(late)
    t = torch.ones(1)
    try:
        group.all_reduce(t)
        log[late] = ["ok", t.item(), group.generation]
    except Exception as exc:
        log[late] = [type(exc).__name__, str(exc), group.generation]
open(os.path.join(sys.argv[1], f"rank{group.rank}.json"), "w").write(json.dumps(log))
os._exit(0)
"""


def test_slow_peer_is_waited_for_and_a_stuck_one_excluded(tmp_path):
    """A peer late to a collective but alive by heartbeat is not evicted (under load on a small
    host, a fixed collective deadline evicted live ranks); one absent past ``timeout`` is, and
    learns it is fenced when it comes back."""
    script = tmp_path / "slow_peer.py"
    script.write_text(SLOW_PEER)
    with Launcher(2, [sys.executable, str(script), str(tmp_path)], log_dir=str(tmp_path / "logs")) as launcher:
        codes = launcher.wait(60)
    assert codes == {0: 0, 1: 0}, codes
    logs = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert logs[0]["2.0"] == logs[1]["2.0"] == ["ok", 2.0, 0]
    kind, message, generation = logs[0]["6.0"]
    assert kind == "RankFailure" and "lost ranks [1]" in message and "collective timed out" in message
    assert generation == 1
    kind, message, _ = logs[1]["6.0"]
    assert kind == "FencedError" and "presumed dead" in message


GIL_HOG = """
import json, os, sys, time
import torch
from moe_resilient.group import ElasticGroup
group = ElasticGroup.from_env(timeout=10.0).start()  # the default 120 ms heartbeat timeout
log = []
for step in range(4):
    if group.rank == 1 and step == 2:
        sum(range(3 * 10**7))  # one C call that holds the GIL for ~0.4 s: no Python thread runs
    t = torch.ones(1)
    try:
        group.all_reduce(t)
        log.append(["ok", t.item(), group.generation])
    except Exception as exc:
        log.append([type(exc).__name__, str(exc), group.generation])
open(os.path.join(sys.argv[1], f"rank{group.rank}.json"), "w").write(json.dumps(log))
group.finish()
os._exit(0)
"""


def test_rank_holding_the_gil_keeps_beating_and_is_waited_for(tmp_path):
    """A main thread inside one long GIL-holding C call (~0.4 s, over 3x the heartbeat timeout) stops
    every Python thread of its process; the heartbeat runs on a native thread, so the peers see it
    beat, wait for it, and nobody is evicted."""
    script = tmp_path / "gil_hog.py"
    script.write_text(GIL_HOG)
    with Launcher(3, [sys.executable, str(script), str(tmp_path)], log_dir=str(tmp_path / "logs")) as launcher:
        codes = launcher.wait(60)
    assert codes == {0: 0, 1: 0, 2: 0}, codes
    for r in range(3):
        assert json.load(open(tmp_path / f"rank{r}.json")) == [["ok", 3.0, 0]] * 4


def test_native_heartbeat_beats_while_the_gil_is_held_and_stops():
    """The heartbeat class itself: it beats and reads the join counter from its own thread, goes on
    while this thread holds the GIL in one C call, and stops for good on stop()."""
    importlib.import_module("moe_resilient._C")  # registers torch.classes.moe_resilient.Heartbeat

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    store.add("p/join/count", 2)
    heartbeat = torch.classes.moe_resilient.Heartbeat("127.0.0.1", store.port, "p/hb/0/1", "p/join/count", 0.01)
    heartbeat.start()
    wait_for(lambda: heartbeat.beats() >= 1, 30, "a first beat")
    before = int(store.get("p/hb/0/1"))
    sum(range(3 * 10**7))  # holds the GIL for ~0.4 s
    assert int(store.get("p/hb/0/1")) > before and heartbeat.joins() == 2 and heartbeat.running()
    heartbeat.stop()
    stopped = int(store.get("p/hb/0/1"))
    time.sleep(0.1)
    assert not heartbeat.running() and int(store.get("p/hb/0/1")) == stopped == heartbeat.beats()
    with pytest.raises(RuntimeError, match="port 0 out of range"):
        torch.classes.moe_resilient.Heartbeat("127.0.0.1", 0, "k", "j", 0.01)


def test_rank_sets_in_the_store_hold_more_ranks_than_a_word():
    """Agreement's check-ins and a gather's posts are rank sets of int64 bit words: a group of 130
    ranks needs three words, and any rank can be added."""
    from moe_resilient.group import _rank_set

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    assert _rank_set(store, "set", 130) == set()
    for r in (0, 61, 62, 63, 129):
        _rank_set(store, "set", 130, r)
    assert _rank_set(store, "set", 130) == {0, 61, 62, 63, 129}
    assert _rank_set(store, "other", 130) == set()


CHECKED_IN_THEN_DEAD = """
import json, os, signal, sys, time
import torch
from moe_resilient.group import ElasticGroup
group = ElasticGroup.from_env(timeout=10.0, heartbeat_timeout=0.5, agree_timeout=5.0).start()
if group.rank == 2:  # meets the failure, checks in to the agreement, dies before the next group forms
    def check_in_and_die(*args):
        g = group.generation
        group._checked_in(group.rank)
        if sys.argv[2] == "after-decision":
            group.store.wait([f"gen/{g}/decision"])
        os.kill(os.getpid(), signal.SIGKILL)
    group._agree = check_in_and_die
t = torch.ones(1)
group.all_reduce(t)
group.store.add("warm", 1)  # every rank past the first collective before rank 3 dies
while int(group.store.add("warm", 0)) < 4:
    time.sleep(0.001)
if group.rank == 3:
    os.kill(os.getpid(), signal.SIGKILL)
start = time.monotonic()
try:
    group.all_reduce(t)
    log = {"first": ["ok"]}
except Exception as exc:
    log = {"first": [type(exc).__name__, str(exc), list(group.members), group.generation, time.monotonic() - start]}
t = torch.ones(1)
group.all_reduce(t)
log["after"] = t.item()
open(os.path.join(sys.argv[1], f"rank{group.rank}.json"), "w").write(json.dumps(log))
group.finish()
os._exit(0)
"""


@pytest.mark.parametrize("when", ["before-decision", "after-decision"])
def test_member_that_checks_in_then_dies_is_agreed_away(tmp_path, when):
    """A node lost rank by rank: rank 3 dies, rank 2 meets the failure, checks in to the agreement and
    dies, before the decision or after it (then the decision names it, and the survivors' new gloo
    group would wait for it for gloo's whole deadline, 30 s, and fail). The survivors leave it out of
    the decision, or find it missing before the new group forms and agree once more; either way they go
    on without both, well inside that deadline."""
    script = tmp_path / "checked_in_then_dead.py"
    script.write_text(CHECKED_IN_THEN_DEAD)
    cmd = [sys.executable, str(script), str(tmp_path), when]
    with Launcher(4, cmd, log_dir=str(tmp_path / "logs")) as launcher:
        codes = launcher.wait(90)
    assert codes == {0: 0, 1: 0, 2: -signal.SIGKILL, 3: -signal.SIGKILL}, (codes, launcher.exits)
    for r in (0, 1):
        log = json.load(open(tmp_path / f"rank{r}.json"))
        kind, message, members, generation, seconds = log["first"]
        assert kind == "RankFailure" and "lost ranks [2, 3]" in message, log
        assert members == [0, 1] and seconds < 20, log
        if when == "after-decision":  # generation 1 named rank 2; the survivors agreed once more
            assert generation == 2, log
        assert log["after"] == 2.0


MEMBER_STEPS = """
import json, os, signal, sys, time
import torch
from moe_resilient import MoEConfig, ResilientMoE
from moe_resilient.elastic import recover_across_ranks
from moe_resilient.group import ElasticGroup, RankFailure
group = ElasticGroup.from_env(timeout=10.0).start()
layer = ResilientMoE(MoEConfig(16, 32, 4, 2, num_slots=8, world_size=4))
group.all_reduce(torch.ones(1))
group.store.add("warm", 1)  # every rank past the first collective before rank 3 dies (told by the store)
while int(group.store.add("warm", 0)) < 4:
    time.sleep(0.001)
if group.rank == 3:
    os.kill(os.getpid(), signal.SIGKILL)
try:
    group.all_reduce(torch.ones(1))
except RankFailure:
    change = recover_across_ranks(layer, group, step=10 + group.rank % 2)
open(os.path.join(sys.argv[1], f"rank{group.rank}.json"), "w").write(
    json.dumps([change.member_steps, change.lost, change.step]))
group.finish()
os._exit(0)
"""


def test_recover_across_ranks_tells_each_survivor_where_the_others_stood(tmp_path):
    """Survivors can meet a failure one step apart (a collective completes on a member that had every
    peer's data and fails on another); the recovery's gather gives each the others' steps, so all
    can go on from the same step (the drill re-runs what was not completed for sure)."""
    script = tmp_path / "member_steps.py"
    script.write_text(MEMBER_STEPS)
    with Launcher(4, [sys.executable, str(script), str(tmp_path)], log_dir=str(tmp_path / "logs")) as launcher:
        codes = launcher.wait(60)
    assert codes == {0: 0, 1: 0, 2: 0, 3: -signal.SIGKILL}, codes
    for r in range(3):
        assert json.load(open(tmp_path / f"rank{r}.json")) == [{"0": 10, "1": 11, "2": 10}, [3], 11]


def test_mismatched_placement_across_ranks_is_refused(tmp_path, reference):
    launcher, out = _drill(tmp_path, reference, steps=3, extra=["--perturb-placement"])
    with launcher:
        codes = launcher.wait(120)
    assert all(rc != 0 for rc in codes.values()), codes
    for r in range(W):
        assert "PlacementMismatchError: ranks disagree on the placement of layers ['moe.0']" in _log(tmp_path, r)


def test_bad_world_size():
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=10))
    with pytest.raises(ValueError, match="rank 4 out of range for world_size 4"):
        ElasticGroup("127.0.0.1", store.port, 4, 4)
    group = ElasticGroup("127.0.0.1", store.port, 0, 1).start()
    try:
        from moe_resilient import MoEConfig, ResilientMoE
        from moe_resilient.dispatch import ep_forward

        layer = ResilientMoE(MoEConfig(16, 32, 4, 2, num_slots=4, world_size=2))
        with pytest.raises(ValueError, match="world_size 2, the group 1"):
            ep_forward(layer, torch.randn(3, 16), group)
        single = ResilientMoE(MoEConfig(16, 32, 4, 2))
        x = torch.randn(5, 16)
        torch.testing.assert_close(ep_forward(single, x, group), single(x))  # one rank: same as local
    finally:
        group.close()


def test_ep_gradients_match_single_process(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    import ep_grad_worker as w

    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "ep_grad_worker.py"), str(tmp_path)]
    with Launcher(w.W, cmd, log_dir=str(tmp_path / "logs")) as launcher:
        codes = launcher.wait(120)
    assert codes == {r: 0 for r in range(w.W)}, codes
    ref = w.build()
    xs = [w.batch(r).requires_grad_() for r in range(w.W)]
    sum(ref(x).square().sum() for x in xs).backward()
    ref.reduce_replica_grads()
    for r in range(w.W):
        got = torch.load(tmp_path / f"grads{r}.pt")
        torch.testing.assert_close(got["x"], xs[r].grad, rtol=1e-4, atol=1e-5)
        held = ref.owned_slots(r)  # each rank holds its own slots' gradients, replicas' summed across ranks
        for name, p in ref.named_parameters():
            want = p.grad[held.start:held.stop] if name.startswith("experts.") else p.grad
            torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5, msg=name)
