"""What a weight copy between ranks costs against reading the same expert from the shadow store, on this
machine's transport: ``transfer()`` of 16 slots (hidden 512, intermediate 1024: 6 MiB each) from rank 0
to rank 1 over an ElasticGroup (gloo, TCP loopback), and ``ShadowStore.restore`` of the same 16 experts
(page cache, checksums verified). The ratio sets ``ElasticGroup(peer_bytes_per_s=...)``.

    python -m pytest benchmarks/test_peer_transfer.py -s --benchmark-json=benchmarks/results/peer_transfer.json
"""

import json
import os
import sys

WORKER = r"""
import json, os, sys, time
import torch
from moe_resilient import MoEConfig, ResilientMoE, ShadowStore
from moe_resilient.group import ElasticGroup
from moe_resilient.transfer import PeerCopy, transfer, write

out, shadow_dir = sys.argv[1], sys.argv[2]
layer = ResilientMoE(MoEConfig(512, 1024, 16, 2, num_slots=32, world_size=2),
                     phy2log=list(range(16)) + [-1] * 16, slot_rank=[0] * 16 + [1] * 16)
group = ElasticGroup.from_env()
layer.shard(group.rank)
group.start()
layers = {"moe": layer}
copies = [PeerCopy("moe", e, e, 16 + e) for e in range(16)]
times = []
for _ in range(7):
    group.barrier()
    t0 = time.perf_counter()
    write(layers, transfer(layers, copies, group, f"bench{len(times)}"))
    times.append(time.perf_counter() - t0)
shadow = ShadowStore.open(shadow_dir)
restore = []
if group.rank == 1:
    for _ in range(7):
        t0 = time.perf_counter()
        for e in range(16):
            layer.experts.write_slot(16 + e, *shadow.read_expert("layer", e))
        restore.append(time.perf_counter() - t0)
json.dump({"transfer": times, "restore": restore, "bytes": 16 * layer.experts.slot_bytes},
          open(os.path.join(out, f"rank{group.rank}.json"), "w"))
group.finish()
os._exit(0)
"""


def test_peer_copy_against_shadow_restore(benchmark, tmp_path):
    import statistics

    from moe_resilient import MoEConfig, ResilientMoE, ShadowStore
    from moe_resilient.launch import Launcher

    ShadowStore.export(ResilientMoE(MoEConfig(512, 1024, 16, 2)), str(tmp_path / "shadow"))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    def run():
        with Launcher(2, [sys.executable, str(script), str(tmp_path), str(tmp_path / "shadow")]) as launcher:
            assert launcher.wait(300) == {0: 0, 1: 0}

    benchmark.pedantic(run, rounds=1, iterations=1)
    got = json.load(open(tmp_path / "rank1.json"))
    transfer_s, restore_s = statistics.median(got["transfer"][2:]), statistics.median(got["restore"][2:])
    gbps = lambda s: got["bytes"] / s / 1e9  # noqa: E731
    benchmark.extra_info.update({"transfer_s": transfer_s, "restore_s": restore_s, "bytes": got["bytes"],
                                 "transfer_GBps": gbps(transfer_s), "restore_GBps": gbps(restore_s)})
    print(f"\n{got['bytes'] / 2**20:.0f} MiB: peer transfer {transfer_s * 1e3:.1f} ms ({gbps(transfer_s):.2f} GB/s), "
          f"shadow restore {restore_s * 1e3:.1f} ms ({gbps(restore_s):.2f} GB/s), "
          f"transfer / restore {transfer_s / restore_s:.2f}x")
    assert os.path.exists(tmp_path / "rank0.json")
