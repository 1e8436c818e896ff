"""The serving engine against HF generate, and serving ranks that die mid-stream (real processes)."""

import glob
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from moe_resilient.hf import swap_moe_blocks
from moe_resilient.serving import models
from moe_resilient.serving.cluster import ServingCluster
from moe_resilient.serving.engine import Engine, Request
from moe_resilient.serving.paged import OutOfBlocksError
from drill_helpers import free_port, wait_for
from parallel_worker import hf_model

W, NEW = 4, 40


def prompts(n: int, seed: int, lo: int = 3, hi: int = 40, vocab: int = 96) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(k),), generator=g).tolist() for k in torch.randint(lo, hi, (n,), generator=g)]


@pytest.mark.parametrize("name", ["qwen", "mixtral"])
def test_engine_equals_hf_generate(name):
    """Chunked prefill, blocks of 4, requests joining mid-run: every request's greedy tokens equal HF's."""
    ref = hf_model(name)
    ps = prompts(6, 1)
    with torch.no_grad():
        want = [ref.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, len(p):]
                .tolist() for p in ps]
    model = hf_model(name)
    swap_moe_blocks(model)
    engine = Engine(model, num_blocks=64, block_tokens=4, max_step_tokens=20)
    reqs = [Request(f"r{i}", p, 12) for i, p in enumerate(ps)]
    for r in reqs[:3]:
        engine.submit(r)
    for _ in range(5):
        engine.step()
    for r in reqs[3:]:  # admitted while the first three decode
        engine.submit(r)
    while engine.busy:
        engine.step()
    assert [r.generated for r in reqs] == want
    assert len(engine.cache.free) == engine.cache.num_blocks  # every block released


def test_seeded_sampling_and_restore_do_not_depend_on_the_batch():
    """A sampled request draws the same tokens alone, in a batch, and restored part-way in another engine
    from its first positions' keys and values."""
    model = hf_model("qwen")
    ps = prompts(4, 2)
    alone = Engine(model, num_blocks=64, block_tokens=4).generate([Request("x", ps[0], 16, temperature=0.9, seed=7)])
    batch = [Request("x", ps[0], 16, temperature=0.9, seed=7)] + [Request(f"o{i}", p, 16, temperature=0.5, seed=i)
                                                                for i, p in enumerate(ps[1:])]
    engine = Engine(model, num_blocks=64, block_tokens=4)
    for r in batch:
        engine.submit(r)
    while len(batch[0].generated) < 9:
        engine.step()
    assert alone["x"][:9] == batch[0].generated
    keys, values = engine.cache.read(batch[0].blocks, 0, 8)  # two whole blocks, as a checkpoint holds
    moved = Request("x", ps[0], 16, temperature=0.9, seed=7, generated=list(batch[0].generated))
    other = Engine(model, num_blocks=64, block_tokens=4)
    other.restore(moved, keys, values)
    assert moved.computed == 8
    while other.busy:
        other.step()
    assert moved.generated == alone["x"]


