"""ResilientMoE against the plain reference MoE: outputs, gradients, replicas, degraded steps, bad input."""

import sys

import pytest
import torch

from moe_resilient import MoEConfig, PlacementError, ResilientMoE
from reference import logical_weights, reference_moe

H, I, E = 32, 48, 8


@pytest.fixture(params=["training", "inference"])
def run(request):
    """layer(x) with autograd on (router, experts, unsort and combine as separate ops), or off (no_grad:
    the fused moe_forward op)."""
    def forward(layer, x):
        with torch.set_grad_enabled(request.param == "training"):
            return layer(x)
    return forward


def _layer(top_k=2, slots=E, dtype=torch.float32, **kw):
    layer = ResilientMoE(MoEConfig(H, I, E, top_k, num_slots=slots, **kw), dtype=dtype)
    for e, s in zip(range(slots - E), range(E, slots)):  # fill spare slots with replicas
        layer.add_replica(e % E, s)
    return layer


@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("slots", [E, E + 5])
@pytest.mark.parametrize("shape", [(1, H), (7, H), (3, 50, H)])
def test_matches_reference_fp32(top_k, slots, shape, run):
    layer = _layer(top_k, slots)
    x = torch.randn(shape)
    torch.testing.assert_close(run(layer, x), reference_moe(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_matches_reference_bf16(top_k, run):
    layer = _layer(top_k, E + 3, dtype=torch.bfloat16)
    x = torch.randn(4, 33, H, dtype=torch.bfloat16)
    out = run(layer, x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference_moe(layer, x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "kw",
    [
        {"shared_intermediate_size": 40, "shared_expert_gate": True},
        {"scoring": "sigmoid", "score_bias": True, "num_groups": 4, "topk_groups": 2, "routed_scaling_factor": 2.5},
        {"norm_topk_prob": False},
    ],
)
def test_routing_variants_match_reference(kw, run):
    layer = _layer(2, E + 2, **kw)
    if layer.gate.e_score_correction_bias is not None:
        layer.gate.e_score_correction_bias.normal_()
    x = torch.randn(20, H)
    torch.testing.assert_close(run(layer, x), reference_moe(layer, x), rtol=1e-5, atol=1e-5)


def test_inference_runs_the_fused_op_and_training_does_not(monkeypatch):
    from moe_resilient import ops

    calls = []
    for name in ("moe_forward", "route_tokens", "grouped_swiglu_combine"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    layer, x = _layer(2, E + 2), torch.randn(5, H)
    with torch.no_grad():
        inferred = layer(x)
    assert calls == ["moe_forward"]
    trained = layer(x)
    assert calls == ["moe_forward"] and trained.requires_grad
    torch.testing.assert_close(inferred, trained.detach(), rtol=1e-6, atol=1e-6)
    seen = []  # a hook on the router (how HF records router logits) runs: the gate module is called
    layer.gate.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    with torch.no_grad():
        hooked = layer(x)
    assert calls == ["moe_forward", "grouped_swiglu_combine"] and len(seen) == 1
    torch.testing.assert_close(hooked, inferred, rtol=1e-6, atol=1e-6)


def test_serving_under_inference_mode_counts_load_and_keeps_shape():
    """torch.inference_mode (how servers run) takes the same one-call path as no_grad: the same output, x's
    leading dims kept, and every (token, k) pair counted once in the load buffer."""
    layer, x = _layer(2, E + 2), torch.randn(2, 3, H)
    with torch.no_grad():
        want = layer(x)
    layer.expert_load.zero_()
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == x.shape and torch.equal(got, want)
    assert int(layer.expert_load.sum()) == 2 * 3 * 2


def test_every_replica_is_used_and_gives_the_same_answer():
    layer = _layer(2, E + 8)  # every expert has two replicas
    x = torch.randn(64, H)
    want = reference_moe(layer, x)
    layer.experts.w13.grad = None
    out = layer(x)
    out.sum().backward()
    grad_rows = layer.experts.w13.grad.abs().sum((1, 2))
    assert (grad_rows[E:] > 0).sum() >= 6  # replica slots really receive tokens
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slots", [E, E + 6])
def test_gradients_match_reference(slots):
    layer = _layer(2, slots, shared_intermediate_size=24, shared_expert_gate=True)
    x = torch.randn(40, H, requires_grad=True)
    layer(x).square().sum().backward()
    layer.reduce_replica_grads()
    ours = {n: p.grad.clone() for n, p in layer.named_parameters()}
    grad_x = x.grad.clone()

    layer.zero_grad()
    x.grad = None
    w13, w2 = (w.detach().clone().requires_grad_() for w in logical_weights(layer))
    reference_moe(layer, x, w13, w2).square().sum().backward()
    for name, p in layer.named_parameters():
        if not name.startswith("experts."):
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(grad_x, x.grad, rtol=1e-4, atol=1e-5)
    for s, e in enumerate(layer.placement.phy2log.tolist()):  # every replica: its expert's full gradient
        torch.testing.assert_close(ours["experts.w13"][s], w13.grad[e], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours["experts.w2"][s], w2.grad[e], rtol=1e-4, atol=1e-5)


def test_replicas_stay_identical_under_adamw():
    layer = _layer(2, E + 8)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(32, H)).square().mean().backward()
        layer.reduce_replica_grads()
        opt.step()
    p2l = layer.placement.phy2log.tolist()
    for s in range(E, E + 8):
        assert torch.equal(layer.experts.w13[s], layer.experts.w13[p2l[s]])
        assert torch.equal(layer.experts.w2[s], layer.experts.w2[p2l[s]])


@pytest.mark.parametrize("shape", [(0, H), (2, 0, H), (1, H), (1, 1, H)])
def test_empty_batch_and_batch_of_one(shape):
    layer = _layer(2, E + 2, shared_intermediate_size=16)
    x = torch.randn(shape, requires_grad=True)
    with torch.no_grad():
        inferred = layer(x)
    assert inferred.shape == x.shape and not inferred.isnan().any()
    out = layer(x)
    assert out.shape == x.shape and not out.isnan().any()
    out.sum().backward()
    assert not x.grad.isnan().any() and not layer.experts.w13.grad.isnan().any()
    torch.testing.assert_close(out, reference_moe(layer, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inferred, out.detach(), rtol=1e-6, atol=1e-6)


def test_degraded_step_renormalizes_and_never_uses_dead_slots(run):
    layer = _layer(2, E)
    x = torch.randn(30, H)
    layer.placement.clear(3, allow_uncovered=True)
    layer.experts.w13.data[3] = float("nan")  # a dead slot must not be read
    out = run(layer, x)
    assert not out.isnan().any()
    # reference: expert 3 dropped, remaining top-k weights rescaled to the original mass
    _, w, ids = layer.gate(x)
    kept = torch.where(ids == 3, 0.0, w)
    kept = kept * w.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(1e-20)
    w13, w2 = layer.experts.w13.detach().clone(), layer.experts.w2.detach().clone()
    w13[3] = 0
    want = torch.zeros_like(x)
    for t in range(30):
        for k in range(2):
            e = int(ids[t, k])
            h = w13[e] @ x[t]
            want[t] += kept[t, k] * (w2[e] @ (torch.nn.functional.silu(h[:I]) * h[I:]))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_bad_input():
    layer = _layer()
    with pytest.raises(ValueError, match="hidden size 32"):
        layer(torch.randn(4, H + 1))
    with pytest.raises(ValueError, match="top_k must be in"):
        MoEConfig(H, I, E, top_k=9)
    with pytest.raises(ValueError, match="top_k must be in"):
        MoEConfig(H, I, E, top_k=0)
    with pytest.raises(ValueError, match="num_slots"):
        MoEConfig(H, I, E, 2, num_slots=4)
    with pytest.raises(ValueError, match="num_groups"):
        MoEConfig(H, I, E, 2, num_groups=3)


def test_placement_edits_validate_before_writing_weights():
    layer = _layer(2, E + 2)  # slots 8, 9 hold replicas of experts 0, 1
    w13_before = layer.experts.w13.detach().clone()
    before = {n: b.clone() for n, b in layer.placement.named_buffers()}
    bad = [
        (lambda: layer.add_replica(2, 99), PlacementError, "slot 99 out of range"),
        (lambda: layer.add_replica(42, 9), PlacementError, "unknown expert 42"),
        (lambda: layer.move_expert(4, 9, src_slot=3), PlacementError, "does not hold expert 4"),
        (lambda: layer.add_replica(2, 4), PlacementError, r"experts \[4\]"),  # would evict the only copy of 4
        (lambda: layer.load_expert(2, 9, torch.zeros(3, 3), torch.zeros(3, 3)), ValueError, "shapes"),
    ]
    for edit, exc, match in bad:
        with pytest.raises(exc, match=match):
            edit()
    assert torch.equal(layer.experts.w13, w13_before)
    for n, b in layer.placement.named_buffers():
        assert torch.equal(b, before[n]), n


def test_static_placement_matches_and_refuses_edits():
    torch.manual_seed(1)
    dynamic = _layer(2, E)
    static = ResilientMoE(MoEConfig(H, I, E, 2, static_placement=True))
    static.load_state_dict(dynamic.state_dict())
    x = torch.randn(16, H)
    torch.testing.assert_close(static(x), dynamic(x), rtol=0, atol=0)
    with pytest.raises(PlacementError, match="static_placement"):
        static.add_replica(0, 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_expert_weights_are_backed_by_huge_pages():
    """Slot weights are advised for transparent huge pages before first touch (a decode step streams
    them all); where THP is not disabled, the kernel backs them with huge pages."""
    from pathlib import Path

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are disabled on this machine")
    layer = ResilientMoE(MoEConfig(1024, 2048, 4, 2))
    w = layer.experts.w13
    start, end = w.data_ptr(), w.data_ptr() + w.numel() * w.element_size()
    huge_kb, overlaps = 0, False  # advising splits the mapping: count every one the tensor overlaps
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(a, 16) for a in head.split("-"))
            overlaps = lo < end and start < hi
        elif overlaps and line.startswith("AnonHugePages:"):
            huge_kb += int(line.split()[1])
    assert huge_kb >= 2048, f"w13 ({(end - start) >> 20} MiB) has {huge_kb} kB in huge pages"


def test_importing_the_layer_loads_no_control_plane():
    """numba (planner) and safetensors (shadow store, checkpoints) load on first use only."""
    import subprocess
    import sys

    code = ("import sys; from moe_resilient import MoEConfig, ResilientMoE; ResilientMoE(MoEConfig(8, 16, 4, 2)); "
            "print(sorted(m for m in ('numba', 'safetensors', 'moe_resilient.planner', 'moe_resilient.shadow') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
