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


def test_the_layers_restores_land_on_different_survivors():
    """Each rank writes its own slots, so a repair of many layers is as fast as its busiest rank: the
    plans of two identical layers put their shadow restores on different ranks."""
    from moe_resilient.recovery import plan_repair
    from moe_resilient.shadow import resilient_layers

    cfg = MoEConfig(H, I, 4, 2, num_slots=6, world_size=3)
    model = torch.nn.Sequential(*(ResilientMoE(cfg, phy2log=[0, 2, 0, 3, 1, -1]) for _ in range(2)))
    plans = plan_repair(resilient_layers(model), [2], topology=P.Topology(3, 3), local_rank=0)
    targets = [int(plan.copies[0, 0]) for plan in plans.values()]
    assert [int(model[0].placement.slot_rank[t]) for t in targets] == [0, 1]


def test_a_rank_holding_no_slot_follows_the_repair(tmp_path):
    """Disaggregated serving: an attention rank owns no expert slot, yet applies the same placement
    edits as the expert ranks (it routes its tokens by them)."""
    cfg = MoEConfig(H, I, 4, 2, num_slots=8, world_size=3)
    placement = dict(phy2log=[0, 1, -1, -1, 2, 3, -1, -1], slot_rank=[1, 1, 1, 1, 2, 2, 2, 2])
    whole = ResilientMoE(cfg, **placement)
    whole.load_logical_weights(torch.randn(4, 2 * I, H), torch.randn(4, H, I))
    store = ShadowStore.export(whole, str(tmp_path / "shadow"))
    expert_rank, attention_rank = ResilientMoE(cfg, **placement), ResilientMoE(cfg, **placement)
    expert_rank.shard(2)
    attention_rank.shard(0)
    assert len(attention_rank.experts.w13) == 0
    for rank, layer in ((2, expert_rank), (0, attention_rank)):
        recover(layer, [1], shadow=store, local_rank=rank, shadow_current=True)
    assert torch.equal(attention_rank.placement.phy2log, expert_rank.placement.phy2log)
    assert attention_rank.placement.uncovered() == [] and expert_rank.placement.slots_of(0) in ([6], [7])
    attention, experts = memory_report(attention_rank), memory_report(expert_rank)
    assert attention.pop("held_bytes") == 0 and experts.pop("held_bytes") > 0 and attention == experts


# --------------------------------------------------------------------------- honest reports, consistent replicas
# Two hosts ({0, 1}, {2, 3}), four slots a rank. Losing rank 1 leaves expert 2 with no live replica and
# expert 3 with two of its three: its redundancy copy lands on rank 0 (host 0), whose cheapest sources
# are a host-memory shadow or a replica on the other host.
TWO_HOSTS = P.Topology(4, 2)
PHY2LOG = [0, 1, -1, -1, 2, 3, -1, -1, 3, 1, -1, -1, 3, 0, -1, -1]


def _two_host_layer(tmp_path, step=0):
    torch.manual_seed(1)
    layer = ResilientMoE(MoEConfig(H, I, 4, 2, num_slots=16, world_size=4), phy2log=PHY2LOG)
    layer.load_logical_weights(torch.randn(4, 2 * I, H) / H**0.5, torch.randn(4, H, I) / I**0.5)
    return layer, ShadowStore.export(layer, str(tmp_path / "shadow"), step=step)


def _replicas_agree(layer):
    for e in range(layer.config.num_experts):
        slots = layer.placement.slots_of(e)
        for s in slots[1:]:
            assert torch.equal(layer.experts.w13[s], layer.experts.w13[slots[0]]), (e, s)
            assert torch.equal(layer.experts.w2[s], layer.experts.w2[slots[0]]), (e, s)


def test_report_counts_only_experts_that_lost_every_replica_as_restored(tmp_path):
    layer, store = _two_host_layer(tmp_path)
    plan = P.repair_plan(PHY2LOG, layer.placement.slot_rank, [True, False, True, True], np.ones(4), TWO_HOSTS)
    assert [tuple(c[:3]) for c in plan.copies.tolist()] == [(2, 2, P.SOURCE_SHADOW_MEMORY),
                                                            (3, 3, P.SOURCE_SHADOW_MEMORY)]
    report = recover(layer, [1], shadow=store, topology=TWO_HOSTS)
    assert (report.experts_remapped, report.experts_restored, report.replicas_added) == (1, 1, 1)
    assert layer.placement.slots_of(2) == [2] and layer.placement.slots_of(3) == [3, 8, 12]
    # step unknown: the shadow may be stale, so the redundancy copy came from the live replica on host 1
    assert set(report.bytes_by_source) == {"shadow_memory", "peer_other_host"}
    assert report.shadow_age_steps == {("layer", 2): None} and "age unknown" in report.summary()
    _replicas_agree(layer)


