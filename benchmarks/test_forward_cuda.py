"""Forward latency of one MoE block on a CUDA device (skipped without one), where the ops run
cuda_kernels.py (bf16: torch._grouped_mm, nothing read back to the host). The block of test_forward.py
(hidden 1024, intermediate 2048, 8 experts, top-2), bf16: ours eager and replayed from a CUDA graph,
against the Hugging Face Mixtral block's eager and grouped_mm experts, all interleaved round by round;
each call timed between device synchronisations.

    python -m pytest benchmarks/test_forward_cuda.py --benchmark-json=benchmarks/results/forward_cuda.json
"""

import statistics
import time

import pytest
import torch

from moe_resilient.hf import from_hf_block
from test_forward import H, _hf_block

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

IMPLS = ["resilient_eager", "resilient_graph", "hf_eager", "hf_grouped_mm"]


def _captured(module, x):
    """module(x) captured in a CUDA graph (after a warm-up on a side stream) -> a call that replays it."""
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            module(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            module(x)
    return lambda _: graph.replay()


@pytest.mark.parametrize("tokens", [1, 8, 64, 512, 2048])
def test_forward_cuda(benchmark, tokens):
    dtype = torch.bfloat16
    ours = from_hf_block(_hf_block("eager", dtype)).eval().cuda()
    torch.manual_seed(tokens)
    x = torch.randn(1, tokens, H, dtype=dtype, device="cuda")
    fns = {"resilient_eager": ours, "resilient_graph": _captured(ours, x),
           "hf_eager": _hf_block("eager", dtype).cuda(), "hf_grouped_mm": _hf_block("grouped_mm", dtype).cuda()}
    times = {impl: [] for impl in IMPLS}
    order = list(IMPLS)

    def one_round():
        nonlocal order
        for impl in order:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fns[impl](x)
            torch.cuda.synchronize()
            times[impl].append(time.perf_counter() - t0)
        order = order[1:] + order[:1]

    with torch.no_grad():
        for fn in fns.values():
            fn(x)
        benchmark.pedantic(one_round, rounds=100, warmup_rounds=2)
    medians = {impl: statistics.median(t[2:]) for impl, t in times.items()}
    benchmark.extra_info.update(tokens=tokens, dtype="bfloat16", device=torch.cuda.get_device_name(),
                                median_s=medians)
    print(f"\n{tokens} tokens: " + "  ".join(f"{k} {v * 1e3:.3f} ms" for k, v in medians.items()))
