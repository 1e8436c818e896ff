"""An open-loop load generator for a ServingCluster, the metrics users feel, and the serving drill.

Requests arrive at Poisson times (seeded), whether or not earlier ones have finished, bounded in count
and in time; prompts are seeded random token ids. Per run it reports TTFT, inter-token latency (ITL)
p50/p99 before the failure and in the second after it, the stall (the longest gap between two tokens
of any request in flight when the failure lands), tokens recomputed per taken-over request, and
throughput over time in 0.1 s bins; against a failure-free run of the same load, the time until the
throughput is back to 95% of that run's.

``serving_drill`` runs the same load on fresh clusters: failure-free, then with a rank failed under
each recovery named (checkpoint restore, recompute-style restore, full restart).
"""

from __future__ import annotations

import signal
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from moe_resilient.serving.cluster import ServingCluster

BIN_S = 0.1


@dataclass(frozen=True)
class Load:
    """``requests`` arrivals at ``rate`` per second; prompt lengths uniform in ``prompt_tokens``, each
    asking for ``new_tokens``; no arrival after ``max_seconds``."""

    requests: int = 24
    rate: float = 6.0
    prompt_tokens: tuple[int, int] = (256, 768)
    new_tokens: int = 64
    vocab: int = 512
    seed: int = 0
    max_seconds: float = 30.0

    def arrivals(self) -> list[tuple[float, list[int]]]:
        """(offset in seconds, prompt) of every request."""
        g = torch.Generator().manual_seed(self.seed)
        t, out = 0.0, []
        for _ in range(self.requests):
            t += float(torch.empty(1).exponential_(self.rate, generator=g))
            if t > self.max_seconds:
                break
            n = int(torch.randint(self.prompt_tokens[0], self.prompt_tokens[1] + 1, (1,), generator=g))
            out.append((t, torch.randint(3, self.vocab, (n,), generator=g).tolist()))
        return out


def run_load(cluster: ServingCluster, load: Load, *, fail_rank: int | None = None, fail_after: float = 0.0,
             hang: bool = False, timeout: float = 120.0) -> dict:
    """Submit ``load``; SIGKILL (``hang``: SIGSTOP) ``fail_rank`` mid-stream: at the first moment from
    ``fail_after`` seconds in when a request it runs (an expert worker: any request) is decoding (two
    tokens streamed, not finished). Waits for
    every stream to finish; returns the raw record (``measure`` turns it into metrics)."""
    arrivals = load.arrivals()
    streams, start = [], time.time()
    fail, submitted = {}, threading.Event()

    def mid_stream() -> bool:  # an expert worker runs every request's experts
        mine = [s for n, s in enumerate(streams) if fail_rank not in cluster.attention or cluster.home(n) == fail_rank]
        return any(len(s.tokens) >= 2 and not s.finished for s in mine)

    def failer():
        time.sleep(max(0.0, start + fail_after - time.time()))
        while not mid_stream():
            if submitted.is_set() and all(s.finished for s in streams):
                return  # the load ended first: no failure
            time.sleep(0.0005)
        fail["t"] = cluster.kill(fail_rank, signal.SIGSTOP if hang else signal.SIGKILL)

    failing = threading.Thread(target=failer, daemon=True)
    if fail_rank is not None:
        failing.start()
    for offset, prompt in arrivals:
        time.sleep(max(0.0, start + offset - time.time()))
        streams.append(cluster.submit(prompt, load.new_tokens))
    submitted.set()
    for s in streams:
        s.wait(timeout)
    if fail_rank is not None:
        failing.join()
    return {"start": start, "fail_time": fail.get("t"),
            "requests": [{"submitted": s.submitted, "tokens": s.tokens, "times": s.times} for s in streams],
            "adoptions": list(cluster.adoptions), "mismatches": list(cluster.mismatches),
            "restarts": list(cluster.restarts)}


def throughput(record: dict, end: float) -> np.ndarray:
    """Tokens per second in BIN_S bins from the run's start to ``end`` seconds."""
    times = np.concatenate([np.array(r["times"]) for r in record["requests"]]) - record["start"]
    counts, _ = np.histogram(times, bins=np.arange(0.0, end + BIN_S, BIN_S))
    return counts / BIN_S


