"""Tutorial 2: plan a placement with replicas, export shadow weights, lose ranks, recover() in place
while a compiled layer keeps serving.

    python tutorials/02_recover_from_rank_loss.py
"""

import tempfile

import numpy as np
import torch
import torch._dynamo

from moe_resilient import MoEConfig, ResilientMoE, ShadowStore, memory_report, recover
from moe_resilient import planner

torch.manual_seed(0)
E, W, SLOTS_PER_RANK = 12, 4, 5  # 20 slots: 12 experts + 8 redundant replicas

# 1. Plan: replicas for the most loaded experts, spread over ranks and hosts (2 ranks per host).
topology = planner.Topology(world_size=W, local_world_size=2)
expected_load = np.random.default_rng(0).zipf(1.5, E).astype(float)
plan, slot_rank = planner.initial_placement(expected_load, topology, SLOTS_PER_RANK)
layer = ResilientMoE(MoEConfig(128, 256, E, 2, num_slots=W * SLOTS_PER_RANK, world_size=W),
                     phy2log=plan.phy2log, slot_rank=slot_rank)
print("placement:", layer.placement.phy2log.tolist())
print("memory for replicas:", f"{memory_report(layer)['overhead']:.0%} of the experts")

# 2. Shadow weights: every logical expert in safetensors, memory-mapped.
store = ShadowStore.export(layer, tempfile.mkdtemp(prefix="shadow-"))

# 3. Serve with a compiled layer.
x = torch.randn(64, 128)
compiled = torch.compile(layer, fullgraph=True)
with torch.no_grad():
    healthy = compiled(x)

# 4. Rank 1 dies: recover() remaps experts that have a replica elsewhere, restores the rest from
#    the shadow store into reclaimed slots, and the compiled graph is reused as is.
with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
    report = recover(layer, [1], shadow=store, topology=topology, probe=x)
    print(report.summary())
    served = compiled(x)
print("max |out - healthy|:", (served - healthy).abs().max().item(), "uncovered:", layer.placement.uncovered())
assert report.recompiles == 0 and torch.allclose(served, healthy, atol=1e-5)
print("no recompiles, same answers")
