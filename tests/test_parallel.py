"""Expert parallelism for whole HF models across real processes: a seeded Mixtral or Qwen3-MoE saved as
safetensors, loaded with ``from_pretrained``, ``swap_moe_blocks``, ``parallelize(model, group)``; then
``model.generate()`` and training steps unchanged on every rank, each rank holding only its own
experts, through SIGKILLs mid-generation and mid-backward and a replacement's rejoin."""

import glob
import json
import os
import signal
import sys

import pytest
import torch

pytest.importorskip("transformers")

from moe_resilient import MoEConfig, ResilientMoE, ShadowStore  # noqa: E402
from moe_resilient.experts import SlotNotHeldError  # noqa: E402
from moe_resilient.launch import Launcher  # noqa: E402
from moe_resilient.shadow import resilient_layers  # noqa: E402
from parallel_worker import (KILL_STEP, STEPS, TRAIN_STEPS, W, batch, expert_bytes, generate, hf_model,  # noqa: E402
                             load, save_checkpoint)

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The seeded HF model saved once per name as a safetensors checkpoint."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = str(tmp_path_factory.mktemp(name))
            save_checkpoint(name, made[name])
        return made[name]

    return get


def _saved(tmp_path, prefix="rank"):
    """{(rank, step): tensor} of every step's output saved by the workers."""
    out = {}
    for path in glob.glob(str(tmp_path / f"{prefix}*_step*.pt")):
        rank, step = (int(p.lstrip("rankstep")) for p in os.path.basename(path)[:-3].split("_"))
        out[(rank, step)] = torch.load(path)
    return out


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_hf_generate_survives_a_kill_mid_generation_and_a_rejoin(tmp_path, checkpoint, name):
    """from_pretrained, swapped, parallelized over 4 ranks with compiled MoE stages, serving greedy
    generate() through StepRunner: rank 2 dies in its third decoder pass of step 2; the survivors re-run
    that generation, rank 2's replacement rejoins, and every sequence any process released equals the
    HF model's own, with no recompile and a quarter of the expert slots per rank."""
    victim = 2
    cmd = [sys.executable, os.path.join(HERE, "parallel_worker.py"), str(tmp_path), name, checkpoint(name), "serve",
           str(victim), "6", "1"]
    with Launcher(W, cmd, respawn=True, log_dir=str(tmp_path / "logs")) as launcher:
        codes = launcher.wait(300)
    logs = {r: open(tmp_path / "logs" / f"rank{r}.log").read()[-3000:] for r in range(W)}
    assert codes == {r: 0 for r in range(W)}, (codes, logs)
    assert [(r, rc) for r, rc, _ in launcher.exits if rc] == [(victim, -signal.SIGKILL)], launcher.exits
    reference = hf_model(name)
    saved = _saved(tmp_path)
    with torch.no_grad():
        for (rank, step), tokens in saved.items():
            assert torch.equal(tokens, generate(reference, batch(rank, step))), (rank, step)
    results = {os.path.basename(p)[:-5]: json.load(open(p)) for p in glob.glob(str(tmp_path / "rank*.json"))}
    last = results["rank0_0"]["steps"]
    assert sorted(results) == ["rank0_0", "rank1_0", "rank2_1", "rank3_0"] and last >= STEPS
    for r in range(W):  # every step released once by every rank; the victim's in-flight one by nobody
        want = set(range(last)) - ({KILL_STEP} if r == victim else set())
        assert {s for rank, s in saved if rank == r} >= want - set(range(KILL_STEP, results["rank2_1"]["steps"]))
    for key, got in results.items():
        assert got["held_bytes"] * W == got["full_bytes"] and got["steps"] == last, (key, got)
        if key != "rank2_1":
            assert [c["lost"] for c in got["changes"] if c["lost"]] == [[victim]], got
            assert [c["admitted"] for c in got["changes"] if c["admitted"]] == [[victim]], got


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_hf_training_under_ep_matches_single_process_through_a_kill(tmp_path, checkpoint, name):
    """AdamW on the LM loss under EP, every expert on two ranks; rank 3 dies mid-backward at step 2.
    Each survivor's losses equal the HF model trained in one process on the same batches (all four
    ranks' before the loss, the survivors' after), and every replica of an expert is bit-identical."""
    cmd = [sys.executable, os.path.join(HERE, "parallel_worker.py"), str(tmp_path), name, checkpoint(name), "train",
           "3"]
    with Launcher(W, cmd, log_dir=str(tmp_path / "logs")) as launcher:
        codes = launcher.wait(300)
    logs = {r: open(tmp_path / "logs" / f"rank{r}.log").read()[-3000:] for r in range(W)}
    assert codes == {0: 0, 1: 0, 2: 0, 3: -signal.SIGKILL}, (codes, logs)
    reference = hf_model(name)
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    want = {r: [] for r in range(W)}
    for step in range(TRAIN_STEPS):
        members = range(W) if step < KILL_STEP else range(3)
        opt.zero_grad()
        losses = [reference(batch(r, step), labels=batch(r, step)).loss for r in members]
        (sum(losses) / len(losses)).backward()
        opt.step()
        for r, loss in zip(members, losses):
            want[r].append(loss.item())
    replicas = {}
    for r in range(3):
        got = torch.load(tmp_path / f"train{r}.pt")
        assert got["lost"] == [3] and got["losses"] == pytest.approx(want[r], rel=1e-4), (r, got["losses"], want[r])
        for key, weights in got["replicas"].items():
            replicas.setdefault(key.rsplit("/", 1)[0], []).append(weights)
    assert max(len(v) for v in replicas.values()) == 2
    for key, copies in replicas.items():
        assert all(torch.equal(a, b) for other in copies[1:] for a, b in zip(copies[0], other)), key


