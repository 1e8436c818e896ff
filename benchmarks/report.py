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
    machine = {(r["extra_info"]["dtype"], r["extra_info"]["tokens"]): r["extra_info"] for r in runs}
    for r in runs:
        e = r["extra_info"]
        for impl, seconds in e["median_s"].items():
            median[e["dtype"]][(impl, e["tokens"])] = seconds
        roof[(e["dtype"], e["tokens"])] = e["roofline_s"]
    read = [e["read_GBps"] for e in machine.values()]
    gemm = [e["gemm_GFLOPps"] for e in machine.values()]
    print(f"Machine, probed right before and after the rounds of each size: read bandwidth {min(read):.1f}-{max(read):.1f} GB/s, "
          f"dense GEMM {min(gemm):.1f}-{max(gemm):.1f} GFLOP/s (best per size). \"In the rounds\": the medians of the "
          "same probes run at the end of every round, and ours against the roofline they give.\n")
    for dtype, table in median.items():
        sizes = sorted({t for _, t in table})
        impls = [i for i in IMPLS if any((i, t) in table for t in sizes)]
        print(f"**{dtype}**, median ms (ratio to roofline):\n")
        print("| tokens | read GB/s, GEMM GFLOP/s | roofline ms | " + " | ".join(impls) + " | ours / best HF"
              + " | in the rounds: GB/s, GFLOP/s, ours / roofline |")
        print("|---" * (len(impls) + 5) + "|")
        for t in sizes:
            r = roof[(dtype, t)]
            cells = [f"{table[(i, t)] * 1e3:.2f} ({table[(i, t)] / r:.2f}x)" if (i, t) in table else "-" for i in impls]
            ours = table[("resilient_eager", t)]
            if ("resilient_compiled", t) in table:
                ours = min(ours, table[("resilient_compiled", t)])
            hf = min(table[(i, t)] for i in ("hf_eager", "hf_grouped_mm") if (i, t) in table)
            m = machine[(dtype, t)]
            in_rounds = "-"  # JSONs from before the in-round probes
            if "roofline_in_rounds_s" in m:
                in_rounds = (f"{m['read_GBps_in_rounds']:.1f}, {m['gemm_GFLOPps_in_rounds']:.0f}, "
                             f"{ours / m['roofline_in_rounds_s']:.2f}x")
            print(f"| {t} | {m['read_GBps']:.1f}, {m['gemm_GFLOPps']:.0f} | {r * 1e3:.2f} | " + " | ".join(cells)
                  + f" | {ours / hf:.2f}x | {in_rounds} |")
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
