"""Tutorial 3: expert parallelism over 3 processes; one is SIGKILLed mid-stream; the other two agree,
recover in place and keep serving through the same compiled graphs; the launcher starts a replacement,
which the group admits at a step boundary and gives its slots back.

    python tutorials/03_expert_parallel_survives_sigkill.py

Run directly, this file is the launcher; each rank it starts runs ``serve()``.
"""

import copy
import os
import signal
import sys
import tempfile
import time

import torch
import torch._dynamo

from moe_resilient import MoEConfig, ResilientMoE, ShadowStore, StepRunner, parallelize, planner
from moe_resilient.group import ElasticGroup
from moe_resilient.launch import Launcher

W, SLOTS_PER_RANK, STEPS, VICTIM = 3, 4, 40, 2
MAX_STEPS = 5000  # serve past STEPS until the replacement is back, but not for ever


def make_layer() -> ResilientMoE:
    """The same layer on every rank (same seed): 8 experts in 12 slots, 4 experts replicated."""
    torch.manual_seed(0)
    plan, slot_rank = planner.initial_placement([1.0] * 8, planner.Topology(W, W), SLOTS_PER_RANK)
    return ResilientMoE(MoEConfig(64, 128, 8, 2, num_slots=W * SLOTS_PER_RANK, world_size=W),
                        phy2log=plan.phy2log, slot_rank=slot_rank).eval()


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(16, 64, generator=torch.Generator().manual_seed(step * W + rank))


def serve(shadow_dir: str) -> None:
    rank = int(os.environ["RANK"])
    layer = make_layer()
    reference = copy.deepcopy(layer)  # every expert, one process: what the answers must be
    # 1. Keep this rank's 4 slots and make the layer's own forward expert-parallel, its compute
    #    compiled now, before the group forms (a first compile takes longer than a peer may wait).
    group = ElasticGroup.from_env()
    parallelize(layer, group, compiled=True)
    group.start()
    # 2. The runner re-runs a step that meets a dead peer after every member has repaired alike
    #    (experts that lost every replica come from the shadow store), and admits replacements.
    #    On a replacement it takes the members' placement and step.
    runner = StepRunner(layer, group, shadow=ShadowStore.open(shadow_dir), shadow_current=True)
    if group.joined:
        print(f"rank {rank}: rejoined at step {runner.step}", flush=True)
    full_since = runner.step  # every member decides alike (same step, same agreed membership)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        while runner.step < MAX_STEPS:
            if len(group.members) < W:
                full_since = None
            elif full_since is None:
                full_since = runner.step
                print(f"rank {rank}: every rank is back at step {runner.step}", flush=True)
            if runner.step >= STEPS and full_since is not None and runner.step >= full_since + 10:
                break
            step = runner.step
            x = batch(step, rank)
            y = runner(layer, x)  # 3. a step, released once every member has finished it
            torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-5)
            open(os.path.join(shadow_dir, f"served{rank}"), "w").write(str(runner.step))
            time.sleep(0.02)
    for change in runner.changes:
        print(f"rank {rank}: lost {change.lost}, admitted {change.admitted}; "
              f"{change.report.summary() if change.report else ''}", flush=True)
    group.finish()
    print(f"rank {rank}: served up to step {runner.step}; no recompiles, same answers", flush=True)


def launch() -> None:
    shadow_dir = tempfile.mkdtemp(prefix="tutorial3-")
    ShadowStore.export(make_layer(), shadow_dir)  # shadow weights for experts that lose every copy
    logs = os.path.join(shadow_dir, "logs")
    served = os.path.join(shadow_dir, f"served{VICTIM}")
    with Launcher(W, [sys.executable, __file__, shadow_dir], log_dir=logs, respawn=True) as launcher:
        deadline = time.monotonic() + 240
        while not (os.path.exists(served) and int(open(served).read() or 0) >= 10):
            if time.monotonic() > deadline or launcher.exits:  # nobody may have exited yet
                sys.exit(f"rank {VICTIM} never served 10 steps; see {logs}")
            time.sleep(0.05)
        launcher.kill(VICTIM, signal.SIGKILL)  # 4. a rank dies mid-stream; the launcher replaces it
        codes = launcher.wait(240)
    for rank in range(W):
        print(open(os.path.join(logs, f"rank{rank}.log")).read().strip() or f"rank {rank}: (no output)")
    assert (VICTIM, -signal.SIGKILL) in [(r, rc) for r, rc, _ in launcher.exits], launcher.exits
    assert codes == {r: 0 for r in range(W)}, codes  # survivors and the replacement finished
    print("no recompiles, same answers")


if __name__ == "__main__":
    if "RANK" in os.environ:
        serve(sys.argv[1])
        sys.stdout.flush()
        os._exit(0)  # old gloo generations hold sockets to the dead rank: skip their destructors
    launch()
