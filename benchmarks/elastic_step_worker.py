"""One rank of the steady-state step benchmark: an EP-shaped exchange (counts, then rows) through
ElasticGroup against (a) the same two all_to_all_single calls on a plain, fixed torch.distributed
gloo group and (b) the same two calls made directly on the gloo backend of ElasticGroup's current
generation (what the wrapper itself costs). Blocks of BLOCK steps per variant, the three variants in
rotating order, in the same processes; rank 0 writes the median and quartiles of the per-round
time ratios as JSON, and what the heartbeat thread (which runs through every variant) costs."""

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from moe_resilient.group import ElasticGroup

ROWS, HIDDEN, ROUNDS, BLOCK = 256, 1024, 150, 10

if __name__ == "__main__":
    out = sys.argv[1]
    ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else ROUNDS
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

    backend = group._gloo()

    def raw_step():
        recv_counts = torch.empty_like(send_counts)
        backend.alltoall_base(recv_counts, send_counts, [], []).wait()
        recv = x.new_empty(int(recv_counts.sum()), HIDDEN)
        backend.alltoall_base(recv, x, recv_counts.tolist(), send_counts.tolist()).wait()
        return recv

    assert torch.equal(elastic_step(), plain_step()) and torch.equal(raw_step(), plain_step())
    times = {f: [] for f in (elastic_step, plain_step, raw_step)}
    vs_plain, vs_raw = [], []
    for i in range(ROUNDS):
        order = [elastic_step, plain_step, raw_step]
        order = order[i % 3:] + order[: i % 3]  # rotate the order too
        t = {}
        for fn in order:
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(BLOCK):
                fn()
            t[fn] = (time.perf_counter() - t0) / BLOCK
            times[fn].append(t[fn])
        vs_plain.append(t[elastic_step] / t[plain_step])
        vs_raw.append(t[elastic_step] / t[raw_step])
    if rank == 0:
        # The heartbeat thread beats through every variant, so the ratios cannot see it: time its work
        # (two store round trips per beat) on a connection of its own and scale to its beat rate.
        store = group._connect()
        t0 = time.perf_counter()
        for i in range(200):
            store.set(f"bench/hb/{rank}", str(i))
            store.add("join/count", 0)
        beat_s = (time.perf_counter() - t0) / 200
        med = {f.__name__: statistics.median(v) * 1e3 for f, v in times.items()}
        q = statistics.quantiles(vs_plain, n=4)
        boot = torch.Generator().manual_seed(0)  # 95% interval of the median ratio, by bootstrap
        ratios = torch.tensor(vs_plain)
        medians = ratios[torch.randint(len(vs_plain), (2000, len(vs_plain)), generator=boot)].median(dim=1).values
        ci = torch.quantile(medians, torch.tensor([0.025, 0.975], dtype=medians.dtype)).tolist()
        json.dump({"ratio_vs_plain_group": statistics.median(vs_plain), "ratio_vs_plain_q1_q3": [q[0], q[2]],
                   "ratio_vs_plain_median_95ci": ci,
                   "ratio_vs_same_backend": statistics.median(vs_raw),
                   "elastic_ms": med["elastic_step"], "plain_ms": med["plain_step"], "raw_ms": med["raw_step"],
                   "heartbeat_ms_per_beat": beat_s * 1e3,
                   "heartbeat_share_of_a_core": beat_s / group.heartbeat_interval,
                   "rounds": ROUNDS, "steps_per_block": BLOCK, "world_size": W, "rows_per_rank": ROWS,
                   "hidden": HIDDEN}, open(out, "w"))
    dist.barrier()
    group.finish()
    sys.stdout.flush()
    os._exit(0)
