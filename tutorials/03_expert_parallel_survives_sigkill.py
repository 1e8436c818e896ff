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

from moe_resilient import MoEConfig, ResilientMoE, ShadowStore, planner
from moe_resilient.dispatch import Loopback, ep_forward
from moe_resilient.elastic import recover_across_ranks
from moe_resilient.group import ElasticGroup, RankFailure
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
    shadow = ShadowStore.open(shadow_dir)
    with torch.no_grad():
        # 1. Compile the three compute stages before the group forms (a first compile takes longer
        #    than any collective may wait); from here on, a recompile raises.
        ep_forward(layer, batch(0, rank), Loopback(W), compiled=True)
        group = ElasticGroup.from_env().start()
        step = full_since = 0  # full_since: the step from which every rank is a member again

        def catch_up(step):  # every member applies the same repairs and readmissions, in order
            return recover_across_ranks(layer, group, step=step, shadow=shadow, topology=planner.Topology(W, W),
                                        shadow_current=True)  # serving: weights never change

        if group.joined:  # a replacement: take the members' placement and step, get slots back
            step = full_since = catch_up(None).step
            print(f"rank {rank}: rejoined at step {step}", flush=True)
        with torch._dynamo.config.patch(error_on_recompile=True):
            # every member decides alike (same step, same agreed membership): serve STEPS, and 10 more
            # once everyone is back
            while step < max(STEPS, full_since + 10) or len(group.members) < W:
                assert step < MAX_STEPS, "the replacement never came back"
                x = batch(step, rank)
                while True:  # 2. a step that meets a dead peer raises RankFailure: recover, re-run it
                    try:
                        y = ep_forward(layer, x, group, compiled=True)
                        break
                    except RankFailure as failure:  # every survivor repairs alike, then they compare
                        print(f"rank {rank}, step {step}: {failure}", flush=True)  # names how it was seen
                        print(f"rank {rank}, step {step}: {catch_up(step).report.summary()}", flush=True)
                torch.testing.assert_close(y, reference(x), rtol=1e-5, atol=1e-5)
                open(os.path.join(shadow_dir, f"served{rank}"), "w").write(str(step + 1))
                step += 1
                if group.step_boundary():  # 3. replacements are admitted here, agreed in-band
                    full_since = step
                    print(f"rank {rank}: admitted {catch_up(step).admitted} at step {step}", flush=True)
                time.sleep(0.02)
    group.finish()
    print(f"rank {rank}: served up to step {step}; no recompiles, same answers", flush=True)


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
