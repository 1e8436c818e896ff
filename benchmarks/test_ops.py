"""The C++ grouped SwiGLU against the same computation as a plain PyTorch loop over slots
(8 slots, hidden 1024, intermediate 2048, fp32), at a few rows per slot.

    python -m pytest benchmarks/test_ops.py --benchmark-json=benchmarks/results/ops.json
"""

import pytest
import torch

from moe_resilient import ops

H, I, S = 1024, 2048, 8
_weights = {}


def _args(rows):
    if not _weights:
        torch.manual_seed(0)
        _weights["w13"], _weights["w2"] = torch.randn(S, 2 * I, H) / H**0.5, torch.randn(S, H, I) / I**0.5
    offsets = torch.arange(S + 1) * rows
    return torch.randn(S * rows, H), offsets, _weights["w13"], _weights["w2"]


@pytest.mark.parametrize("rows", [1, 2, 8, 16, 64])
@pytest.mark.parametrize("impl", ["cpp", "torch_loop"])
def test_grouped_swiglu(benchmark, impl, rows):
    args = _args(rows)
    fn = ops.grouped_swiglu if impl == "cpp" else ops.grouped_swiglu_reference
    with torch.no_grad():
        benchmark.pedantic(fn, args=args, rounds=15, warmup_rounds=1)
    benchmark.extra_info.update(impl=impl, rows_per_slot=rows)
