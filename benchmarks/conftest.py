"""Shared measurement for the benchmarks.

``MachineProbes``: this machine's read bandwidth and dense GEMM FLOP/s, run right before and after the
layers they bound (the machine drifts; a bound measured minutes earlier does not hold for the layer
timed now), and once more at the end of each round of calls. Not between two calls of a round: the
256 MiB sweep would leave the next call colder than the others; the first call of a round (a different
implementation each round) starts after it, as every call starts after another implementation's weights
have swept the caches.
``paired_ratios``: two callables timed alternately, so machine noise hits both alike.
"""

import statistics
import time

import pytest
import torch


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def paired_ratios(a, b, x, pairs: int, setup=lambda: None) -> list[float]:
    """time(a(x)) / time(b(x)) for ``pairs`` pairs, the order inside a pair alternating too;
    ``setup()`` runs untimed before each call of ``a``."""
    ratios = []
    for i in range(pairs):
        if i % 2:
            setup()
            ta, tb = _seconds(lambda: a(x)), _seconds(lambda: b(x))
        else:
            tb = _seconds(lambda: b(x))
            setup()
            ta = _seconds(lambda: a(x))
        ratios.append(ta / tb)
    return ratios


class MachineProbes:
    """``probe()`` sums 256 MiB (far beyond cache, like expert weights) and runs a dense GEMM of the
    shape of a big expert GEMM in the layer's dtype (a CPU with bf16 arithmetic multiplies bf16 about
    twice as fast as fp32), recording each time; the rates are the best seen since ``reset()`` (a
    roofline is a bound, so it takes the machine at its best, not its noisy median).

    ``probe_in_round()`` runs the same two probes once more, between a round's calls; ``*_median``
    are the medians of those since ``reset()``: the machine as the layers met it. Not the bound, a
    second reading of it that separates how the VM drifted from how the layer fell short."""

    def __init__(self):
        self.buf = torch.randn(64 * 1024 * 1024)
        self.a, self.b = torch.randn(2048, 1024), torch.randn(4096, 1024)
        self.reset()

    def _time_both(self, dtype, read_s: list, gemm_s: list) -> None:
        a, b = self.a.to(dtype), self.b.to(dtype)
        read_s.append(_seconds(self.buf.sum))
        gemm_s.append(_seconds(lambda: a @ b.t()))

    def probe(self, times: int, dtype=torch.float32) -> None:
        for _ in range(times):
            self._time_both(dtype, self.read_s, self.gemm_s)

    def probe_in_round(self, dtype=torch.float32) -> None:
        self._time_both(dtype, self.round_read_s, self.round_gemm_s)

    def _read_rate(self, seconds: float) -> float:
        return self.buf.numel() * 4 / seconds

    def _gemm_rate(self, seconds: float) -> float:
        return 2 * self.a.shape[0] * self.a.shape[1] * self.b.shape[0] / seconds

    def reset(self):
        self.read_s, self.gemm_s = [], []
        self.round_read_s, self.round_gemm_s = [], []

    @property
    def read_bytes_per_s(self) -> float:
        return self._read_rate(min(self.read_s))

    @property
    def gemm_flops_per_s(self) -> float:
        return self._gemm_rate(min(self.gemm_s))

    @property
    def read_bytes_per_s_median(self) -> float:
        return self._read_rate(statistics.median(self.round_read_s))

    @property
    def gemm_flops_per_s_median(self) -> float:
        return self._gemm_rate(statistics.median(self.round_gemm_s))


@pytest.fixture(scope="session")
def machine():
    return MachineProbes()


@pytest.fixture(scope="session")
def paired():
    return paired_ratios
