"""The all-to-all of an EP step through shared memory against gloo, in the same processes: 4 ranks of
one host, ``ElasticGroup.all_to_all`` of ROWS rows x 512 fp32 to every rank, the transports timed
alternately in blocks of 20 calls (gloo: ``group._shm`` set aside), medians over 30 blocks.

    python -m pytest benchmarks/test_shm_alltoall.py -s --benchmark-json=benchmarks/results/shm_alltoall.json
"""

import json
import statistics
import sys

import pytest

WORKER = r"""
import json, os, sys, time
import torch
from moe_resilient.group import ElasticGroup

out, rows = sys.argv[1], int(sys.argv[2])
group = ElasticGroup.from_env(timeout=30.0).start()
W = group.world_size
counts = torch.full((W,), rows)
send = torch.randn(rows * W, 512)
shm = group._shm
times = {"shm": [], "gloo": []}
for block in range(32):
    for name in ("shm", "gloo") if block % 2 else ("gloo", "shm"):
        group._shm = shm if name == "shm" else None
        group.barrier()
        t0 = time.perf_counter()
        for _ in range(20):
            group.all_to_all(send, counts, counts)
        times[name].append((time.perf_counter() - t0) / 20)
group._shm = shm
json.dump({k: v[2:] for k, v in times.items()}, open(os.path.join(out, f"rank{group.rank}.json"), "w"))
group.finish()
os._exit(0)
"""


@pytest.mark.parametrize("rows", [1, 32, 512])
def test_shm_against_gloo(benchmark, tmp_path, rows):
    from moe_resilient.launch import Launcher

    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    def run():
        with Launcher(4, [sys.executable, str(script), str(tmp_path), str(rows)],
                      env={"MOE_RESILIENT_TRANSPORT": "auto"}) as launcher:
            assert launcher.wait(300) == {r: 0 for r in range(4)}

    benchmark.pedantic(run, rounds=1, iterations=1)
    got = json.load(open(tmp_path / "rank0.json"))
    shm_ms, gloo_ms = (statistics.median(got[k]) * 1e3 for k in ("shm", "gloo"))
    ratio = statistics.median(s / g for s, g in zip(got["shm"], got["gloo"]))
    benchmark.extra_info.update({"rows_per_pair": rows, "shm_ms": shm_ms, "gloo_ms": gloo_ms, "ratio": ratio})
    print(f"\n{rows} rows x 512 fp32 per pair, 4 ranks: shm {shm_ms:.3f} ms, gloo {gloo_ms:.3f} ms, "
          f"shm / gloo {ratio:.2f}")
