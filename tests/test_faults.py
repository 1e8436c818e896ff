"""Faults that once killed every survivor: a hung rank that wakes during agreement. Real processes
under the launcher, outputs checked against a single-process reference."""

import os
import random
import signal
import sys
import time

import pytest

from drill_helpers import check_outputs, records, wait_for
from moe_resilient.drill import DrillModel
from moe_resilient.launch import STORE_PREFIX, Launcher
from moe_resilient.shadow import ShadowStore

W, SPR, TOKENS = 4, 3, 16


@pytest.fixture(scope="module")
def reference():
    return DrillModel(W, SPR, seed=0).eval()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hung_rank_woken_during_agreement_is_taken_back_or_fenced(tmp_path, reference, seed):
    """SIGSTOP rank 1; SIGCONT it the moment the first survivor checks in to the agreement, plus a
    seeded random delay (0-150 ms). It is either taken back (nobody lost, the step re-run) or fenced
    (then respawned and admitted); the survivors go on either way and serve every batch correctly."""
    delay = random.Random(seed).uniform(0.0, 0.15) if seed else 0.0
    out, shadow = str(tmp_path / "out"), str(tmp_path / "shadow")
    os.makedirs(out)
    ShadowStore.export(reference, shadow)
    steps = 14
    cmd = [sys.executable, "-m", "moe_resilient.drill_worker", "--out-dir", out, "--shadow", shadow,
           "--steps", str(steps), "--tokens", str(TOKENS), "--slots-per-rank", str(SPR), "--save-outputs", "--step-sleep", "0.02",
           "--until-full", "--after-full", "3"]
    with Launcher(W, cmd, respawn=True, log_dir=str(tmp_path / "logs")) as launcher:
        wait_for(lambda: sum("batch_of" in x for x in records(out, 1)) >= 3, 120, "3 steps served")
        launcher.kill(1, signal.SIGSTOP)
        bits = f"{STORE_PREFIX}gen/0/checkin_bits/0"
        wait_for(lambda: int(launcher.store.add(bits, 0)), 30, "a survivor to check in")
        time.sleep(delay)
        launcher.kill(1, signal.SIGCONT)
        codes = launcher.wait(120)
    assert codes == {0: 0, 1: 0, 2: 0, 3: 0}, (codes, launcher.exits)
    assert all(r == 1 for r, rc, _ in launcher.exits if rc != 0), launcher.exits  # only the woken rank fell
    for r in (0, 2, 3):  # no survivor lost a batch
        served = {x["step"] for x in records(out, r) if x.get("batch_of") == r}
        assert served >= set(range(steps)), (r, sorted(served))
        failures = [x for x in records(out, r) if x.get("event") == "failure"]
        assert failures and all(f["lost"] in ([], [1]) for f in failures), failures
    assert check_outputs(out, reference, TOKENS) >= 3 * steps
