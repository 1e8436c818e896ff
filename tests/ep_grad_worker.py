"""One rank of the EP gradient check (tests/test_elastic.py::test_ep_gradients_match_single_process):
a sharded layer's backward, then reduce_gradients; the gradients are saved for the test to compare."""

import os
import sys

import torch

from moe_resilient import MoEConfig, ResilientMoE
from moe_resilient.group import ElasticGroup
from moe_resilient.parallel import parallelize, reduce_gradients

H, I, E, W = 16, 24, 6, 4
PHY2LOG = [0, 1, 2, 3, 4, 5, 0, 1]  # 8 slots, 2 per rank; experts 0 and 1 replicated


def build():
    torch.manual_seed(0)
    return ResilientMoE(MoEConfig(H, I, E, 2, num_slots=8, world_size=W, shared_intermediate_size=8), phy2log=PHY2LOG)


def batch(rank):
    return torch.randn(5 + rank, H, generator=torch.Generator().manual_seed(rank))


if __name__ == "__main__":
    out_dir = sys.argv[1]
    group = ElasticGroup.from_env().start()
    layer = build()
    parallelize(layer, group)
    x = batch(group.rank).requires_grad_()
    layer(x).square().sum().backward()
    reduce_gradients(layer, group, average=False)
    grads = {n: p.grad for n, p in layer.named_parameters()} | {"x": x.grad}
    torch.save(grads, os.path.join(out_dir, f"grads{group.rank}.pt"))
    group.finish()
    sys.stdout.flush()
    os._exit(0)
