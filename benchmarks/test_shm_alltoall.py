"""The all-to-all of an EP step through shared memory against gloo ``all_to_all_single``, in the same
processes: 4 ranks of one host, each sending TOKENS rows of 2048 bf16 split evenly over the ranks
(128: a decode step; 4096: a prefill), ``ElasticGroup.all_to_all`` (into a fresh output, and into a
reused one as gloo's is) against ``dist.all_to_all_single`` on a plain, fixed gloo group (what a user
would otherwise call), alternating in blocks of calls; medians over the blocks and of the per-block
ratios.

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
mine = torch.empty_like(send)
steps = {"shm": lambda: group.all_to_all(send, counts, counts),
         "shm_out": lambda: group.all_to_all(send, counts, counts, out=mine),
         "gloo": lambda: dist.all_to_all_single(recv, send)}
assert torch.equal(steps["shm"](), (steps["gloo"](), recv)[1]) and torch.equal(steps["shm_out"](), recv)
times = {name: [] for name in steps}
for b in range(blocks + 2):
    for name in list(steps)[b % 3:] + list(steps)[:b % 3]:
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
    ms = {k: statistics.median(v) * 1e3 for k, v in got.items()}
    ratio = {k: statistics.median(s / g for s, g in zip(got[k], got["gloo"])) for k in ("shm", "shm_out")}
    benchmark.extra_info.update({"tokens_per_rank": tokens, "shm_ms": ms["shm"], "shm_out_ms": ms["shm_out"],
                                 "gloo_ms": ms["gloo"], "ratio": ratio["shm"], "ratio_out": ratio["shm_out"]})
    print(f"\n{tokens} tokens x 2048 bf16 per rank, 4 ranks: shm {ms['shm']:.3f} ms (into a reused output "
          f"{ms['shm_out']:.3f} ms), gloo {ms['gloo']:.3f} ms; shm / gloo {ratio['shm']:.3f}, reused output "
          f"{ratio['shm_out']:.3f}")