def test_bad_requests_are_refused_before_anything_changes():
    engine = Engine(hf_model("qwen"), num_blocks=4, block_tokens=4)
    with pytest.raises(ValueError, match="empty prompt"):
        Request("a", [], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Request("a", [5], 0)
    with pytest.raises(ValueError, match="temperature"):
        Request("a", [5], 3, temperature=-1)
    with pytest.raises(ValueError, match="needs 5 blocks, the pool has 4"):
        engine.submit(Request("big", [5] * 10, 10))
    engine.submit(Request("a", [5, 6], 3))
    with pytest.raises(ValueError, match="already queued"):
        engine.submit(Request("a", [7], 3))
    with pytest.raises(OutOfBlocksError, match="5 blocks wanted, 4 free"):
        engine.restore(Request("r", [5] * 10, 10), [], [])
    assert len(engine.waiting) == 1 and not engine.running and len(engine.cache.free) == 4


# ------------------------------------------------------------------------------------ real ranks
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The preset checkpoint, and the single-process engine's answers to the test prompts."""
    directory = str(tmp_path_factory.mktemp("tiny"))
    checkpoint = models.materialize(models.TINY, directory)
    ps = prompts(12, 3, lo=8, hi=70, vocab=512)
    reqs = [Request(f"r{i}", p, NEW, temperature=0.7 if i % 3 == 0 else 0.0, seed=i) for i, p in enumerate(ps)]
    want = Engine(models.load(checkpoint), num_blocks=256).generate(reqs)
    return checkpoint, ps, [want[f"r{i}"] for i in range(len(ps))]


def _submit_all(cluster, ps):
    return [cluster.submit(p, NEW, temperature=0.7 if i % 3 == 0 else 0.0, seed=i) for i, p in enumerate(ps)]


@pytest.mark.parametrize("seed", [0, 1])
def test_rank_killed_at_a_random_moment_loses_no_request(tiny, tmp_path, seed):
    """SIGKILL a rank at a seeded moment of its requests' streams (prefill or decode): every request's
    tokens equal the single-process engine's, each streamed once; the survivors took the victim's
    requests over, recomputing fewer than two blocks (one interval, plus what the writer had queued)."""
    checkpoint, ps, want = tiny
    rng = random.Random(seed)
    victim, at = rng.randrange(W), rng.randrange(0, NEW - 5)
    with ServingCluster(checkpoint, W, str(tmp_path), block_tokens=8, log_dir=str(tmp_path / "logs")) as cluster:
        streams = _submit_all(cluster, ps)
        mine = [s for i, s in enumerate(streams) if i % W == victim]
        wait_for(lambda: len(mine[0].tokens) >= at, 60, "the stream to reach that token")
        time.sleep(rng.uniform(0, 0.03))
        cluster.kill(victim, signal.SIGKILL)
        got = [s.wait(60) for s in streams]
        adoptions = list(cluster.adoptions)
        mismatches = list(cluster.mismatches)
    assert got == want
    assert mismatches == []
    assert [len(s.times) for s in streams] == [NEW] * len(ps)
    assert adoptions and {a["from"] for a in adoptions} == {victim}
    assert all(a["recomputed"] < 2 * 8 and a["refused"] is None for a in adoptions), adoptions


def test_hung_rank_is_fenced_and_its_requests_go_on(tiny, tmp_path):
    """SIGSTOP: the group fences the hung rank after its heartbeat timeout and the survivors take its
    requests over; no token differs from the single-process engine's."""
    checkpoint, ps, want = tiny
    with ServingCluster(checkpoint, W, str(tmp_path), block_tokens=8, log_dir=str(tmp_path / "logs")) as cluster:
        streams = _submit_all(cluster, ps)
        wait_for(lambda: len(streams[1].tokens) >= 12, 60, "the stream to reach that token")
        cluster.kill(1, signal.SIGSTOP)
        got = [s.wait(60) for s in streams]
        adoptions = list(cluster.adoptions)
        cluster.kill(1, signal.SIGKILL)
    assert got == want
    assert adoptions and {a["from"] for a in adoptions} == {1}


def test_corrupted_checkpoint_is_refused_and_the_request_recomputed(tiny, tmp_path):
    """The victim is frozen, its KV checkpoints garbled, then it is killed: every survivor refuses the
    checkpoint (checksum), recomputes the request from its tokens, and streams the same tokens."""
    checkpoint, ps, want = tiny
    victim = 2
    with ServingCluster(checkpoint, W, str(tmp_path), block_tokens=8, log_dir=str(tmp_path / "logs")) as cluster:
        streams = _submit_all(cluster, ps)
        wait_for(lambda: len(streams[victim].tokens) >= 20, 60, "the stream to reach that token")
        cluster.kill(victim, signal.SIGSTOP)
        files = [f for i in range(victim, len(ps), W) for f in glob.glob(str(tmp_path / "run*" / "kv" / f"r{i}.*"))]
        for f in files:
            with open(f, "r+b") as fh:
                fh.seek(-16, os.SEEK_END)
                fh.write(bytes(16))
        cluster.kill(victim, signal.SIGKILL)
        got = [s.wait(60) for s in streams]
        adoptions = list(cluster.adoptions)
    assert files
    assert got == want
    refused = [a for a in adoptions if a["refused"]]
    assert any("checksum" in a["refused"] for a in refused), adoptions
    assert all(a["refused"] and a["covered"] == 0 for a in adoptions), adoptions  # none restored from a checkpoint


def test_serve_streams_through_the_death_of_rank_0(tiny, tmp_path):
    """``moe-resilient serve`` as a user starts it; one streamed completion over HTTP; rank 0 (the
    request's rank) SIGKILLed after 10 tokens; the stream goes on to the single-process answer."""
    checkpoint, ps, want = tiny
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moe_resilient.cli", "serve", "--model", checkpoint, "--nproc",
                             str(W), "--port", str(port), "--work-dir", str(tmp_path), "--block-tokens", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # the model's checkpoint is written first
            if "serving" in line:
                break
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", "/status")
                ranks = json.loads(conn.getresponse().read())["ranks"]
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": ps[0], "max_tokens": NEW, "stream": True,
                                                            "temperature": 0.7, "seed": 0}))
        response = conn.getresponse()
        assert response.status == 200
        tokens, done, finish = [], False, None
        for raw in response:
            line = raw.decode().strip()
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
                break
            choice = json.loads(line[6:])["choices"][0]
            tokens += choice["token_ids"]
            finish = choice["finish_reason"]
            if len(tokens) >= 10 and ranks:
                os.kill(ranks.pop("0"), signal.SIGKILL)
                ranks = {}
        assert done and finish == "length"
        assert tokens == want[0]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/status")
        status = json.loads(conn.getresponse().read())
        assert [a["request_id"] for a in status["adoptions"]] == ["r0"] and status["mismatches"] == []
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "text", "max_tokens": 4}))
        bad = conn.getresponse()
        assert bad.status == 400 and "token ids" in json.loads(bad.read())["error"]["message"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_disaggregated_placement_gives_attention_ranks_no_expert(tiny):
    checkpoint = tiny[0]
    model = models.load(checkpoint, 4, expert_ranks=[2, 3])
    layer = next(m for m in model.modules() if hasattr(m, "owned_slots"))
    assert set(layer.placement.slot_rank.tolist()) == {2, 3}
    assert sorted(layer.placement.phy2log[:16].tolist()) == list(range(16))  # each expert rank holds all 16
    assert layer.owned_slots(0) == range(0) and len(layer.owned_slots(3)) == 16
    layer.shard(1)
    assert layer.experts.w13.shape[0] == 0 and layer.experts.w2.shape[0] == 0
    with pytest.raises(ValueError, match="expert_ranks"):
        swap_moe_blocks(hf_model("qwen"), num_slots=16, world_size=4, expert_ranks=[4])
    with pytest.raises(ValueError, match="do not divide over the 3 expert ranks"):
        swap_moe_blocks(hf_model("qwen"), num_slots=16, world_size=4, expert_ranks=[1, 2, 3])


@pytest.mark.parametrize("victim", [1, 3], ids=["attention-worker", "expert-worker"])
def test_disaggregated_worker_killed_mid_stream(tiny, tmp_path, victim):
    """Ranks 0-1 run attention, 2-3 experts. An attention worker killed: its requests are taken over
    by the other; an expert worker killed: the experts are served from the other's replicas. Either
    way every token equals the single-process engine's."""
    checkpoint, ps, want = tiny
    with ServingCluster(checkpoint, W, str(tmp_path), block_tokens=8, expert_ranks=2,
                        log_dir=str(tmp_path / "logs")) as cluster:
        streams = _submit_all(cluster, ps)
        at = random.Random(victim).randrange(2, NEW - 8)
        wait_for(lambda: len(streams[1].tokens) >= at, 60, "the stream to reach that token")
        cluster.kill(victim, signal.SIGKILL)
        got = [s.wait(60) for s in streams]
        adoptions, mismatches = list(cluster.adoptions), list(cluster.mismatches)
    assert got == want and mismatches == []
    if victim == 1:
        assert adoptions and {(a["from"], a["by"]) for a in adoptions} == {(1, 0)}
    else:
        assert adoptions == []


def test_restart_baseline_relaunches_and_streams_each_token_once(tiny, tmp_path):
    """The baseline the drill compares against: a rank's death relaunches every rank and recomputes the
    unfinished requests; clients still see the single-process tokens, each once."""
    checkpoint, ps, want = tiny
    with ServingCluster(checkpoint, W, str(tmp_path), recovery="restart", log_dir=str(tmp_path / "logs")) as cluster:
        streams = _submit_all(cluster, ps[:4])
        wait_for(lambda: len(streams[2].tokens) >= 10, 60, "the stream to reach that token")
        cluster.kill(2, signal.SIGKILL)
        got = [s.wait(120) for s in streams]
        restarts, mismatches = list(cluster.restarts), list(cluster.mismatches)
    assert got == want[:4] and mismatches == []
    assert len(restarts) == 1 and restarts[0][1] > restarts[0][0]
