"""Shared measurements for the benchmarks: this machine's read bandwidth and dense GEMM FLOP/s,
measured in the same run as the layers they bound."""

import time

import pytest
import torch


def timings(fn, repeats: int) -> list[float]:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


@pytest.fixture(scope="session")
def machine():
    """{'read_bytes_per_s', 'gemm_flops_per_s'}: the best this machine sustains (fastest of 9 runs:
    a roofline is a bound, so it takes the machine at its best, not its noisy median)."""
    buf = torch.randn(64 * 1024 * 1024)  # 256 MiB: far beyond cache, like expert weights
    read = buf.numel() * 4 / min(timings(buf.sum, 9))
    a, b = torch.randn(2048, 1024), torch.randn(4096, 1024)  # the shape of a big expert GEMM
    gemm = 2 * 2048 * 1024 * 4096 / min(timings(lambda: a @ b.t(), 9))
    return {"read_bytes_per_s": read, "gemm_flops_per_s": gemm}
