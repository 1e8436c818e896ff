"""Shared probes for the benchmarks: this machine's read bandwidth and dense GEMM FLOP/s, run right
before and after the layers they bound (the machine drifts; a bound measured minutes earlier does not
hold for the layer timed now; run between the layer's calls, a 256 MiB sweep would slow those calls)."""

import pytest
import torch


class MachineProbes:
    """``read()`` sums 256 MiB (far beyond cache, like expert weights); ``gemm()`` runs a dense GEMM of
    the shape of a big expert GEMM. Each call records its time; the rates are the best seen (a roofline
    is a bound, so it takes the machine at its best, not its noisy median)."""

    def __init__(self):
        self.buf = torch.randn(64 * 1024 * 1024)
        self.a, self.b = torch.randn(2048, 1024), torch.randn(4096, 1024)
        self.read_s, self.gemm_s = [], []

    def read(self):
        import time

        t0 = time.perf_counter()
        self.buf.sum()
        self.read_s.append(time.perf_counter() - t0)

    def gemm(self):
        import time

        t0 = time.perf_counter()
        self.a @ self.b.t()
        self.gemm_s.append(time.perf_counter() - t0)

    def probe(self, times: int) -> None:
        for _ in range(times):
            self.read()
            self.gemm()

    def reset(self):
        self.read_s, self.gemm_s = [], []

    @property
    def read_bytes_per_s(self) -> float:
        return self.buf.numel() * 4 / min(self.read_s)

    @property
    def gemm_flops_per_s(self) -> float:
        return 2 * self.a.shape[0] * self.a.shape[1] * self.b.shape[0] / min(self.gemm_s)


@pytest.fixture(scope="session")
def machine():
    return MachineProbes()
