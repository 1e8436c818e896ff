"""One rank of the steady-state step benchmark: an EP-shaped exchange (counts, then rows) through
ElasticGroup against the same two all_to_all_single calls on a plain, fixed torch.distributed gloo
group, alternating, in the same processes. Rank 0 writes the per-pair time ratios as JSON."""

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from moe_resilient.group import ElasticGroup

ROWS, HIDDEN, PAIRS = 256, 1024, 60

if __name__ == "__main__":
    out = sys.argv[1]
    group = ElasticGroup.from_env().start()
    dist.init_process_group("gloo")  # env://: the launcher's store, a plain fixed group
    W, rank = group.world_size, group.rank
    g = torch.Generator().manual_seed(rank)
    send_counts = torch.full((W,), ROWS // W, dtype=torch.long)
    x = torch.randn(ROWS, HIDDEN, generator=g)

    def elastic_step():
        recv_counts = group.exchange_counts(send_counts)
        return group.all_to_all(x, send_counts, recv_counts)

    def plain_step():
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        recv = x.new_empty(int(recv_counts.sum()), HIDDEN)
        dist.all_to_all_single(recv, x, recv_counts.tolist(), send_counts.tolist())
        return recv

    assert torch.equal(elastic_step(), plain_step())
    ratios, t_e, t_p = [], [], []
    for i in range(PAIRS):
        order = (elastic_step, plain_step) if i % 2 else (plain_step, elastic_step)
        t = {}
        for fn in order:
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            t[fn] = time.perf_counter() - t0
        ratios.append(t[elastic_step] / t[plain_step])
        t_e.append(t[elastic_step])
        t_p.append(t[plain_step])
    if rank == 0:
        json.dump({"ratio_median": statistics.median(ratios), "elastic_ms": statistics.median(t_e) * 1e3,
                   "plain_ms": statistics.median(t_p) * 1e3, "pairs": PAIRS, "world_size": W,
                   "rows_per_rank": ROWS, "hidden": HIDDEN}, open(out, "w"))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)
