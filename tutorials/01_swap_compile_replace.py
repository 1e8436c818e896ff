"""Tutorial 1: swap ResilientMoE into a Hugging Face model, compile it, and change expert placement
while it serves, with no recompiles.

    python tutorials/01_swap_compile_replace.py
"""

import torch
import torch._dynamo
import transformers

from moe_resilient import ResilientMoE
from moe_resilient.hf import swap_moe_blocks

torch.manual_seed(0)

# 1. Any supported HF MoE model; a tiny random Mixtral here (no download).
config = transformers.MixtralConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
)
model = transformers.MixtralForCausalLM(config).eval()
prompt = torch.randint(0, 128, (1, 8))
with torch.no_grad():
    before = model(prompt).logits

# 2. Swap every MoE block for a ResilientMoE with 4 spare slots per layer, spread over 4 "ranks".
swapped = swap_moe_blocks(model, num_slots=12, world_size=4, num_replicas=8)
print("swapped:", swapped)
layers = [model.get_submodule(name) for name in swapped]
assert all(isinstance(layer, ResilientMoE) for layer in layers)

# 3. Compile the MoE layers (fullgraph: no graph breaks inside the layer).
for name in swapped:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, torch.compile(model.get_submodule(name), fullgraph=True))

with torch.no_grad():
    after = model(prompt).logits
print("max |logits - original|:", (after - before).abs().max().item())

# 4. Placement is data: replicate, move, lose a rank. A recompile would raise here.
with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
    for layer in layers:
        p = layer.placement
        print("slots of rank 0:", [s for s in range(p.num_slots) if int(p.slot_rank[s]) == 0],
              "phy2log:", p.phy2log.tolist())
        on_rank0 = [int(p.phy2log[s]) for s in range(p.num_slots) if int(p.slot_rank[s]) == 0 and p.phy2log[s] >= 0]
        spares = [s for s in p.spare_slots() if int(p.slot_rank[s]) != 0]
        for expert, spare in zip(on_rank0, spares):
            layer.add_replica(expert, spare)  # standby replicas of rank 0's experts on other ranks
        p.mark_dead(0)  # rank 0 fails: its slots leave routing, replicas keep every expert covered
        print("after losing rank 0: phy2log", p.phy2log.tolist(), "live replicas", p.logcnt.tolist())
    served = model(prompt).logits
print("max |logits - original| after losing a rank:", (served - before).abs().max().item())
assert torch.allclose(served, before, atol=1e-5)
print("no recompiles, same answers")
