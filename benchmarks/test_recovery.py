"""Planner and recover() timings (issue 3).

    python -m pytest benchmarks/test_recovery.py --benchmark-json=benchmarks/results/recovery.json

- planner at DeepSeek-V3 scale (256 experts, 32 ranks, 288 slots): numba against the very same
  functions run as plain Python (``.py_func``), same inputs, same run;
- recover() as a pure remap (every lost expert has a live replica elsewhere) per layer;
- recover() restoring 64 MiB of experts from a shadow store in page cache, against a plain
  memcpy (``Tensor.copy_``) of the same bytes in the same run.
"""

import numpy as np
import pytest
import torch

from moe_resilient import MoEConfig, ResilientMoE, ShadowStore, recover
from moe_resilient import planner as P

E, W, SPR = 256, 32, 9


@pytest.fixture(scope="module")
def planner_inputs():
    topo = P.Topology(W, 8)
    load = np.random.default_rng(0).zipf(1.5, E).astype(np.float64).clip(max=1e6)
    plan, slot_rank = P.initial_placement(load, topo, SPR)
    alive = np.ones(W, dtype=np.bool_)
    alive[[5, 21]] = False
    return topo, load, plan.phy2log, slot_rank, alive


def _initial(numba_impl, topo, load, slot_rank):
    counts_fn = P._replica_counts if numba_impl else P._replica_counts.py_func
    pack_fn = P._pack if numba_impl else P._pack.py_func
    alive = np.ones(W, dtype=np.bool_)
    counts = counts_fn(load, np.ones(E, dtype=np.int64), W * SPR, W)
    return pack_fn(load, counts, np.full(W * SPR, -1, dtype=np.int64), slot_rank, alive, topo.rank_host)


@pytest.mark.parametrize("impl", ["numba", "python"])
def test_initial_plan(benchmark, planner_inputs, impl):
    topo, load, phy2log, slot_rank, _ = planner_inputs
    out = benchmark(_initial, impl == "numba", topo, load, slot_rank)
    assert np.array_equal(out, phy2log)  # both implementations give the same plan
    benchmark.extra_info.update(kind="initial", impl=impl)


@pytest.mark.parametrize("impl", ["numba", "python"])
def test_repair_plan(benchmark, planner_inputs, impl):
    topo, load, phy2log, slot_rank, alive = planner_inputs
    fn = P._repair if impl == "numba" else P._repair.py_func
    args = (phy2log, slot_rank, alive, load, topo.rank_host, topo.seconds_per_byte, True, True)
    new, copies = benchmark(lambda: fn(*args, np.zeros(W), 1.0))  # busy [W] is updated in place
    ref_new, ref_copies = P._repair(*args, np.zeros(W), 1.0)
    assert np.array_equal(new, ref_new) and np.array_equal(copies, ref_copies)
    benchmark.extra_info.update(kind="repair", impl=impl)


def test_recover_pure_remap(benchmark):
    torch.manual_seed(0)
    # 8 experts on 4 ranks, every expert replicated on another rank: losing rank 1 moves no bytes
    layer = ResilientMoE(MoEConfig(1024, 2048, 8, 2, num_slots=16, world_size=4),
                         phy2log=[0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7, 0, 1, 2, 3])
    layer.load_logical_weights(torch.randn(8, 4096, 1024), torch.randn(8, 1024, 2048))
    baseline = {k: v.clone() for k, v in layer.placement.state_dict().items()}
    topo = P.Topology(4, 4)

    def reset():
        layer.placement.load_state_dict(baseline)

    report = benchmark.pedantic(lambda: recover(layer, [1], topology=topo, restore_redundancy=False),
                                setup=reset, rounds=50, warmup_rounds=2)
    assert report.bytes_by_source == {} and report.experts_remapped == 4 and layer.placement.uncovered() == []
    benchmark.extra_info.update(kind="pure_remap", layers=1)


@pytest.fixture(scope="module")
def shadow_case(tmp_path_factory):
    # 16 experts of 8 MiB (H=1024, I=683, fp32); rank 0 holds 0..7 only, rank 1 holds 8..15 and 8 spares
    torch.manual_seed(0)
    H, I = 1024, 683
    layer = ResilientMoE(MoEConfig(H, I, 16, 2, num_slots=24, world_size=2),
                         phy2log=list(range(16)) + [-1] * 8, slot_rank=[0] * 8 + [1] * 16)
    store = ShadowStore.export(layer, str(tmp_path_factory.mktemp("shadow")))
    for e in range(8):  # warm the page cache
        store.read_expert("layer", e)
    return layer, store, {k: v.clone() for k, v in layer.placement.state_dict().items()}


def test_recover_from_shadow_64MiB(benchmark, shadow_case):
    layer, store, baseline = shadow_case
    topo = P.Topology(2, 2)

    def reset():
        layer.placement.load_state_dict(baseline)

    report = benchmark.pedantic(lambda: recover(layer, [0], shadow=store, topology=topo),
                                setup=reset, rounds=15, warmup_rounds=1)
    moved = sum(report.bytes_by_source.values())
    assert report.experts_restored == 8 and layer.placement.uncovered() == [] and moved >= 64 * 2**20
    benchmark.extra_info.update(kind="shadow_restore", bytes=moved)


def test_memcpy_64MiB(benchmark, shadow_case):
    layer, _, _ = shadow_case
    n = 8 * (layer.experts.w13[0].numel() + layer.experts.w2[0].numel())
    src, dst = torch.randn(n), torch.empty(n)
    benchmark.pedantic(dst.copy_, args=(src,), rounds=30, warmup_rounds=2)
    benchmark.extra_info.update(kind="memcpy", bytes=n * 4)