def measure(record: dict, baseline: dict | None = None, window_s: float = 1.0) -> dict:
    """Metrics of a run (``run_load``); ``baseline``: the failure-free run of the same load."""
    t_fail = record["fail_time"]
    itl_before, itl_window, stall = [], [], 0.0
    for r in record["requests"]:
        t = np.array(r["times"])
        gaps = np.diff(t)
        ends = t[1:]
        if t_fail is None:
            itl_before += gaps.tolist()
            continue
        itl_before += gaps[ends < t_fail].tolist()
        itl_window += gaps[(ends >= t_fail) & (t[:-1] < t_fail + window_s)].tolist()
        spans = (t[:-1] <= t_fail) & (ends >= t_fail)  # the gap that holds the failure
        if spans.any():  # a request still prefilling has no gap yet: the failure shows in its TTFT
            stall = max(stall, float(gaps[spans].max()))
    p = lambda xs, q: float(np.percentile(xs, q)) if len(xs) else None  # noqa: E731
    ttft = [r["times"][0] - r["submitted"] for r in record["requests"] if r["times"]]
    end = max(max(r["times"]) for r in record["requests"] if r["times"]) - record["start"]
    rate = throughput(record, end)
    result = {
        "requests": len(record["requests"]), "tokens": sum(len(r["tokens"]) for r in record["requests"]),
        "ttft_p50_s": p(ttft, 50), "ttft_p99_s": p(ttft, 99),
        "itl_p50_s": p(itl_before, 50), "itl_p99_s": p(itl_before, 99),
        "itl_window_p50_s": p(itl_window, 50), "itl_window_p99_s": p(itl_window, 99),
        "stall_s": stall if t_fail is not None else None,
        "recomputed_per_request": [a["recomputed"] for a in record["adoptions"]],
        "refused_checkpoints": [a["refused"] for a in record["adoptions"] if a["refused"]],
        "mismatches": record["mismatches"], "restarts": record["restarts"],
        "fail_time_s": None if t_fail is None else t_fail - record["start"], "duration_s": end,
        "throughput_tok_s": rate.tolist(),
    }
    result["time_to_95pct_s"] = None
    if t_fail is not None and baseline is not None:
        k = 5  # 0.5 s rolling sums
        ours = np.convolve(rate, np.ones(k), "valid")
        theirs = np.convolve(throughput(baseline, end), np.ones(k), "valid")
        first = int((t_fail - record["start"]) / BIN_S)
        for i in range(first, len(ours)):  # the first 0.5 s window from the failure's bin on with 95%
            if ours[i] >= 0.95 * theirs[i]:
                result["time_to_95pct_s"] = (i - first) * BIN_S
                break
    return result


def serving_drill(nproc: int = 4, load: Load = Load(), *, fail_rank: int = 2, fail_after: float = 2.0,
                  hang: bool = False, recoveries=("checkpoint", "recompute", "restart"), block_tokens: int = 16,
                  model: str = "tiny-qwen3-moe", expert_ranks: int = 0, work_dir: str | None = None,
                  echo=None) -> dict:
    """The same load on fresh clusters: failure-free, then once per recovery in ``recoveries``.
    Returns {"load", "free", recovery: metrics}; every run's tokens are checked against the failure-free
    run's (``tokens_equal``)."""
    work_dir = work_dir or tempfile.mkdtemp(prefix="serving_drill_")
    runs = {"free": ("checkpoint", "repair", None)}
    for name in recoveries:
        runs[name] = {"checkpoint": ("checkpoint", "repair", fail_rank),
                      "recompute": ("recompute", "repair", fail_rank),
                      "restart": ("recompute", "restart", fail_rank)}[name]
    records, out = {}, {"load": load.__dict__, "nproc": nproc, "fail_rank": fail_rank, "hang": hang,
                        "block_tokens": block_tokens, "expert_ranks": expert_ranks}
    for name, (restore, recovery, victim) in runs.items():
        if echo:
            echo(f"run: {name}")
        with ServingCluster(model, nproc, work_dir, block_tokens=block_tokens, restore=restore,
                            recovery=recovery, expert_ranks=expert_ranks) as cluster:
            records[name] = run_load(cluster, load, fail_rank=victim, fail_after=fail_after, hang=hang)
        out[name] = measure(records[name], records.get("free"))
        out[name]["tokens_equal"] = [r["tokens"] for r in records[name]["requests"]] == \
                                    [r["tokens"] for r in records["free"]["requests"]]
    return out


def plot(result: dict, path: str) -> None:
    """Throughput over time of every run, the failure marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for name in ("free", "checkpoint", "recompute", "restart"):
        if name in result:
            rate = np.convolve(result[name]["throughput_tok_s"], np.ones(3) / 3, "same")
            stall = result[name]["stall_s"]
            label = name if stall is None else f"{name}: stall {stall * 1e3:.0f} ms"
            ax.plot(np.arange(len(rate)) * BIN_S, rate, label=label)
    t_fail = next((result[n]["fail_time_s"] for n in ("checkpoint", "recompute", "restart") if n in result), None)
    if t_fail is not None:
        ax.axvline(t_fail, color="tab:red", ls="--", label="rank " + ("hung" if result["hang"] else "killed"))
    ax.set_xlabel("time since the load started (s)")
    ax.set_ylabel("tokens / s, all requests")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
