"""Failure drill (``moe-resilient drill``): N ranks of drill_worker.py serve the MoE half of a transformer
with expert parallelism, each holding only its own expert slots; ranks are SIGKILLed (or SIGSTOPped) mid-stream, one by one or a whole host at once;
survivors agree, recover in place and keep serving; optionally replacements rejoin. ``--baseline
restart`` measures what every other stack does instead. This module orchestrates, measures and plots.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np

from moe_resilient.drill_worker import DrillModel, make_batch
from moe_resilient.shadow import ShadowStore

__all__ = ["DrillModel", "make_batch", "plot", "read_records", "run_drill", "serving_metrics"]

# Compile in the rank itself: a pool of compile workers per rank only competes for the same cores.
WORKER_ENV = {"TORCHINDUCTOR_COMPILE_THREADS": "1"}


def read_records(path: str) -> list[dict]:
    """A worker's complete records so far; a line it is still writing (no newline yet) is left for later."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f.read().split("\n")[:-1]]


def _read(out_dir: str, nproc: int) -> dict[int, list[dict]]:
    return {r: read_records(os.path.join(out_dir, f"rank{r}.jsonl")) for r in range(nproc)}


def _worker_cmd(out_dir, shadow_dir, args: dict) -> list[str]:
    cmd = [sys.executable, "-m", "moe_resilient.drill_worker", "--out-dir", out_dir, "--shadow", shadow_dir]
    for k, v in args.items():
        if v is True:
            cmd.append(f"--{k}")
        elif v not in (None, False):
            cmd += [f"--{k}", str(v)]
    return cmd


def _wait(pred, timeout: float, what: str, echo=None, status=None) -> None:
    deadline, last = time.monotonic() + timeout, 0.0
    while time.monotonic() < deadline:
        if pred():
            return
        if echo and status and time.monotonic() - last > 0.5:
            echo(status())
            last = time.monotonic()
        time.sleep(0.01)
    raise TimeoutError(f"drill: timed out waiting for {what}")


