"""torchrun semantics, checked with real torchrun agents on localhost:

- a local worker crash makes torchrun restart the whole local worker group (survivors included);
- a node that vanishes from a two-node job does not fail the other node's workers: their
  ElasticGroup (store in node 0's agent) excludes the lost ranks and they carry on serving;
- with restarts on, the restarted workers are new incarnations of the old rank ids: admitted as
  replacements once their predecessors are agreed away;
- with the store in its own process (``moe-resilient store``), losing node 0, whose agent hosts
  torchrun's own store, leaves node 1 serving (with the store in node 0's agent, node 1 dies too).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moe_resilient.drill import DrillModel, read_records
from moe_resilient.shadow import ShadowStore
from drill_helpers import check_outputs, free_port

HERE = os.path.dirname(__file__)


def _torchrun(*args, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    return subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def _children(pid):
    """PIDs whose parent is ``pid`` (torchrun's workers are its direct children)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


def _kill_tree(pid):
    """SIGKILL an agent and its workers, by PID (workers may sit in sessions of their own)."""
    for child in _children(pid):
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _reap(procs):
    for p in procs:
        if p.poll() is None:
            _kill_tree(p.pid)
        p.wait(timeout=30)


def test_local_worker_crash_restarts_the_group(tmp_path):
    agent = _torchrun("--nproc-per-node", "2", "--max-restarts", "1", "--master-port", str(free_port()),
                      os.path.join(HERE, "torchrun_worker.py"), str(tmp_path))
    try:
        agent.wait(timeout=120)
    finally:
        _reap([agent])
    assert agent.returncode == 0, agent.stdout.read().decode()[-3000:]
    records = [json.load(open(tmp_path / f)) for f in sorted(os.listdir(tmp_path))]
    attempts = {(r["attempt"], r["rank"]) for r in records}
    assert attempts == {(0, 0), (0, 1), (1, 0), (1, 1)}  # rank 0 was restarted too
    pids = {r["rank"]: set() for r in records}
    for r in records:
        pids[r["rank"]].add(r["pid"])
    assert len(pids[0]) == 2  # a new process for the healthy rank as well


def test_lost_node_does_not_stop_the_other_node(tmp_path):
    out, shadow = tmp_path / "out", tmp_path / "shadow"
    out.mkdir()
    ShadowStore.export(DrillModel(4, 4), str(shadow))
    port = free_port()
    worker = ["-m", "moe_resilient.drill_worker", "--out-dir", str(out), "--shadow", str(shadow), "--steps", "400",
              "--tokens", "8", "--slots-per-rank", "4", "--step-sleep", "0.01", "--save-outputs"]
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    node0 = _torchrun(*common, "--node-rank", "0", *worker)
    node1 = _torchrun(*common, "--node-rank", "1", *worker)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            path = out / "rank2.jsonl"
            if len(read_records(path)) >= 5:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the two-node job did not start serving")
        _kill_tree(node1.pid)  # the whole node vanishes: agent and workers
        node1.wait(timeout=30)

        def finished(rank):
            path = out / f"rank{rank}.jsonl"
            return any(r.get("step") == 399 and "batch_of" in r for r in read_records(path))

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (finished(0) and finished(1)):
            assert node0.poll() is None, node0.stdout.read().decode()[-3000:]  # node 0 was not failed
            time.sleep(0.1)
        # node 0's agent would now wait on torchrun's exit barrier for the lost node (300 s); the
        # point is made: its workers carried on. Reap it.
    finally:
        _reap([node0, node1])
    for rank in (0, 1):
        recs = read_records(out / f"rank{rank}.jsonl")
        failures = [r for r in recs if r.get("event") == "failure"]
        assert len(failures) == 1 and failures[0]["lost"] == [2, 3], failures
        assert max(r["step"] for r in recs if "batch_of" in r) == 399  # carried on to the end


def _two_nodes(tmp_path, steps, extra_worker=(), extra_torchrun=(), env=None):
    out, shadow = tmp_path / "out", tmp_path / "shadow"
    out.mkdir()
    ShadowStore.export(DrillModel(4, 4), str(shadow))
    worker = ["-m", "moe_resilient.drill_worker", "--out-dir", str(out), "--shadow", str(shadow), "--steps", str(steps),
              "--tokens", "16", "--slots-per-rank", "4", "--step-sleep", "0.01", "--save-outputs", *extra_worker]
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
              str(free_port()), *extra_torchrun]
    nodes = [_torchrun(*common, "--node-rank", str(n), *worker, env=env) for n in (0, 1)]
    return nodes, out


def _wait_serving(out, rank, steps=5):
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if sum("batch_of" in r for r in read_records(out / f"rank{rank}.jsonl")) >= steps:
            return
        time.sleep(0.05)
    pytest.fail("the two-node job did not start serving")


