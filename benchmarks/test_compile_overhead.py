"""Per-call overhead of a compiled layer at decode (1 token, the block of test_forward.py): eager, the
default torch.compile, and the README's lean recipe (no guards on module attributes, no size asserts),
interleaved call by call. The figures that matter are the medians in extra_info.

    python -m pytest benchmarks/test_compile_overhead.py --benchmark-json=benchmarks/results/compile_overhead.json
"""

import statistics
import time

import pytest
import torch

from moe_resilient.hf import from_hf_block
from test_forward import H, _hf_block

LEAN = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "size_asserts": False}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_compile_overhead(benchmark, dtype):
    layer = from_hf_block(_hf_block("eager", dtype)).eval()
    fns = {"eager": layer, "compiled": torch.compile(layer, fullgraph=True, dynamic=False),
           "compiled_lean": torch.compile(layer, fullgraph=True, dynamic=False, options=LEAN)}
    x = torch.randn(1, 1, H, dtype=dtype)
    times = {k: [] for k in fns}

    def one_round():
        for k, f in fns.items():
            t0 = time.perf_counter()
            f(x)
            times[k].append(time.perf_counter() - t0)

    with torch.no_grad():
        for f in fns.values():
            f(x)
        benchmark.pedantic(one_round, rounds=300, warmup_rounds=5)
    medians = {k: statistics.median(t[5:]) for k, t in times.items()}
    benchmark.extra_info.update(dtype=str(dtype)[6:], median_s=medians,
                                over_eager_s={k: medians[k] - medians["eager"] for k in fns})
    print(f"\n{dtype}: " + "  ".join(f"{k} {v * 1e3:.3f} ms" for k, v in medians.items()))
