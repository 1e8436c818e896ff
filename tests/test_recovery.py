"""recover() inside one process (ranks simulated by slot ownership): coverage restored from replicas
and shadow weights, outputs equal a healthy layer, zero recompiles, no address changes."""

import numpy as np
import pytest
import torch
import torch._dynamo

from moe_resilient import MoEConfig, ResilientMoE, ShadowStore, memory_report, recover
from moe_resilient import planner as P
from reference import reference_moe

H, I, E, W, SPR = 32, 48, 16, 8, 5  # 40 slots: 16 experts + 24 replicas; half the ranks hold 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    torch.manual_seed(0)
    topo = P.Topology(W, 2)
    load = np.random.default_rng(0).zipf(1.6, E).astype(float)
    plan, slot_rank = P.initial_placement(load, topo, SPR)
    layer = ResilientMoE(MoEConfig(H, I, E, 2, num_slots=W * SPR, world_size=W), phy2log=plan.phy2log,
                         slot_rank=slot_rank)
    w13 = torch.randn(E, 2 * I, H) / H**0.5
    w2 = torch.randn(E, H, I) / I**0.5
    layer.load_logical_weights(w13, w2)
    store = ShadowStore.export(layer, str(tmp_path_factory.mktemp("shadow")))
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(40, H)
    with torch.no_grad():
        compiled(x)
    yield layer, compiled, store, x, (w13, w2), {k: v.clone() for k, v in layer.state_dict().items()}, topo
    torch._dynamo.reset()


@pytest.mark.parametrize("lost", [[3], [1, 6], [0, 2, 4, 6]], ids=["one", "two", "half"])
def test_recover_restores_coverage_without_recompiling(served, lost):
    layer, compiled, store, x, (w13, w2), baseline, topo = served
    layer.load_state_dict(baseline)  # in place: same addresses
    addresses = {n: t.data_ptr() for n, t in [*layer.named_parameters(), *layer.named_buffers()]}
    with torch.no_grad():
        healthy = reference_moe(layer, x, w13, w2)
        with torch._dynamo.config.patch(error_on_recompile=True):
            report = recover(layer, lost, shadow=store, topology=topo, step=3, probe=x)
            out = compiled(x)
    assert report.recompiles == 0
    assert layer.placement.uncovered() == [] and report.uncovered == {"layer": []}
    assert layer.placement.dead_ranks() == lost
    live_slots = torch.nonzero(layer.placement.live_mask()).flatten()
    assert not torch.isin(layer.placement.slot_rank[live_slots], torch.tensor(lost)).any()
    torch.testing.assert_close(out, healthy, rtol=1e-5, atol=1e-5)
    for e in range(E):  # every live replica holds exactly its expert's weights
        for s in layer.placement.slots_of(e):
            assert torch.equal(layer.experts.w13[s], w13[e]) and torch.equal(layer.experts.w2[s], w2[e])
    assert {n: t.data_ptr() for n, t in [*layer.named_parameters(), *layer.named_buffers()]} == addresses
    assert report.experts_remapped + report.experts_restored >= 1
    assert all(age == 3 for age in report.shadow_age_steps.values())
    assert set(report.phase_seconds) == {"plan", "remap", "restore"}
    print(report.summary())


def test_recover_without_shadow_reports_uncovered_and_serves_degraded(served):
    layer, compiled, _, x, _, baseline, topo = served
    layer.load_state_dict(baseline)
    p = layer.placement
    only_on_rank_0 = [e for e in range(E) if set(p.slot_rank[p.slots_of(e)].tolist()) == {0}]
    assert only_on_rank_0  # the zipf placement leaves some experts with a single replica
    report = recover(layer, [0], topology=topo, restore_redundancy=False)
    assert sorted(report.uncovered["layer"]) == sorted(only_on_rank_0) and report.experts_restored == 0
    with torch.no_grad():
        out = compiled(x)
    assert not out.isnan().any()


def test_load_statistics_count_routed_tokens(served):
    layer, compiled, _, x, _, baseline, _ = served
    layer.load_state_dict(baseline)
    layer.read_load(reset=True)
    with torch.no_grad():
        compiled(x)
        compiled(x)
    _, _, ids = layer.gate(x)
    assert torch.equal(layer.read_load(reset=True), 2 * torch.bincount(ids.flatten(), minlength=E))
    assert layer.expert_load.sum() == 0


def test_degraded_raise_policy():
    layer = ResilientMoE(MoEConfig(H, I, 4, 2, degraded="raise"))
    layer.placement.clear(1, allow_uncovered=True)
    with pytest.raises(RuntimeError, match="expert 1 has no live replica"):
        layer(torch.randn(64, H))


def test_memory_report(served):
    layer, *_ = served
    layer.load_state_dict(served[5])
    report = memory_report(layer)
    assert report["replica_bytes"] == 24 * (3 * H * I) * 4 and report["spare_bytes"] == 0
    assert report["overhead"] == pytest.approx(1.5)


def test_bad_lost_rank(served):
    layer, *_ = served
    with pytest.raises(ValueError, match="ranks \\[9\\] out of range"):
        recover(layer, [9])


def test_recover_under_ep_plans_on_the_load_it_is_given(served):
    """Under expert parallelism (local_rank) the plan uses the load passed in (summed over ranks by
    recover_across_ranks), so it matches the single-process plan on the same counters."""
    layer, _, store, _, _, baseline, topo = served
    skewed = torch.zeros(E, dtype=torch.long)
    skewed[5], skewed[11] = 5000, 3000
    placements = []
    for kwargs in ({}, {"local_rank": 0, "load": {"layer": skewed}}, {"local_rank": 0}):
        layer.load_state_dict(baseline)
        layer.expert_load.copy_(skewed if not kwargs else torch.zeros(E, dtype=torch.long))
        recover(layer, [1, 6], shadow=store, topology=topo, **kwargs)
        placements.append(layer.placement.phy2log.clone())
    assert torch.equal(placements[0], placements[1])
    assert not torch.equal(placements[0], placements[2])  # without it: uniform load, another plan
    layer.load_state_dict(baseline)
    with pytest.raises(ValueError, match="load for layer 'layer' has shape"):
        recover(layer, [1], shadow=store, topology=topo, local_rank=0, load={"layer": torch.zeros(3)})
    assert torch.equal(layer.placement.phy2log, baseline["placement.phy2log"])  # refused before any edit