def measure_restart(nproc: int, shadow_dir: str, work_dir: str, cache_dir: str, tokens: int, slots_per_rank: int,
                    compile: bool = True, echo=print, alone_of: int = 0, shape: dict | None = None) -> float:
    """Full-restart baseline: launch ``nproc`` ranks anew; each loads its weights from safetensors,
    compiles the serving path (``cache_dir`` is the compile cache: cold the first time, warm after),
    forms the group and serves one step. With ``alone_of`` W, one rank of the W-rank job restarts
    alone (no peers competing for the cores) and stops once it has served a step on its own.
    Seconds from launch until every rank served its step."""
    from moe_resilient.launch import Launcher

    out = os.path.join(work_dir, f"restart-{time.time_ns()}")
    os.makedirs(out)
    env = {**WORKER_ENV, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    cmd = _worker_cmd(out, shadow_dir, {"steps": 1, "tokens": tokens, "slots-per-rank": slots_per_rank,
                                        "restart": True, "compile": compile, "alone-of": alone_of or None,
                                        **(shape or {})})
    t0 = time.time()
    with Launcher(nproc, cmd, env=env, log_dir=os.path.join(out, "logs")) as launcher:
        _wait(lambda: all(any("batch_of" in x for x in recs) for recs in _read(out, nproc).values()), 600,
              "the restarted ranks", echo, lambda: f"  restart: {time.time() - t0:5.1f} s")
        launcher.wait(60)
    served = max(x["t1"] for recs in _read(out, nproc).values() for x in recs if "batch_of" in x)
    return served - t0


def _graphs_after_failure(recs: list[dict]) -> int:
    counts = [x["graphs"] for x in recs if x.get("event") in ("failure", "done")]
    return counts[-1] - counts[0] if counts else 0


def default_slots_per_rank(nproc: int, lost: int = 1, experts: int = 8) -> int:
    """Enough slots that the survivors of ``lost`` ranks can hold every expert, and at least 3."""
    return max(3, -(-experts // max(nproc - lost, 1)))


def plan_faults(nproc: int, steps: int, fail_ranks, fail_steps, fail_host: int | None = None,
                ranks_per_host: int | None = None) -> list[tuple[int, int]]:
    """(rank, step) of each fault, by step: ``fail_ranks`` each at its own step in ``fail_steps`` (or all at
    one), or with ``fail_host`` every rank of that host at ``fail_steps[0]``. ValueError naming the bad
    argument."""
    if nproc < 2:
        raise ValueError(f"--nproc {nproc}: a drill needs at least 2 ranks (one to fail, one to survive)")
    fail_steps = list(fail_steps)
    if fail_host is not None:
        per_host = ranks_per_host or 0
        if per_host < 1 or nproc % per_host:
            raise ValueError(f"--fail-host needs --ranks-per-host dividing --nproc {nproc}, got {ranks_per_host}")
        if not 0 <= fail_host < nproc // per_host:
            raise ValueError(f"--fail-host {fail_host}: hosts are 0..{nproc // per_host - 1}")
        fail_ranks = list(range(fail_host * per_host, (fail_host + 1) * per_host))
        fail_steps = fail_steps[:1]
    fail_ranks = list(fail_ranks)
    if len(fail_steps) == 1:
        fail_steps *= len(fail_ranks)
    if len(fail_steps) != len(fail_ranks):
        raise ValueError(f"--fail-step names {len(fail_steps)} steps for {len(fail_ranks)} ranks: give one, or one "
                         "per rank")
    for r in fail_ranks:
        if not 0 <= r < nproc:
            raise ValueError(f"--fail-rank {r}: ranks are 0..{nproc - 1}")
    if len(set(fail_ranks)) != len(fail_ranks):
        raise ValueError(f"--fail-rank {fail_ranks}: a rank can fail once")
    if len(fail_ranks) >= nproc:
        raise ValueError(f"--fail-rank {fail_ranks}: at least one of the {nproc} ranks must survive")
    for s in fail_steps:
        if not 0 <= s < steps:
            raise ValueError(f"--fail-step {s}: it must lie in [0, --steps {steps})")
    return sorted(zip(fail_ranks, fail_steps), key=lambda f: (f[1], f[0]))


def check_slots(nproc: int, lost: int, slots_per_rank: int, experts: int = 8) -> None:
    if slots_per_rank * (nproc - lost) < experts:
        raise ValueError(f"{slots_per_rank} slots per rank: {nproc - lost} survivors cannot hold {experts} experts")


def _rate(times: np.ndarray, tokens: np.ndarray, start: float, end: float) -> float:
    inside = (times > start) & (times <= end)
    return float(tokens[inside].sum()) / (end - start)


def serving_metrics(t1: np.ndarray, tokens: np.ndarray, t_fail: float, nproc: int, lost: int,
                    admitted_t: list[float], window: float = 0.5) -> dict:
    """The seed systems' figures from the served batches (``t1`` [N] ascending output times relative to
    the start, ``tokens`` [N]): stall (the longest gap between outputs of any rank after the failure),
    time from the failure until throughput over ``window`` is back to 95% of the pre-failure rate,
    throughput retained against capacity retained, and the pause in outputs around each admission of
    a replacement."""
    before_rate = _rate(t1, tokens, max(0.0, t_fail - 2.0), t_fail)  # the last 2 s (less at the start)
    after = t1[t1 > t_fail]
    outputs = np.concatenate([t1[t1 <= t_fail][-1:], after])
    stall = float(np.diff(outputs).max()) if outputs.size > 1 else None
    back = None
    for end in after:  # windows ending at each output after the failure
        if end - window >= t_fail and _rate(t1, tokens, end - window, end) >= 0.95 * before_rate:
            back = float(end - t_fail)
            break
    settle = t_fail + 1.0  # rate after the failure, once recovered (and before any replacement joins)
    stop = min([t for t in admitted_t if t > settle] + [float(t1[-1])])
    after_rate = _rate(t1, tokens, settle, stop) if stop - settle > window else None
    rejoin = []
    for t in admitted_t:
        prev, nxt = t1[t1 <= t], t1[t1 > t]
        if prev.size and nxt.size:
            rejoin.append(float(nxt[0] - prev[-1]))
    return {
        "stall_s": stall,
        "throughput_before_tok_s": before_rate,
        "throughput_after_tok_s": after_rate,
        "time_to_95pct_throughput_s": back,
        "throughput_retained": after_rate / before_rate if after_rate is not None else None,
        "capacity_retained": (nproc - lost) / nproc,
        "rejoin_pause_s": max(rejoin) if rejoin else None,
    }


def run_drill(nproc: int = 4, steps: int = 300, fail_ranks=(2,), fail_steps=(100,), hang: bool = False,
              replace: bool = False, baseline: bool = False, tokens: int = 32, slots_per_rank: int | None = None,
              step_sleep: float = 0.0, compile: bool = True, fail_host: int | None = None,
              ranks_per_host: int | None = None, work_dir: str | None = None, echo=print, layers: int = 4,
              hidden: int = 512, experts: int = 16) -> dict:
    """Serve, fail ranks (each of ``fail_ranks`` once its step count reaches its ``fail_steps``, or
    every rank of ``fail_host``), keep serving; returns the measurements (see README), timed from the
    first fault. ``compile``: the ranks serve through compiled graphs and the drill counts their
    recompiles. The model: ``layers`` MoE blocks of ``experts`` experts, hidden size ``hidden``, each
    rank holding only its own slots. Bad arguments raise ValueError before anything starts."""
    import tempfile

    from moe_resilient.launch import Launcher

    faults = plan_faults(nproc, steps, fail_ranks, fail_steps, fail_host, ranks_per_host)
    failed = sorted(r for r, _ in faults)
    slots_per_rank = slots_per_rank or default_slots_per_rank(nproc, len(failed), experts)
    check_slots(nproc, len(failed), slots_per_rank, experts)
    shape = {"layers": layers, "hidden": hidden, "experts": experts}
    work_dir = work_dir or tempfile.mkdtemp(prefix="moe-drill-")
    out, shadow_dir = os.path.join(work_dir, "elastic"), os.path.join(work_dir, "shadow")
    os.makedirs(out, exist_ok=True)
    ShadowStore.export(DrillModel(nproc, slots_per_rank, **shape), shadow_dir)
    restarts = {}
    if baseline:  # first, so that the elastic run can serve over the restart's whole span
        cache = os.path.join(work_dir, "inductor-cache")
        runs = [("restart_cold_s", nproc, 0, "every rank, cold compile cache"),
                ("restart_warm_s", nproc, 0, "every rank, warm compile cache"),
                ("restart_one_rank_s", 1, nproc, "one rank alone, warm compile cache")]
        for key, n, alone_of, what in runs:
            echo(f"baseline: full restart of {what}")
            restarts[key] = measure_restart(n, shadow_dir, work_dir, cache, tokens, slots_per_rank, compile, echo,
                                            alone_of, shape)
    stop_file = os.path.join(out, "stop_at")
    cmd = _worker_cmd(out, shadow_dir, {"steps": steps if not baseline else 1 << 40, "tokens": tokens,
                                        "slots-per-rank": slots_per_rank, "step-sleep": step_sleep,
                                        "until-full": replace, "after-full": 100 if replace else None,
                                        "compile": compile, "stop-file": stop_file if baseline else None,
                                        "ranks-per-host": ranks_per_host, **shape})

    def status():
        done = {r: sum("batch_of" in x for x in recs) for r, recs in _read(out, nproc).items()}
        return "  serving: " + "  ".join(f"rank{r} {n:3d}" + ("" if baseline else f"/{steps}") for r, n in done.items())

    survivors = [r for r in range(nproc) if r not in failed]
    kill_times = {}
    signal_name = "SIGSTOP" if hang else "SIGKILL"
    with Launcher(nproc, cmd, respawn=replace, env=WORKER_ENV, log_dir=os.path.join(out, "logs")) as launcher:
        for rank, step in faults:
            # the steps of its own batches: a makeup batch it serves for a lost rank is not a step of its own
            _wait(lambda: len({x["step"] for x in _read(out, nproc)[rank] if x.get("batch_of") == rank}) >= step,
                  300, f"rank {rank} to serve {step} steps", echo, status)
            kill_times[rank] = launcher.kill(rank, signal.SIGSTOP if hang else signal.SIGKILL)
            echo(f"{signal_name} rank {rank} once it had served {step}+ steps")
        t_fail = min(kill_times.values())

        def recovered():  # every survivor has agreed every failed rank away
            return all(set(failed) <= {r for x in _read(out, nproc)[s] if x.get("event") == "failure" for r in x["lost"]}
                       for s in survivors)

        _wait(recovered, 120, "survivors to recover", echo, status)
        if hang:  # the stale ranks wake up and must find themselves fenced
            for rank in failed:
                launcher.kill(rank, signal.SIGCONT)
        if baseline:  # serve past the moment the restart would have been back, then stop all alike
            span = t_fail + min(restarts["restart_warm_s"], restarts["restart_one_rank_s"]) + 1.5
            _wait(lambda: time.time() > span, 600, "the restart's span to pass", echo, status)
            served_steps = max(x["step"] for recs in _read(out, nproc).values() for x in recs if "batch_of" in x)
            with open(stop_file + ".tmp", "w") as f:
                f.write(str(max(served_steps + 40, steps)))
            os.replace(stop_file + ".tmp", stop_file)
        _wait(lambda: not launcher.running(), 600, "the ranks to finish", echo, status)
        codes = launcher.wait(60)
        reaped = [t for r, _, t in launcher.exits if r in failed]
    recs = _read(out, nproc)
    failures = [x for r in survivors for x in recs[r] if x.get("event") == "failure"]
    served = [x for rs in recs.values() for x in rs if "batch_of" in x]
    before = [x["t1"] for x in served if x["t1"] < t_fail]
    after = [x["t1"] for x in served if x["t0"] > t_fail]
    lost_at = {r: min(f["step"] for f in failures if r in f["lost"]) for r in failed}  # >= its fail step
    steps = max(x["step"] for x in served) + 1 if baseline else steps
    expected = {(s, b) for s in range(steps) for b in range(nproc) if b not in lost_at or s <= lost_at[b]}
    got = {(x["step"], x["batch_of"]) for x in served}
    t_start = min(x["t0"] for x in served)
    admitted = [x for r in range(nproc) for x in recs[r] if x.get("event") == "admitted"]
    rel = lambda t: t - t_start  # noqa: E731
    result = {
        "nproc": nproc, "steps": steps, "tokens_per_batch": tokens, "failed_ranks": failed, "model": shape,
        "slots_per_rank": slots_per_rank,
        "failure": f"hang ({signal_name})" if hang else f"crash ({signal_name})", "fail_time": rel(t_fail),
        "faults": [{"rank": r, "step": s, "time": rel(kill_times[r]), "lost_at_step": lost_at[r]} for r, s in faults],
        "failure_step": min(lost_at.values()),  # the step the survivors found the first rank gone
        "detection_latency_s": min(f["t_detect"] for f in failures) - t_fail,
        "death_notice_s": min(reaped) - t_fail if reaped and not hang else None,  # kill -> launcher reaped it
        "agreement_s": max(f["t_agreed"] - f["t_detect"] for f in failures),
        "recovery_s": max(f["t_recovered"] - f["t_agreed"] for f in failures),
        "pause_s": min(after) - max(before),
        # the first output after recovery, from the first survivor's detection (it includes the re-run
        # step's own compute), and a step's usual time before the failure, for scale
        "pause_after_detection_s": min(after) - min(f["t_detect"] for f in failures),
        # from the first detection until every survivor has agreed and repaired its placement: the
        # pause the failure adds before the group can compute again (no re-run work in it)
        "serving_again_after_detection_s": (max(f["t_recovered"] for f in failures)
                                            - min(f["t_detect"] for f in failures)),
        "step_s": float(np.median([x["t1"] - x["t0"] for x in served if x["t1"] < t_fail])),
        "lost_batches": sorted(expected - got),
        "rerun_batches": sorted((x["step"], x["batch_of"]) for x in served if x.get("makeup")),
        # served twice: a lost rank's last batch may have been delivered before it died
        "duplicate_batches": len(served) - len(got),
        "compiled": compile,
        # graphs built between a survivor's first failure and its exit: a recompile caused by recovery
        "recompiles": sum(_graphs_after_failure(recs[r]) for r in survivors),
        "recoveries": sorted({f["recovery"] for f in failures}),
        "exit_codes": codes,
        "admitted": [{**x, "t": rel(x["t"])} for x in admitted[:4]],
        # each survivor's phases, relative to the start: (rank, detected, agreed, recovered)
        "phases": [(r, rel(f["t_detect"]), rel(f["t_agreed"]), rel(f["t_recovered"]))
                   for r in survivors for f in recs[r] if f.get("event") == "failure"],
        # every served batch: (rank that served it, t0, t1, tokens), relative to the start
        "batches": sorted((x["served_by"], rel(x["t0"]), rel(x["t1"]), x["tokens"]) for x in served),
        "work_dir": work_dir,
    }
    by_time = np.array(sorted((t1, tokens) for _, _, t1, tokens in result["batches"]), dtype=float)
    result.update(serving_metrics(by_time[:, 0], by_time[:, 1], rel(t_fail), nproc, len(failed),
                                  sorted({rel(x["t"]) for x in admitted})))
    if baseline:
        result.update(restarts)
        # what a restart-based stack pays: see the failure, tear the old processes down, come back
        # (the cheaper of the two restarts); the elastic pause already contains its detection
        teardown = result["death_notice_s"] or 0.0
        result["restart_total_s"] = (result["detection_latency_s"] + teardown
                                     + min(result["restart_warm_s"], result["restart_one_rank_s"]))
        result["restart_over_pause"] = result["restart_total_s"] / result["pause_s"]
    return result


def plot(result: dict, path: str) -> None:
    """Two panels. Top: each rank's per-step latency as points around the failure, with the phases
    (detection, agreement, recovery) shaded. Bottom: throughput over the whole run in 0.1 s bins, and
    with a baseline, the measured full restart drawn to scale from the failure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = np.array(result["batches"], dtype=float)  # rank, t0, t1, tokens
    t_fail = result["fail_time"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7))
    lo, hi = t_fail - 0.4, t_fail + max(0.6, 3 * result["pause_s"])
    for r in sorted(set(b[:, 0].astype(int))):
        mine = b[(b[:, 0] == r) & (b[:, 2] >= lo) & (b[:, 2] <= hi)]
        top.plot(mine[:, 2], (mine[:, 2] - mine[:, 1]) * 1e3, "o", ms=4, label=f"rank {r}")
    detect = [p[1] for p in result["phases"]]
    agreed = [p[2] for p in result["phases"]]
    done = [p[3] for p in result["phases"]]
    if detect:
        top.axvspan(t_fail, min(detect), color="tab:red", alpha=0.15, label="failure -> detected")
        top.axvspan(min(detect), max(agreed), color="tab:orange", alpha=0.2, label="agreement")
        top.axvspan(max(agreed), max(done), color="tab:green", alpha=0.2, label="recovery")
    top.axvline(t_fail, color="tab:red", ls="--")
    top.set_xlim(lo, hi)
    top.set_ylim(bottom=0)
    top.set_xlabel("time since start (s)")
    top.set_ylabel("step latency (ms)")
    stall = result.get("stall_s")
    top.set_title(f"{result['failure']} of ranks {result['failed_ranks']} ({result['nproc']} ranks): detection "
                  f"{result['detection_latency_s'] * 1e3:.1f} ms, pause {result['pause_s'] * 1e3:.0f} ms"
                  + (f", longest gap between outputs {stall * 1e3:.0f} ms" if stall else ""))
    top.legend(loc="upper right", fontsize=8, ncol=2)

    bin_s = 0.1
    end = b[:, 2].max()
    span = max(end, t_fail + result.get("restart_total_s", 0.0) + 1.0)
    edges = np.arange(0.0, end - bin_s + 1e-9, bin_s)  # whole bins only: no half-empty last bin
    rate, _ = np.histogram(b[:, 2], bins=np.append(edges, edges[-1] + bin_s), weights=b[:, 3])
    bottom.step(edges, rate / bin_s, where="post", color="tab:blue", label="moe_resilient (elastic)")
    if "restart_total_s" in result:
        steady = result["throughput_before_tok_s"]
        back = t_fail + result["restart_total_s"]
        bottom.plot([0, t_fail, t_fail, back, back, span], [steady, steady, 0, 0, steady, steady], color="tab:gray",
                    label=f"full restart: {result['restart_total_s']:.1f} s (detection + teardown + the cheaper "
                          f"restart, measured)")
    if result.get("admitted"):
        t_admit = min(x["t"] for x in result["admitted"])
        bottom.axvline(t_admit, color="tab:green", ls=":", label=f"replacement admitted (rejoin pause "
                                                                 f"{result['rejoin_pause_s'] * 1e3:.0f} ms)")
    bottom.axvline(t_fail, color="tab:red", ls="--", label=result["failure"])
    bottom.set_xlim(0, span)
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("time since start (s)")
    bottom.set_ylabel(f"tokens / s, all ranks ({bin_s:.1f} s bins)")
    bottom.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
