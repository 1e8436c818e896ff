"""The layer on a CUDA device, where the ops run ops/cuda.py (torch._grouped_mm for bf16, the plain
references otherwise): equal to the same layer on CPU forward and backward, the compositions equal to the
references there, a serving step that never waits on the device and replays placement edits from one
captured CUDA graph, compiled with zero recompiles across placement edits, the ops pass opcheck there, a
swapped HF model gives the original logits, and two ranks sharing the GPU run an expert-parallel forward
equal to one process. Skipped without a GPU."""

import copy
import os
import sys

import pytest
import torch
import torch._dynamo

from moe_resilient import MoEConfig, ResilientMoE, ops
from moe_resilient.ops import cuda as cuda_kernels
from reference import reference_moe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

H, I, E = 32, 48, 8


@pytest.fixture(autouse=True)
def _exact_fp32():
    """TF32 off: the comparisons against CPU are at fp32 tolerances."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _layers(dtype=torch.float32):
    torch.manual_seed(0)
    cpu = ResilientMoE(MoEConfig(H, I, E, 2, num_slots=E + 4, world_size=3, shared_intermediate_size=16,
                                 shared_expert_gate=True), dtype=dtype)
    cpu.add_replica(0, 8)
    cpu.add_replica(5, 9)
    return cpu, copy.deepcopy(cpu).cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_cpu(dtype):
    cpu, gpu = _layers(dtype)
    x = torch.randn(37, H, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    with torch.no_grad():  # serving: grouped_swiglu_combine
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=tol, atol=tol)
        gpu.placement.clear(0)  # expert 0 now served by its replica only
        cpu.placement.clear(0)
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=tol, atol=tol)
    assert torch.equal(gpu.expert_load.cpu(), cpu.expert_load)


def test_backward_equals_cpu():
    cpu, gpu = _layers()
    x = torch.randn(29, H, requires_grad=True)
    xg = x.detach().cuda().requires_grad_()
    cpu(x).square().sum().backward()
    gpu(xg).square().sum().backward()
    torch.testing.assert_close(xg.grad.cpu(), x.grad, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_grouped_mm_compositions_equal_references():
    """bf16 on the GPU: the grouped GEMMs (forward, backward with its split-row weight gradients, empty
    slots and unroutable rows included) against the references' per-slot products."""
    _, gpu = _layers(torch.bfloat16)
    gpu.placement.clear(1, allow_uncovered=True)  # expert 1: no live replica, its pairs unroutable
    p, w13, w2 = gpu.placement, gpu.experts.w13.detach(), gpu.experts.w2.detach()
    ids = torch.randint(0, E, (37, 2), device="cuda")
    routed = ops.route_to_slots_reference(ids, p.log2phy, p.logcnt, 12)
    for got, want in zip(cuda_kernels.route_to_slots(ids, p.log2phy, p.logcnt, 12), routed):
        assert torch.equal(got, want)
    slot_ids, order, offsets = routed
    assert (slot_ids < 0).any() and (offsets[1:] == offsets[:-1]).any()
    x = torch.randn(37, H, dtype=torch.bfloat16, device="cuda")
    rows, grad = x[order // 2], torch.randn(74, H, dtype=torch.bfloat16, device="cuda")
    tol = dict(rtol=2e-2, atol=2e-2)
    assert cuda_kernels.grouped_mm_fits(rows, w13, w2)
    torch.testing.assert_close(cuda_kernels.swiglu_rows(rows, offsets, w13, w2),
                               ops.grouped_swiglu_reference(rows, offsets, w13, w2), **tol)
    for got, want in zip(cuda_kernels.swiglu_rows_backward(grad, rows, offsets, w13, w2),
                         ops.grouped_swiglu_backward_reference(grad, rows, offsets, w13, w2)):
        torch.testing.assert_close(got, want, **tol)
    weights = torch.rand(37, 2, device="cuda")
    ends = cuda_kernels.slot_ends(offsets, order.shape[0])
    torch.testing.assert_close(cuda_kernels.combine_rows(x, order, ends, slot_ids, weights, w13, w2),
                               ops.grouped_swiglu_combine_reference(x, order, offsets, slot_ids, weights, w13, w2),
                               **tol)


def test_serving_never_syncs_and_a_captured_graph_follows_placement_edits():
    """bf16 serving: no host sync in a step (the sync debug mode raises on any), so one CUDA graph
    captures it; placement edits between replays change its output as they change eager's, with no
    recapture, and every parameter and buffer keeps its address."""
    cpu, gpu = _layers(torch.bfloat16)
    x = torch.randn(2, 19, H, dtype=torch.bfloat16, device="cuda")
    addresses = {n: t.data_ptr() for n, t in [*gpu.named_parameters(), *gpu.named_buffers()]}
    with torch.no_grad():
        gpu(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            gpu(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
            gpu(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = gpu(x)
        edits = [lambda m: m.add_replica(3, 10), lambda m: m.move_expert(4, 11), lambda m: m.placement.clear(8),
                 lambda m: m.placement.clear(2, allow_uncovered=True)]
        for edit in edits:
            edit(gpu)
            edit(cpu)
            before = gpu.expert_load.clone()
            graph.replay()
            assert gpu.expert_load.sum() - before.sum() == 2 * 38  # the graph counts the load too
            torch.testing.assert_close(captured, gpu(x), rtol=1.6e-2, atol=1e-3)
            torch.testing.assert_close(captured.cpu(), cpu(x.cpu()), rtol=3e-2, atol=3e-2)
    assert {n: t.data_ptr() for n, t in [*gpu.named_parameters(), *gpu.named_buffers()]} == addresses


def test_compiled_placement_edits_never_recompile():
    torch._dynamo.reset()
    _, layer = _layers()
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(24, H, device="cuda")
    addresses = {n: t.data_ptr() for n, t in [*layer.named_parameters(), *layer.named_buffers()]}
    edits = [lambda: layer.add_replica(3, 10), lambda: layer.move_expert(4, 11), lambda: layer.placement.clear(8)]
    with torch.no_grad():
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for edit in edits:
                edit()
                torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(compiled(x), reference_moe(layer, x), rtol=1e-5, atol=1e-5)
    assert {n: t.data_ptr() for n, t in [*layer.named_parameters(), *layer.named_buffers()]} == addresses
    torch._dynamo.reset()


def test_compiled_cuda_graphs_follow_placement_edits_without_recompiling_or_recapturing(monkeypatch):
    """torch.compile(mode="reduce-overhead") records the bf16 serving step into CUDA graphs (cudagraph
    trees) once; placement edits after that neither recompile nor record again, and the replays' outputs
    follow them as eager's do."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    recorded = []
    record = cudagraph_trees.CUDAGraphTreeManager.record_function

    def counting(self, *args, **kwargs):
        recorded.append(1)
        return record(self, *args, **kwargs)

    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function", counting)
    torch._dynamo.reset()
    counters.clear()
    _, layer = _layers(torch.bfloat16)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(24, H, dtype=torch.bfloat16, device="cuda")
    edits = [lambda: layer.add_replica(3, 10), lambda: layer.move_expert(4, 11), lambda: layer.placement.clear(8),
             lambda: layer.placement.clear(2, allow_uncovered=True)]
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay
            compiled(x)
        assert len(recorded) == 1 and counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
        with torch._dynamo.config.patch(error_on_recompile=True):
            for edit in edits:
                edit()
                got = compiled(x).clone()  # the next replay overwrites the graph's output
                torch.testing.assert_close(got, layer(x), rtol=1.6e-2, atol=1e-3)
    assert len(recorded) == 1 and counters["inductor"]["cudagraph_skips"] == 0
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the references; the grouped GEMMs
def test_opcheck_on_cuda(dtype):
    _, layer = _layers(dtype)
    p = layer.placement
    x = torch.randn(7, H, device="cuda", dtype=dtype)
    ids = torch.randint(0, E, (7, 2), device="cuda")
    slot_ids, order, offsets = ops.route_to_slots(ids, p.log2phy, p.logcnt, layer.config.num_slots)
    w13, w2 = layer.experts.w13.detach(), layer.experts.w2.detach()
    m = torch.ops.moe_resilient
    torch.library.opcheck(m.route_to_slots, (ids, p.log2phy, p.logcnt, layer.config.num_slots, False,
                                             layer.expert_load))
    torch.library.opcheck(m.route_tokens, (x, layer.gate.weight.detach(), 2, True, p.log2phy, p.logcnt,
                                           layer.config.num_slots))
    trainable = [t.clone().requires_grad_() for t in (x[order // 2], w13, w2)]
    torch.library.opcheck(m.grouped_swiglu, (trainable[0], offsets, *trainable[1:]))
    torch.library.opcheck(m.grouped_swiglu_combine, (x, order, offsets, slot_ids, torch.rand(7, 2, device="cuda"),
                                                     w13, w2))
    torch.library.opcheck(m.moe_forward, (x, layer.gate.weight.detach(), 2, True, p.log2phy, p.logcnt,
                                          layer.config.num_slots, False, w13, w2, 1.5, layer.expert_load))
    with pytest.raises(RuntimeError, match="expert id 9 out of range"):
        ops.route_to_slots(torch.tensor([[9]], device="cuda"), p.log2phy, p.logcnt, layer.config.num_slots)


def test_swapped_hf_model_on_cuda():
    transformers = pytest.importorskip("transformers")
    from moe_resilient.hf import swap_moe_blocks

    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)).cuda().eval()
    ids = torch.randint(3, 96, (2, 12), device="cuda")
    with torch.no_grad():
        want = model(ids).logits
        swapped = swap_moe_blocks(model, num_slots=10)
        assert swapped and all(model.get_submodule(n).experts.w13.is_cuda for n in swapped)
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_demo_on_cuda_with_cuda_graphs():
    from click.testing import CliRunner

    from moe_resilient.cli import main

    torch._dynamo.reset()
    result = CliRunner().invoke(main, ["demo", "--hidden", "64", "--intermediate", "96", "--tokens", "16", "--device",
                                       "cuda", "--dtype", "bfloat16", "--mode", "reduce-overhead"])
    torch._dynamo.reset()
    assert result.exit_code == 0, result.output
    diffs = [float(line.rsplit(" ", 1)[1]) for line in result.output.splitlines() if "vs healthy" in line]
    assert len(diffs) >= 2 and max(diffs) < 3e-2 and "recompiles: 0" in result.output, result.output


EP_WORKER = r"""
import os, sys, torch
from moe_resilient.drill_worker import DrillModel, make_batch
from moe_resilient.group import ElasticGroup
torch.backends.cuda.matmul.allow_tf32 = False
rank, W = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
model = DrillModel(W, 5, 0).eval().cuda()
for layer in model.moe:
    layer.shard(rank)
group = ElasticGroup.from_env(timeout=60.0).start()
with torch.no_grad():
    y = model.ep(make_batch(0, rank, 16).cuda(), group)
torch.save(y.cpu(), os.path.join(sys.argv[1], f"y{rank}.pt"))
group.finish()
os._exit(0)
"""


def test_two_ranks_sharing_the_gpu_serve_an_expert_parallel_forward(tmp_path):
    """Rows on the GPU ride gloo between the ranks (shared memory takes host rows only), and each
    rank's output equals the single-process model's."""
    from moe_resilient.drill_worker import DrillModel, make_batch
    from moe_resilient.launch import Launcher

    script = tmp_path / "worker.py"
    script.write_text(EP_WORKER)
    with Launcher(2, [sys.executable, str(script), str(tmp_path)], log_dir=str(tmp_path / "logs")) as launcher:
        assert launcher.wait(300) == {0: 0, 1: 0}, [open(tmp_path / "logs" / f"rank{r}.log").read() for r in (0, 1)]
    reference = DrillModel(2, 5, 0).eval()
    with torch.no_grad():
        for rank in (0, 1):
            got = torch.load(os.path.join(tmp_path, f"y{rank}.pt"))
            torch.testing.assert_close(got, reference(make_batch(0, rank, 16)), rtol=1e-4, atol=1e-4)
