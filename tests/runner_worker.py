"""One rank of the step-runner test: the small seeded HF Mixtral of parallel_worker, parallelized,
serving STEPS steps through StepRunner while the test kills ranks, experts that lose every replica
restored from the checkpoint's safetensors; every step's logits are saved once, by the rank that
released them."""

import os
import sys
import time

import torch

from moe_resilient import ShadowStore, StepRunner, parallelize
from moe_resilient.group import ElasticGroup
from parallel_worker import batch, load

STEPS, MAX_STEPS = 40, 3000  # serve past STEPS until every rank is back, but not for ever

if __name__ == "__main__":
    out_dir, checkpoint = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    model = load("mixtral", checkpoint, slots_per_rank=6)
    group = ElasticGroup.from_env(timeout=20.0).start()
    parallelize(model, group)
    runner = StepRunner(model, group, shadow=ShadowStore.from_hf_checkpoint(checkpoint, model=model),
                        shadow_current=True)
    full_since = None  # serve STEPS steps, and 10 more once every rank is back: all members decide alike
    with torch.no_grad():
        while runner.step < MAX_STEPS:
            if len(group.members) < group.world_size:
                full_since = None
            elif full_since is None:
                full_since = runner.step
            if runner.step >= STEPS and full_since is not None and runner.step >= full_since + 10:
                break
            step = runner.step
            logits = runner(lambda: model(batch(rank, step)).logits)
            path = os.path.join(out_dir, f"rank{rank}_step{step}.pt")
            if os.path.exists(path):  # released twice
                raise SystemExit(f"step {step} of rank {rank} released twice")
            torch.save(logits, path)
            open(os.path.join(out_dir, f"progress{rank}"), "w").write(str(runner.step))
            time.sleep(0.01)
    group.finish()
    sys.stdout.flush()
    os._exit(0)