def _rank_pid(agent_pid, rank):
    """The PID of torchrun's worker with global ``rank`` (read from its environment)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid in _children(agent_pid):
            try:
                env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return pid
        time.sleep(0.05)
    raise TimeoutError(f"no worker of rank {rank} under agent {agent_pid}")


def test_restarted_workers_are_new_incarnations_admitted_back(tmp_path):
    """--max-restarts 1: a worker of node 1 is SIGKILLed, torchrun restarts node 1's local group with the
    same rank ids. Node 0's ranks never die: they agree both predecessors away, admit the new
    incarnations, and every output equals the single-process model's."""
    nodes, out = _two_nodes(tmp_path, 30, ["--until-full", "--after-full", "10"], ["--max-restarts", "1"])
    try:
        _wait_serving(out, 2)
        os.kill(_rank_pid(nodes[1].pid, 2), signal.SIGKILL)
        for node in nodes:
            node.wait(timeout=240)
    finally:
        _reap(nodes)
    assert [n.returncode for n in nodes] == [0, 0], nodes[1].stdout.read().decode()[-3000:]
    for rank in (0, 1):
        recs = read_records(out / f"rank{rank}.jsonl")
        assert sorted(r for f in recs if f.get("event") == "failure" for r in f["lost"]) == [2, 3]
        assert sorted(r for a in recs if a.get("event") == "admitted" for r in a["ranks"]) == [2, 3]
        assert set(range(30)) <= {r["step"] for r in recs if r.get("batch_of") == rank}
    assert check_outputs(out, DrillModel(4, 4).eval(), 16) >= 2 * 30


def test_store_outside_the_nodes_survives_node_0(tmp_path):
    """--max-restarts 0 and the store in its own process: SIGKILL node 0's rank-0 worker; node 0's agent
    stops its other worker and exits (with torchrun's own store in it). Node 1's ranks agree both away
    and serve to the end."""
    port = free_port()
    store = subprocess.Popen([sys.executable, "-m", "moe_resilient.cli", "store", "--host", "127.0.0.1", "--port",
                              str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    env = {**os.environ, "MOE_RESILIENT_STORE": f"127.0.0.1:{port}"}
    nodes, out = _two_nodes(tmp_path, 300, extra_torchrun=["--max-restarts", "0"], env=env)
    try:
        assert b"listening" in store.stdout.readline()
        _wait_serving(out, 0)
        os.kill(_rank_pid(nodes[0].pid, 0), signal.SIGKILL)
        nodes[0].wait(timeout=60)
        assert nodes[0].returncode != 0  # torchrun failed node 0, its store with it

        def finished(rank):
            return any(r.get("step") == 299 and "batch_of" in r for r in read_records(out / f"rank{rank}.jsonl"))

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (finished(2) and finished(3)) and nodes[1].poll() is None:
            time.sleep(0.1)
    finally:
        _reap(nodes)
        store.kill()
        store.wait()
    for rank in (2, 3):
        recs = read_records(out / f"rank{rank}.jsonl")
        assert [f["lost"] for f in recs if f.get("event") == "failure"] in ([[0, 1]], [[0], [1]]), recs[-3:]
        assert set(range(300)) <= {r["step"] for r in recs if r.get("batch_of") == rank}
    assert check_outputs(out, DrillModel(4, 4).eval(), 16) >= 2 * 300


def test_hf_model_on_two_nodes_survives_node_1(tmp_path):
    """torchrun, 2 nodes x 2 processes, the HF Mixtral of the EP tests (from_pretrained, 16 experts, 8
    slots per rank, MoE stages compiled): node 1's agent and workers are SIGKILLed mid-serving. Node
    0's ranks agree both away, restore the experts only node 1 held from the checkpoint's safetensors,
    and keep generating the HF model's own tokens."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from parallel_worker import batch, generate, hf_model, save_checkpoint

    checkpoint, out = tmp_path / "checkpoint", tmp_path / "out"
    out.mkdir()
    save_checkpoint("mixtral", str(checkpoint))
    steps = 40
    worker = [os.path.join(HERE, "parallel_worker.py"), str(out), "mixtral", str(checkpoint), "serve", "-1", "8", "0",
              str(steps)]
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
              str(free_port())]
    nodes = [_torchrun(*common, "--node-rank", str(n), *worker) for n in (0, 1)]
    try:
        deadline = time.monotonic() + 180
        while not (out / "rank2_step3.pt").exists():
            assert time.monotonic() < deadline, "the two-node job did not start serving"
            time.sleep(0.05)
        _kill_tree(nodes[1].pid)
        nodes[1].wait(timeout=30)
        deadline = time.monotonic() + 180
        while not all((out / f"rank{r}_0.json").exists() for r in (0, 1)):
            assert nodes[0].poll() is None, nodes[0].stdout.read().decode()[-3000:]  # node 0 was not failed
            assert time.monotonic() < deadline, "node 0 did not finish serving"
            time.sleep(0.1)
    finally:
        _reap(nodes)
    reference = hf_model("mixtral")
    for rank in (0, 1):
        got = json.load(open(out / f"rank{rank}_0.json"))
        assert sorted(r for c in got["changes"] for r in c["lost"]) == [2, 3] and got["steps"] == steps, got
        with torch.no_grad():
            for step in range(steps):
                tokens = torch.load(out / f"rank{rank}_step{step}.pt")
                assert torch.equal(tokens, generate(reference, batch(rank, step))), (rank, step)
