"""The drill worker with faults only tests inject:
    --perturb-placement      rank 1 starts with another placement (the start-up check must refuse it)
    --die-during-recovery R  rank R SIGKILLs itself on meeting a failure, before it repairs
Everything else is passed to ``moe_resilient.drill_worker``."""

import argparse
import os
import signal
import sys

from moe_resilient import drill_worker

ap = argparse.ArgumentParser()
ap.add_argument("--perturb-placement", action="store_true")
ap.add_argument("--die-during-recovery", type=int, default=-1)
faults, rest = ap.parse_known_args()
rank = int(os.environ["RANK"])

if faults.perturb_placement and rank == 1:
    check = drill_worker.check_placement_consistent

    def perturbed_check(layers, group):
        first = next(iter(layers.values())).placement
        first.remap(first.phy2log.roll(1))
        return check(layers, group)

    drill_worker.check_placement_consistent = perturbed_check

if faults.die_during_recovery == rank:
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    drill_worker.recover_across_ranks = die

code = drill_worker.worker(drill_worker.worker_args(rest))
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
