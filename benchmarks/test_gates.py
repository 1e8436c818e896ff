"""Performance gates: each claimed figure as a same-run ratio (or a bound) with a threshold that fails
when missed. About 70 s on the project's 2-core machine, which must be otherwise idle (a second
process on the cores slows the two-thread kernels more than HF's, and the gates then fail):

    python -m pytest benchmarks -m gate --benchmark-json=benchmarks/results/gates.json

Absolute regressions: save a run, then compare a later one against it
(``--benchmark-autosave`` / ``--benchmark-compare``, pytest-benchmark's own). CI runs only the tests:
timings on a shared machine must not block a landing.
"""

import statistics

import numpy as np
import pytest
import torch

from moe_resilient import MoEConfig, ResilientMoE, ShadowStore
from moe_resilient import planner as P

pytestmark = pytest.mark.gate


def _median_ratio(benchmark, paired, ours, baseline, x, pairs: int, setup=lambda: None, **info) -> float:
    """Median of ``paired``'s per-pair time(ours(x)) / time(baseline(x)) after one untimed call each
    (first calls are cold), recorded with ``info``; ``setup()`` runs untimed before each ``ours``."""
    setup()
    ours(x)
    baseline(x)
    ratio = statistics.median(paired(ours, baseline, x, pairs, setup))
    benchmark.pedantic(ours, args=(x,), setup=setup, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(median_ratio=ratio, pairs=pairs, **info)
    return ratio


# ------------------------------------------------------------------------- the layer
H, I, E, K = 1024, 2048, 8, 2


@pytest.mark.parametrize("tokens, pairs", [(1, 600), (64, 100), (512, 30)])
def test_indirection_within_3_percent_of_fixed_placement(benchmark, paired, tokens, pairs):
    torch.manual_seed(0)
    dynamic = ResilientMoE(MoEConfig(H, I, E, K)).eval()
    fixed = ResilientMoE(MoEConfig(H, I, E, K, static_placement=True)).eval()
    fixed.gate, fixed.experts = dynamic.gate, dynamic.experts  # the same weights: placement is the only difference
    x = torch.randn(tokens, H)
    with torch.no_grad():
        ratio = _median_ratio(benchmark, paired, dynamic, fixed, x, pairs, tokens=tokens)
    assert ratio <= 1.03, f"placement indirection costs {ratio:.3f}x the fixed build at {tokens} tokens"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens, pairs", [(1, 60), (8, 30), (64, 20), (512, 11), (2048, 11)])
def test_layer_no_slower_than_hf(benchmark, paired, dtype, tokens, pairs):
    """ResilientMoE swapped in for HF's Mixtral block against the faster of HF's eager and grouped_mm
    expert implementations, each pair timed back to back."""
    from test_forward import _hf_block  # the same block, built the same way

    from moe_resilient.hf import from_hf_block

    hf = {impl: _hf_block(impl, dtype) for impl in ("eager", "grouped_mm")}
    ours = from_hf_block(hf["eager"]).eval()
    x = torch.randn(1, tokens, H, dtype=dtype)  # HF's block takes [B, T, H]
    with torch.no_grad():
        if dtype == torch.float32:  # (bf16 router ties may pick other experts than HF's)
            torch.testing.assert_close(ours(x).reshape(-1, H), hf["eager"](x).reshape(-1, H), rtol=1e-4, atol=1e-4)
        best = "eager" if statistics.median(paired(hf["eager"], hf["grouped_mm"], x, 4)) <= 1 else "grouped_mm"
        ratio = _median_ratio(benchmark, paired, ours, hf[best], x, pairs, tokens=tokens, dtype=str(dtype), hf=best)
    # 2% for noise: at 2048 tokens fp32 both blocks spend ~97% of their time in the same MKL GEMMs,
    # and the median ratio lands on either side of 1.00 from run to run
    assert ratio <= 1.02, f"{ratio:.3f}x HF {best} at {tokens} tokens, {dtype}"


# ------------------------------------------------------------------------- restore and plan
def test_shadow_restore_within_1_5x_memcpy(benchmark, paired, tmp_path):
    """ShadowStore.restore of 8 experts of 8 MiB (64 MiB, page cache) into spare slots, against one
    Tensor.copy_ of the same bytes."""
    torch.manual_seed(0)
    layer = ResilientMoE(MoEConfig(1024, 683, 16, 2, num_slots=24, world_size=2),
                         phy2log=list(range(16)) + [-1] * 8, slot_rank=[0] * 8 + [1] * 16)
    store = ShadowStore.export(layer, str(tmp_path))
    n = 8 * (layer.experts.w13[0].numel() + layer.experts.w2[0].numel())
    src, dst = torch.randn(n), torch.empty(n)

    spare = layer.placement.phy2log.clone()

    def restore(_):
        for e in range(8):
            store.restore(layer, "layer", e, 16 + e)

    restore(None)  # maps the file's pages
    assert layer.placement.slots_of(3) == [3, 19] and torch.equal(layer.experts.w13[19], layer.experts.w13[3])
    ratio = _median_ratio(benchmark, paired, restore, dst.copy_, src, 30, bytes=n * 4,
                          setup=lambda: layer.placement.remap(spare))  # as in a recovery: into spare slots
    assert ratio <= 1.5, f"restoring 64 MiB took {ratio:.2f}x a memcpy of the same bytes"


@pytest.mark.parametrize("which", ["initial_placement", "repair_plan"])
def test_planner_under_1_ms(benchmark, which):
    """The public planner functions at DeepSeek-V3 scale: 256 experts, 32 ranks of 9 slots, zipf load."""
    topo = P.Topology(32, 8)
    load = np.random.default_rng(0).zipf(1.5, 256).astype(np.float64).clip(max=1e6)
    plan, slot_rank = P.initial_placement(load, topo, 9)
    alive = np.ones(32, dtype=np.bool_)
    alive[[5, 21]] = False
    if which == "initial_placement":
        fn = lambda: P.initial_placement(load, topo, 9)  # noqa: E731
    else:
        fn = lambda: P.repair_plan(plan.phy2log, slot_rank, alive, load, topo)  # noqa: E731
    benchmark.pedantic(fn, rounds=200, warmup_rounds=5)
    median_ms = benchmark.stats.stats.median * 1e3
    assert median_ms < 1.0, f"{which} took {median_ms:.3f} ms"


# ------------------------------------------------------------------------- failures across processes
def test_drill_detects_in_50_ms_serves_again_in_50_ms_and_adds_under_100_ms_to_a_step(benchmark):
    """The drill's model (4 layers, hidden 512, 16 experts), compiled ranks, rank 2 SIGKILLed: crash
    detection; every survivor agreed and repaired (serving again) after detection; and what the
    failure adds to the step it interrupts (pause after detection, less a step's usual time: the
    re-run step's own compute is not recovery)."""
    from moe_resilient.drill import run_drill

    result = benchmark.pedantic(lambda: run_drill(4, 80, [2], [30]), rounds=1, iterations=1)
    keys = ("detection_latency_s", "serving_again_after_detection_s", "pause_s", "pause_after_detection_s", "step_s",
            "recompiles")
    benchmark.extra_info.update({k: result[k] for k in keys})
    assert result["lost_batches"] == [] and result["recompiles"] == 0
    assert result["detection_latency_s"] < 0.050, result["detection_latency_s"]
    assert result["serving_again_after_detection_s"] < 0.050, result["serving_again_after_detection_s"]
    added = result["pause_after_detection_s"] - result["step_s"]
    assert added < 0.100, (result["pause_after_detection_s"], result["step_s"])


def test_elastic_step_within_5_percent_of_plain_gloo(benchmark, tmp_path):
    import json
    import os
    import sys

    from moe_resilient.launch import Launcher

    out = tmp_path / "step.json"
    cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "elastic_step_worker.py"), str(out), "60"]

    def run():
        with Launcher(4, cmd, log_dir=str(tmp_path / "logs")) as launcher:
            assert launcher.wait(300) == {r: 0 for r in range(4)}
        return json.loads(out.read_text())

    result = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    ratio = result["ratio_vs_plain_group"]
    assert ratio <= 1.05, f"ElasticGroup step {ratio:.3f}x a plain gloo group's"