def test_expert_memory_per_rank_falls_with_the_ranks(checkpoint):
    """Mixtral, 16 experts in 4 layers, one extra slot per rank: each rank holds (16 + W) / W slots per
    layer at W = 1, 2 and 4, nothing more (the figures in benchmarks/RESULTS.md)."""
    held = {}
    for world in (1, 2, 4):
        model = load("mixtral", checkpoint("mixtral"), slots_per_rank=16 // world + 1, world_size=world)
        layers = resilient_layers(model).values()
        slot = next(iter(layers)).experts.slot_bytes
        for layer in layers:
            layer.shard(world - 1)
        held[world] = expert_bytes(model)
        assert held[world] == len(layers) * (16 + world) // world * slot
    assert held[1] > held[2] > held[4]
    print("expert bytes per rank:", held)


def test_sharded_layer_refuses_what_needs_other_ranks_slots():
    """Rank 1 of 2 holds slots 4..7 (experts 3, 0, 1, a spare). Edits write only the slots it holds;
    one that would copy from another rank's slot into its own is refused with nothing changed."""
    layer = ResilientMoE(MoEConfig(16, 32, 4, 2, num_slots=8, world_size=2), phy2log=[0, 1, 2, -1, 3, 0, 1, -1])
    layer.shard(1)
    assert layer.experts.held == range(4, 8) and layer.experts.w13.shape[0] == 4
    with pytest.raises(RuntimeError, match="run it through its group"):
        layer(torch.randn(3, 16))
    with pytest.raises(SlotNotHeldError, match="slot 2 is held by another rank"):
        layer.experts.write_slot(2, layer.experts.w13[0], layer.experts.w2[0])
    before = layer.placement.phy2log.clone()
    with pytest.raises(SlotNotHeldError):  # needs peer transfer: nothing changes
        layer.add_replica(2, 7, src_slot=2)
    assert torch.equal(layer.placement.phy2log, before)
    layer.add_replica(0, 7, src_slot=5)  # both held: a local copy
    assert torch.equal(layer.experts.w13[3], layer.experts.w13[1]) and int(layer.placement.phy2log[7]) == 0
    layer.add_replica(3, 3, src_slot=4)  # slot 3's owner (rank 0) writes it; here only the placement changes
    assert int(layer.placement.phy2log[3]) == 3
    held = (layer.experts.w13.numel() + layer.experts.w2.numel()) * layer.experts.w13.element_size()
    assert layer.memory_overhead()["held_bytes"] == held  # 4 of the 8 slots


COMPILED = """
import json, os, signal, sys
import numpy as np
import torch
import torch._dynamo
from torch import nn
from moe_resilient import MoEConfig, ResilientMoE, ShadowStore, planner
from moe_resilient.group import ElasticGroup
from moe_resilient.parallel import StepRunner, parallelize

W, SPR = 4, 4


def build():
    torch.manual_seed(0)
    plan, slot_rank = planner.initial_placement(np.ones(8), planner.Topology(W, W), SPR)
    cfg = MoEConfig(32, 64, 8, 2, num_slots=W * SPR, world_size=W)
    return nn.Sequential(*[ResilientMoE(cfg, phy2log=plan.phy2log, slot_rank=slot_rank) for _ in range(2)]).eval()


model = build()
rank = int(os.environ["RANK"])
xs = {n: torch.randn(n, 32, generator=torch.Generator().manual_seed(10 * rank + n)) for n in (0, 1, 5, 9)}
with torch.no_grad():
    want = {n: model(x) for n, x in xs.items()}
group = ElasticGroup.from_env(timeout=20.0).start()
parallelize(model, group, compiled=True)
serve = torch.compile(model)
for x in xs.values():  # a batch dimension that changes every call, as a serving loop marks it
    torch._dynamo.decorators.mark_unbacked(x, 0)
shadow = ShadowStore.open(sys.argv[2])


# a RankFailure repairs and re-runs, also when a peer's first compile starved its heartbeat and it was
# taken back (nobody lost); every rank ends each step together, so the placement edit below lands
# between the same two steps everywhere
runner = StepRunner(model, group, shadow=shadow, shadow_current=True)


def step(x):
    return runner(serve, x)


errs = {}
with torch.no_grad():
    step(xs[5])  # compiles here, every rank alike
    torch._dynamo.config.error_on_recompile = True
    ptrs = [p.data_ptr() for p in model.parameters()]
    for n in (0, 1, 5, 9):
        errs[f"batch {n}"] = float((step(xs[n]) - want[n]).abs().max()) if n else float(step(xs[n]).numel())
    if rank == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    errs["after loss"] = float((step(xs[9]) - want[9]).abs().max())
    layer, p = model[0], model[0].placement  # a placement edit on every survivor alike, within rank 0:
    mine = [s for s in range(p.num_slots) if int(p.slot_rank[s]) == 0]  # a redundant replica overwritten
    dst = next(s for s in mine if len(p.slots_of(int(p.phy2log[s]))) > 1)
    src = next(s for s in mine if int(p.phy2log[s]) != int(p.phy2log[dst]))
    layer.add_replica(int(p.phy2log[src]), dst, src_slot=src)  # a copy on rank 0, the tables elsewhere
    errs["after edit"] = float((step(xs[9]) - want[9]).abs().max())
    errs["same addresses"] = float(ptrs == [p.data_ptr() for p in model.parameters()])
json.dump(errs, open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w"))
group.finish()
os._exit(0)
"""


def test_compiled_model_under_ep_never_recompiles(tmp_path):
    """torch.compile(model) after parallelize(compiled=True), inputs' batch dimension marked unbacked:
    batches of 0, 1, 5 and 9 rows, a lost rank and a placement edit, with error_on_recompile set after
    the first call; outputs equal the single-process model's and no parameter moves."""
    script = tmp_path / "compiled.py"
    script.write_text(COMPILED)
    shadow = str(tmp_path / "shadow")
    namespace = {}
    exec(COMPILED.split("model = build()")[0], namespace)  # the same build(), for the shadow store
    ShadowStore.export(namespace["build"](), shadow)
    with Launcher(W, [sys.executable, str(script), str(tmp_path), shadow], log_dir=str(tmp_path / "logs")) as launcher:
        codes = launcher.wait(300)
    logs = {r: open(tmp_path / "logs" / f"rank{r}.log").read()[-3000:] for r in range(W)}
    assert codes == {0: 0, 1: 0, 2: 0, 3: -signal.SIGKILL}, (codes, logs)
    for r in range(3):
        errs = json.load(open(tmp_path / f"rank{r}.json"))
        assert errs.pop("batch 0") == 0.0 and errs.pop("same addresses") == 1.0, errs
        assert all(v < 1e-4 for v in errs.values()), errs


def test_step_runner_releases_every_step_once_through_kills_and_a_rejoin(tmp_path, checkpoint):
    """StepRunner over 4 ranks of an HF model, replacements respawned: rank 2 SIGKILLed mid-loop, then,
    once its replacement serves, rank 0; every step's logits released exactly once by every process
    that served it, each equal to the HF model's, and the replacements serve to the end."""
    import time

    from runner_worker import STEPS as RUNNER_STEPS

    reference = hf_model("mixtral")
    cmd = [sys.executable, os.path.join(HERE, "runner_worker.py"), str(tmp_path), checkpoint("mixtral")]

    def progress(rank):
        try:
            return int(open(tmp_path / f"progress{rank}").read() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def wait_for(pred):
        deadline = time.monotonic() + 120
        while not pred() and time.monotonic() < deadline:
            time.sleep(0.005)

    with Launcher(W, cmd, respawn=True, log_dir=str(tmp_path / "logs")) as launcher:
        wait_for(lambda: progress(2) >= 8)
        launcher.kill(2, signal.SIGKILL)
        wait_for(lambda: progress(2) > 8)  # its replacement serves: every expert has room again
        launcher.kill(0, signal.SIGKILL)
        codes = launcher.wait(300)
    logs = {r: open(tmp_path / "logs" / f"rank{r}.log").read()[-2000:] for r in range(W)}
    assert codes == {r: 0 for r in range(W)}, (codes, logs)
    saved = [os.path.basename(p) for p in glob.glob(str(tmp_path / "rank*_step*.pt"))]
    with torch.no_grad():
        for name in saved:
            rank, step = (int(p.lstrip("rankstep")) for p in name[:-3].split("_"))
            torch.testing.assert_close(torch.load(tmp_path / name), reference(batch(rank, step)).logits, rtol=1e-4,
                                       atol=1e-4, msg=name)
    last = progress(1)  # every member stopped at the same step, after every rank was back
    assert last >= RUNNER_STEPS and all(progress(r) == last for r in range(W))
    for r in (1, 3):  # never hit: every step, once
        assert {int(p.split("step")[1][:-3]) for p in saved if p.startswith(f"rank{r}_")} == set(range(last))
    for r in (0, 2):  # hit, then replaced: served again up to the end
        assert f"rank{r}_step{last - 1}.pt" in saved
