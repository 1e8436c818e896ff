"""Markdown tables for RESULTS.md from pytest-benchmark JSON files.

    python benchmarks/report.py benchmarks/results/forward.json [benchmarks/results/indirection.json]
"""

import json
import sys
from collections import defaultdict

IMPLS = ["resilient_eager", "resilient_compiled", "fixed_placement", "hf_eager", "hf_grouped_mm"]


def main(path: str) -> None:
    runs = json.load(open(path))["benchmarks"]
    median = defaultdict(dict)  # (dtype) -> {(impl, tokens): seconds}
    roof = {}
    info = runs[0]["extra_info"]
    for r in runs:
        e = r["extra_info"]
        median[e["dtype"]][(e["impl"], e["tokens"])] = r["stats"]["median"]
        roof[(e["dtype"], e["tokens"])] = e["roofline_s"]
    print(f"Machine (same run): read bandwidth {info['read_GBps']:.1f} GB/s, "
          f"dense GEMM {info['gemm_GFLOPps']:.1f} GFLOP/s.\n")
    for dtype, table in median.items():
        sizes = sorted({t for _, t in table})
        impls = [i for i in IMPLS if any((i, t) in table for t in sizes)]
        print(f"**{dtype}**, median ms (ratio to roofline):\n")
        print("| tokens | roofline ms | " + " | ".join(impls) + " | ours / best HF |")
        print("|---" * (len(impls) + 3) + "|")
        for t in sizes:
            r = roof[(dtype, t)]
            cells = [f"{table[(i, t)] * 1e3:.2f} ({table[(i, t)] / r:.2f}x)" if (i, t) in table else "-" for i in impls]
            ours = table[("resilient_eager", t)]
            if ("resilient_compiled", t) in table:
                ours = min(ours, table[("resilient_compiled", t)])
            hf = min(table[(i, t)] for i in ("hf_eager", "hf_grouped_mm") if (i, t) in table)
            print(f"| {t} | {r * 1e3:.2f} | " + " | ".join(cells) + f" | {ours / hf:.2f}x |")
        print()


def indirection(path: str) -> None:
    print("Indirection cost, paired and alternating, same weights (median of per-pair ratios):\n")
    print("| tokens | pairs | indirect / fixed |\n|---|---|---|")
    for r in json.load(open(path))["benchmarks"]:
        e = r["extra_info"]
        print(f"| {e['tokens']} | {e['pairs']} | {e['median_ratio_indirect_over_fixed']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1])
    if len(sys.argv) > 2:
        indirection(sys.argv[2])