def _train(layer, steps):
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(steps):
        layer(torch.randn(64, H)).square().mean().backward()
        layer.reduce_replica_grads()
        opt.step()
        opt.zero_grad()


def test_stale_shadow_never_makes_replicas_disagree(tmp_path):
    layer, store = _two_host_layer(tmp_path, step=0)
    _train(layer, 3)  # the shadow is now 3 steps behind
    current3 = layer.experts.w13[5].detach().clone()
    report = recover(layer, [1], shadow=store, topology=TWO_HOSTS, step=3)
    _replicas_agree(layer)  # expert 3's new copy came from a live replica, not the step-0 shadow
    assert len(layer.placement.slots_of(3)) == 3
    assert all(torch.equal(layer.experts.w13[s], current3) for s in layer.placement.slots_of(3))
    assert report.stale_restores == {("layer", 2): 3}  # no live copy left: restored, and reported
    assert "STALE shadow: layer[2] 3 steps old" in report.summary()


def test_current_shadow_supplies_redundancy(tmp_path):
    layer, store = _two_host_layer(tmp_path, step=0)
    _train(layer, 2)
    store.refresh(layer, 2, background=False)
    report = recover(layer, [1], shadow=store, topology=TWO_HOSTS, step=2)
    assert report.bytes_by_source == {"shadow_memory": 2 * 3 * H * I * 4}  # both copies, the cheaper source
    assert report.stale_restores == {} and report.replicas_added == 1
    _replicas_agree(layer)


@pytest.mark.parametrize("local_rank", [0, 2, 3])
def test_under_ep_a_remote_replica_and_stale_shadow_skip_redundancy_on_every_rank(tmp_path, local_rank):
    layer, store = _two_host_layer(tmp_path, step=0)
    report = recover(layer, [1], shadow=store, topology=TWO_HOSTS, step=4, local_rank=local_rank)
    assert report.redundancy_skipped == {"layer": [3]} and report.replicas_added == 0
    assert layer.placement.phy2log.tolist() == [0, 1, 2, -1, 2, 3, -1, -1, 3, 1, -1, -1, 3, 0, -1, -1]
    assert "redundancy not restored" in report.summary()


@pytest.mark.parametrize("ranks", [1, np.int64(1), torch.tensor(1), [np.int32(1)], torch.tensor([1]), (1,),
                                   np.array([1])], ids=lambda r: type(r).__name__)
def test_lost_ranks_accept_integer_likes(tmp_path, ranks):
    layer, store = _two_host_layer(tmp_path)
    assert recover(layer, ranks, shadow=store, topology=TWO_HOSTS).lost_ranks == [1]
    assert layer.placement.dead_ranks() == [1]


@pytest.mark.parametrize("ranks", [[1.5], "1", True, [True], torch.tensor(1.0), [None], np.bool_(True)],
                         ids=repr)
def test_lost_ranks_refuse_other_types_and_change_nothing(tmp_path, ranks):
    layer, store = _two_host_layer(tmp_path)
    before = {n: t.clone() for n, t in layer.placement.state_dict().items()}
    with pytest.raises(TypeError, match="not an integer|is a string"):
        recover(layer, ranks, shadow=store, topology=TWO_HOSTS)
    for n, t in layer.placement.state_dict().items():
        assert torch.equal(t, before[n]), n


def test_recover_accepts_a_compiled_model(tmp_path):
    torch.manual_seed(2)
    cfg = MoEConfig(H, I, 4, 2, num_slots=16, world_size=4)
    model = torch.nn.Sequential(*[ResilientMoE(cfg, phy2log=PHY2LOG) for _ in range(3)])
    store = ShadowStore.export(model, str(tmp_path))
    x = torch.randn(24, H)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        want = model(x)
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            report = recover(compiled, [1], shadow=store, topology=TWO_HOSTS, probe=x)
            out = compiled(x)
    assert report.recompiles == 0 and set(report.uncovered) == {"0", "1", "2"}
    assert report.experts_restored == 3 and all(not v for v in report.uncovered.values())
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
