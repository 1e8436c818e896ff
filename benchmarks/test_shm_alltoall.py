"""The all-to-all of an EP step through shared memory against gloo ``all_to_all_single``, in the same
processes: 4 ranks of one host, each sending TOKENS rows of 2048 bf16 split evenly over the ranks
(128: a decode step; 4096: a prefill), ``ElasticGroup.all_to_all`` against ``dist.all_to_all_single``
on a plain, fixed gloo group (what a user would otherwise call), alternating in blocks of calls;
medians over the blocks and of the per-block ratios.

    python -m pytest benchmarks/test_shm_alltoall.py -s --benchmark-json=benchmarks/results/shm_alltoall.json
"""

import json
import statistics
import sys

import pytest

WORKER = r"""
import json, os, sys, time
import torch
import torch.distributed as dist
from moe_resilient.group import ElasticGroup

out, tokens = sys.argv[1], int(sys.argv[2])
group = ElasticGroup.from_env(timeout=30.0).start()
assert group._shm is not None, "every rank is on this host: the exchange must be shared memory"
dist.init_process_group("gloo")  # env://: the launcher's store, a plain fixed group
W = group.world_size
counts = torch.full((W,), tokens // W)
send = torch.randn(tokens, 2048).to(torch.bfloat16)
recv = torch.empty_like(send)
block, blocks = (20, 30) if tokens <= 512 else (4, 20)
steps = {"shm": lambda: group.all_to_all(send, counts, counts),
         "gloo": lambda: dist.all_to_all_single(recv, send)}
assert torch.equal(steps["shm"](), (steps["gloo"](), recv)[1])
times = {"shm": [], "gloo": []}
for b in range(blocks + 2):
    for name in ("shm", "gloo") if b % 2 else ("gloo", "shm"):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(block):
            steps[name]()
        times[name].append((time.perf_counter() - t0) / block)
json.dump({k: v[2:] for k, v in times.items()}, open(os.path.join(out, f"rank{group.rank}.json"), "w"))
dist.barrier()
group.finish()
os._exit(0)
"""


@pytest.mark.parametrize("tokens", [128, 4096])
def test_shm_against_gloo(benchmark, tmp_path, tokens):
    from moe_resilient.launch import Launcher

    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    def run():
        with Launcher(4, [sys.executable, str(script), str(tmp_path), str(tokens)],
                      env={"MOE_RESILIENT_TRANSPORT": "auto"}) as launcher:
            assert launcher.wait(300) == {r: 0 for r in range(4)}

    benchmark.pedantic(run, rounds=1, iterations=1)
    got = json.load(open(tmp_path / "rank0.json"))
    shm_ms, gloo_ms = (statistics.median(got[k]) * 1e3 for k in ("shm", "gloo"))
    ratio = statistics.median(s / g for s, g in zip(got["shm"], got["gloo"]))
    benchmark.extra_info.update({"tokens_per_rank": tokens, "shm_ms": shm_ms, "gloo_ms": gloo_ms, "ratio": ratio})
    print(f"\n{tokens} tokens x 2048 bf16 per rank, 4 ranks: shm {shm_ms:.3f} ms, gloo {gloo_ms:.3f} ms, "
          f"shm / gloo {ratio:.3f} ({1 / ratio:.1f}x faster)")
