"""What transparent huge pages for the slot weights buy a decode step: ResilientMoE as built (weights
advised for huge pages before their first write) against the same layer whose weights were copied into
plain, unadvised storage; called alternately, the recorded figure is the median of per-pair ratios.

    python -m pytest benchmarks/test_huge_pages.py --benchmark-json=benchmarks/results/huge_pages.json
"""

import statistics

import pytest
import torch
from torch import nn

from moe_resilient import MoEConfig, ResilientMoE

H, I, E, K = 1024, 2048, 8, 2


@pytest.mark.parametrize("tokens", [1, 8])
def test_huge_pages(benchmark, paired, tokens):
    torch.manual_seed(0)
    huge = ResilientMoE(MoEConfig(H, I, E, K)).eval()
    plain = ResilientMoE(MoEConfig(H, I, E, K)).eval()
    plain.load_state_dict(huge.state_dict())
    for name in ("w13", "w2"):  # fresh storage that nobody advised, same values
        w = getattr(huge.experts, name)
        setattr(plain.experts, name, nn.Parameter(torch.empty(w.shape).copy_(w)))
    x = torch.randn(tokens, H)
    with torch.no_grad():
        torch.testing.assert_close(huge(x), plain(x), rtol=0, atol=0)
        ratios = paired(huge, plain, x, 120)
        benchmark.pedantic(huge, args=(x,), rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(tokens=tokens, median_ratio_huge_over_plain=statistics.median(ratios), pairs=120)
