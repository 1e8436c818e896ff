"""Forward latency of one MoE block (hidden 1024, intermediate 2048, 8 experts, top-2) at decode and
prefill batch sizes: ResilientMoE eager / compiled, its fixed-placement build (no indirection), and the
Hugging Face Mixtral block with its eager and grouped_mm expert implementations. Each result carries
the roofline of its size on this machine, probed right before and after its rounds (the bound), and
the same roofline from probes run inside every round (the machine as the layers met it; see conftest).

    python -m pytest benchmarks/test_forward.py --benchmark-json=benchmarks/results/forward.json
    python benchmarks/report.py benchmarks/results/forward.json
"""

import dataclasses
import statistics
import time

import pytest
import torch
import transformers

from moe_resilient.hf import from_hf_block

H, I, E, K = 1024, 2048, 8, 2
SIZES = [1, 8, 64, 512, 2048]
ROUNDS = {1: 60, 8: 30, 64: 20, 512: 12, 2048: 9}  # 2048: with 5, medians of two near-equal layers swung 0.96-1.06x


def _hf_block(impl: str, dtype):
    cfg = transformers.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    cfg._experts_implementation = impl
    torch.manual_seed(0)
    block = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return block.to(dtype).eval()


_built = {}


def _module(impl: str, dtype):
    key = (impl, dtype)
    if key not in _built:
        if impl.startswith("hf_"):
            _built[key] = _hf_block(impl[3:], dtype)
        else:
            layer = from_hf_block(_hf_block("eager", dtype))
            if impl == "fixed_placement":
                static = type(layer)(dataclasses.replace(layer.config, static_placement=True), dtype=dtype)
                static.load_state_dict(layer.state_dict())
                layer = static
            _built[key] = layer.eval()
    return _built[key]


def _roofline(machine, tokens, x, dtype):
    """max(bytes of the expert weights this batch touches / read bandwidth, FLOPs / GEMM FLOP/s): with
    the machine's best rates (the bound), and with the medians of the probes run inside the rounds."""
    gate = _module("hf_eager", torch.float32).gate
    with torch.no_grad():
        _, _, ids = gate(x.float().reshape(-1, H))
    touched = int(torch.unique(ids).numel())
    item = torch.finfo(dtype).bits // 8
    weight_bytes = (touched * 3 * H * I + E * H) * item
    flops = 2 * tokens * K * 3 * H * I + 2 * tokens * H * E
    best = max(weight_bytes / machine.read_bytes_per_s, flops / machine.gemm_flops_per_s)
    median = max(weight_bytes / machine.read_bytes_per_s_median, flops / machine.gemm_flops_per_s_median)
    return best, median, touched


IMPLS = {torch.float32: ["resilient_eager", "resilient_compiled", "fixed_placement", "hf_eager", "hf_grouped_mm"],
         torch.bfloat16: ["resilient_eager", "hf_eager"]}
CASES = [(n, d) for d in IMPLS for n in SIZES]


@pytest.mark.parametrize("tokens, dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_forward(benchmark, machine, tokens, dtype):
    """Every implementation of one size, interleaved: each round calls each once, in rotating order, so
    the machine's drifting noise hits all alike (run one after another, two builds of the same kernel
    came out 1.4x apart). The benchmark's own timing is of a whole round; the figures that matter are
    the per-implementation medians in extra_info."""
    torch.manual_seed(tokens)
    x = torch.randn(1, tokens, H, dtype=dtype)
    fns = {}
    for impl in IMPLS[dtype]:
        module = _module(impl.replace("_compiled", "_eager"), dtype)
        fns[impl] = torch.compile(module, fullgraph=True, dynamic=False) if impl.endswith("compiled") else module
    times = {impl: [] for impl in fns}
    order = list(fns)

    def one_round():
        nonlocal order
        for impl in order:
            t0 = time.perf_counter()
            fns[impl](x)
            times[impl].append(time.perf_counter() - t0)
        order = order[1:] + order[:1]
        machine.probe_in_round(dtype)

    with torch.no_grad():
        for impl in times:
            fns[impl](x)  # warm up (and compile)
        machine.reset()
        machine.probe(3, dtype)  # the roofline's probes bracket the rounds: the bound of this very window
        benchmark.pedantic(one_round, rounds=ROUNDS[tokens], warmup_rounds=1)
        machine.probe(3, dtype)
    roofline, roofline_in_rounds, touched = _roofline(machine, tokens, x, dtype)
    benchmark.extra_info.update(
        tokens=tokens, dtype=str(dtype)[6:], roofline_s=roofline, experts_touched=touched,
        median_s={impl: statistics.median(t[1:]) for impl, t in times.items()},  # [0]: the warm-up round
        read_GBps=machine.read_bytes_per_s / 1e9, gemm_GFLOPps=machine.gemm_flops_per_s / 1e9,
        roofline_in_rounds_s=roofline_in_rounds, read_GBps_in_rounds=machine.read_bytes_per_s_median / 1e9,
        gemm_GFLOPps_in_rounds=machine.gemm_flops_per_s_median / 1e9,
    )
