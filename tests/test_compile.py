"""torch.compile(fullgraph=True) once; then placement edits cause zero recompiles, outputs stay equal
to eager, and no parameter or placement buffer moves."""

import pytest
import torch
import torch._dynamo

from moe_resilient import MoEConfig, ResilientMoE
from reference import logical_weights, reference_moe

H, I, E = 32, 48, 8


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    torch._dynamo.reset()
    layer = ResilientMoE(
        MoEConfig(H, I, E, 2, num_slots=E + 4, world_size=3, shared_intermediate_size=16, shared_expert_gate=True)
    )
    layer.add_replica(0, 8)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(24, H)
    with torch.no_grad():  # the only two compiles: inference (the fused expert op), and training
        compiled(x)
    compiled(x.clone().requires_grad_())
    yield layer, compiled, x
    torch._dynamo.reset()


def _addresses(layer):
    return {n: t.data_ptr() for n, t in [*layer.named_parameters(), *layer.named_buffers()]}


def _edits_never_recompile(layer, cm, x):
    """Placement edits of every kind on `layer`, `cm` compiled from it: zero recompiles, outputs equal to
    eager (and to the reference MoE while every expert is covered), load counted, nothing moved."""
    addresses = _addresses(layer)
    w13, w2 = (w.detach().clone() for w in logical_weights(layer))
    want = reference_moe(layer, x, w13, w2).detach()
    edits = [
        lambda: layer.add_replica(5, 9),  # add a replica
        lambda: layer.move_expert(3, 10),  # move an expert to a spare slot
        lambda: layer.placement.clear(0),  # drop a slot while a replica of its expert lives elsewhere
        lambda: layer.placement.remap([0, 1, 2, -1, 4, 5, 6, 7, 0, 5, 3, -1]),  # whole new map
        lambda: layer.placement.mark_dead(2, allow_uncovered=True),  # rank 2 (slots 8..11) dies; 3 uncovered
        lambda: layer.load_expert(3, 3, w13[3], w2[3]),  # coverage restored on a survivor from a copy
    ]
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for edit in edits:
            edit()
            counted = int(layer.expert_load.sum())
            torch.testing.assert_close(cm(x), layer(x), rtol=1e-6, atol=1e-6)
            assert int(layer.expert_load.sum()) == counted + 2 * x.shape[0] * 2  # both count their pairs
            if not layer.placement.uncovered():
                torch.testing.assert_close(cm(x), want, rtol=1e-5, atol=1e-5)
    assert _addresses(layer) == addresses


def test_placement_changes_never_recompile(compiled):
    _edits_never_recompile(*compiled)


def test_degraded_step_compiled(compiled):
    layer, cm, x = compiled
    layer.placement.remap([0, 1, 2, 3, 4, 5, 6, 7, -1, -1, -1, -1])
    layer.placement.mark_alive(2)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        layer.placement.clear(6, allow_uncovered=True)
        out = cm(x)
        torch.testing.assert_close(out, layer(x), rtol=1e-6, atol=1e-6)
        layer.load_expert(6, 11, layer.experts.w13[6].clone(), layer.experts.w2[6].clone())  # restore
        torch.testing.assert_close(cm(x), reference_moe(layer, x), rtol=1e-5, atol=1e-5)


def test_compiled_backward_matches_eager(compiled):
    layer, cm, x = compiled
    x = x.clone().requires_grad_()
    with torch._dynamo.config.patch(error_on_recompile=True):
        cm(x).square().sum().backward()
    compiled_grads = {n: p.grad.clone() for n, p in layer.named_parameters()} | {"x": x.grad.clone()}
    layer.zero_grad()
    x.grad = None
    layer(x).square().sum().backward()
    eager_grads = {n: p.grad for n, p in layer.named_parameters()} | {"x": x.grad}
    for n, g in eager_grads.items():
        torch.testing.assert_close(compiled_grads[n], g, rtol=1e-5, atol=1e-5, msg=n)


def test_ep_forward_is_one_graph_for_every_batch_size_and_placement():
    """The compiled expert-parallel forward (one graph per process, shared by every layer, the
    exchanges inside it as custom ops) runs batches of any size, 0 and 1 included, and placement
    edits without recompiling."""
    from moe_resilient import dispatch
    from moe_resilient.dispatch import Loopback, ep_forward
    from moe_resilient.recovery import compiled_graphs

    torch.manual_seed(1)
    cfg = MoEConfig(H, I, E, 2, num_slots=E + 4, world_size=3)
    layers = [ResilientMoE(cfg), ResilientMoE(cfg)]
    layers[0].add_replica(2, 9)
    group = Loopback(3)
    with torch.no_grad():
        dispatch._group = group
        with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
            explained = torch._dynamo.explain(dispatch._ep_forward)(layers[0], torch.randn(16, H), 3)
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained
        ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
        assert {"moe_resilient.ep_dispatch.default", "moe_resilient.ep_all_to_all.default",
                "moe_resilient.ep_exchange_counts.default"} <= ops, ops
        graphs = compiled_graphs()
        ep_forward(layers[0], torch.randn(16, H), group, compiled=True)  # compiles the one graph
        with torch._dynamo.config.patch(error_on_recompile=True):
            for layer, tokens in [(layers[0], 5), (layers[1], 16), (layers[0], 1), (layers[1], 0), (layers[0], 40)]:
                x = torch.randn(tokens, H)
                torch.testing.assert_close(ep_forward(layer, x, group, compiled=True), layer(x), rtol=1e-5, atol=1e-5)
            layers[0].move_expert(5, 10)
            layers[0].placement.mark_dead(2, allow_uncovered=True)
            x = torch.randn(12, H)
            torch.testing.assert_close(ep_forward(layers[0], x, group, compiled=True), layers[0](x), rtol=1e-5, atol=1e-5)
    assert compiled_graphs() == graphs + 1


def test_lean_compile_follows_placement_edits():
    """The README's recipe for the least per-call overhead (no guards on module attributes, no size
    asserts) still sees every placement edit: they are in-place writes to tensors the graph reads. Last
    in this file: its reset would drop the shared fixture's graphs."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    layer = ResilientMoE(MoEConfig(H, I, E, 2, num_slots=E + 4, world_size=3))
    layer.add_replica(0, 8)
    cm = torch.compile(layer, fullgraph=True, options={
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "size_asserts": False})
    x = torch.randn(24, H)
    with torch.no_grad():
        cm(x)
    _edits_never_recompile(layer, cm, x)
    torch._dynamo.reset()
