"""An expert-parallel step of the drill's model through shared memory against the same step through
gloo, in the same 4 processes: each rank runs ``model.ep`` (4 MoE layers, hidden 512, 16 experts,
6 slots per rank, 32 tokens per rank) through one ElasticGroup, its all-to-alls alternating between
shared memory and gloo in blocks of steps (the group's shared-memory exchange set aside for the gloo
blocks), eager and compiled; medians of the blocks and of the per-block ratios.

    python -m pytest benchmarks/test_ep_step.py -s --benchmark-json=benchmarks/results/ep_step.json
"""

import json
import statistics
import sys

WORKER = r"""
import json, os, sys, time
import torch
from moe_resilient.dispatch import Loopback
from moe_resilient.drill import default_slots_per_rank
from moe_resilient.drill_worker import DrillModel, make_batch
from moe_resilient.group import ElasticGroup

out, compiled = sys.argv[1], sys.argv[2] == "compiled"
rank, W = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
model = DrillModel(W, default_slots_per_rank(W, 1, 16), 0, None, layers=4, hidden=512, experts=16).eval()
for layer in model.moe:
    layer.shard(rank)
x = make_batch(0, rank, 32, 512)
if compiled:  # before the group forms, as the drill does: peers would otherwise wait out the compile
    with torch.no_grad():
        model.ep(x, Loopback(W, model.moe[0].experts.held), compiled=True)
group = ElasticGroup.from_env(timeout=30.0).start()
shm = group._shm
assert shm is not None, "every rank is on this host: the exchange must be shared memory"
times = {"shm": [], "gloo": []}
with torch.no_grad():
    for b in range(24):
        for name in (["shm", "gloo"] if b % 2 else ["gloo", "shm"]):
            group._shm = shm if name == "shm" else None
            model.ep(x, group, compiled=compiled)  # the first exchange after a switch pays for it
            group.barrier()
            t0 = time.perf_counter()
            for _ in range(6):
                model.ep(x, group, compiled=compiled)
            times[name].append((time.perf_counter() - t0) / 6)
json.dump({k: v[2:] for k, v in times.items()}, open(os.path.join(out, f"rank{rank}.json"), "w"))
group._shm = shm
group.finish()
os._exit(0)
"""


def _run(tmp_path, mode):
    from moe_resilient.launch import Launcher

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with Launcher(4, [sys.executable, str(script), str(tmp_path), mode],
                  env={"MOE_RESILIENT_TRANSPORT": "auto", "TORCHINDUCTOR_COMPILE_THREADS": "1"}) as launcher:
        assert launcher.wait(600) == {r: 0 for r in range(4)}
    return json.load(open(tmp_path / "rank0.json"))


def test_ep_step_shm_against_gloo(benchmark, tmp_path):
    results = {}

    def run():
        for mode in ("eager", "compiled"):
            (tmp_path / mode).mkdir()
            results[mode] = _run(tmp_path / mode, mode)

    benchmark.pedantic(run, rounds=1, iterations=1)
    for mode, got in results.items():
        ms = {k: statistics.median(v) * 1e3 for k, v in got.items()}
        ratio = statistics.median(s / g for s, g in zip(got["shm"], got["gloo"]))
        benchmark.extra_info[mode] = {"shm_ms": ms["shm"], "gloo_ms": ms["gloo"], "ratio": ratio}
        print(f"\n{mode}: EP step through shared memory {ms['shm']:.2f} ms, through gloo {ms['gloo']:.2f} ms; "
              f"shm / gloo {ratio:.3f} ({1 / ratio:.2f}x faster)")
