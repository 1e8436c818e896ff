"""Forward latency of one MoE block (hidden 1024, intermediate 2048, 8 experts, top-2) at decode and
prefill batch sizes: ResilientMoE eager / compiled, its fixed-placement build (no indirection), and the
Hugging Face Mixtral block with its eager and grouped_mm expert implementations. Each result carries
the roofline of its size on this machine (see conftest.machine).

    python -m pytest benchmarks/test_forward.py --benchmark-json=benchmarks/results/forward.json
    python benchmarks/report.py benchmarks/results/forward.json
"""

import pytest
import torch
import transformers

from moe_resilient.hf import from_hf_block

H, I, E, K = 1024, 2048, 8, 2
SIZES = [1, 8, 64, 512, 2048]
ROUNDS = {1: 40, 8: 25, 64: 15, 512: 7, 2048: 5}


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
                static = type(layer)(layer.config.replace(static_placement=True), dtype=dtype)
                static.load_state_dict(layer.state_dict())
                layer = static
            _built[key] = layer.eval()
    return _built[key]


def _roofline(machine, tokens, x, dtype):
    """max(bytes of the expert weights this batch touches / read bandwidth, FLOPs / GEMM FLOP/s)."""
    gate = _module("hf_eager", torch.float32).gate
    with torch.no_grad():
        _, _, ids = gate(x.float().reshape(-1, H))
    touched = int(torch.unique(ids).numel())
    item = torch.finfo(dtype).bits // 8
    weight_bytes = (touched * 3 * H * I + E * H) * item
    flops = 2 * tokens * K * 3 * H * I + 2 * tokens * H * E
    return max(weight_bytes / machine["read_bytes_per_s"], flops / machine["gemm_flops_per_s"]), touched


CASES = [(impl, n, torch.float32) for n in SIZES for impl in
         ("resilient_eager", "resilient_compiled", "fixed_placement", "hf_eager", "hf_grouped_mm")]
CASES += [(impl, n, torch.bfloat16) for n in SIZES for impl in ("resilient_eager", "hf_eager")]


@pytest.mark.parametrize("impl, tokens, dtype", CASES, ids=[f"{i}-{n}-{str(d)[6:]}" for i, n, d in CASES])
def test_forward(benchmark, machine, impl, tokens, dtype):
    torch.manual_seed(tokens)
    x = torch.randn(1, tokens, H, dtype=dtype)
    module = _module(impl.replace("_compiled", "_eager"), dtype)
    fn = torch.compile(module, fullgraph=True, dynamic=False) if impl.endswith("compiled") else module
    with torch.no_grad():
        fn(x)  # warm up (and compile)
        benchmark.pedantic(fn, args=(x,), rounds=ROUNDS[tokens], warmup_rounds=1)
    roofline, touched = _roofline(machine, tokens, x, dtype)
    benchmark.extra_info.update(
        impl=impl, tokens=tokens, dtype=str(dtype)[6:], roofline_s=roofline, experts_touched=touched,
        read_GBps=machine["read_bytes_per_s"] / 1e9, gemm_GFLOPps=machine["gemm_flops_per_s"] / 1e9,
    )
