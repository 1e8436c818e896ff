"""One rank of the failure drill (``python -m moe_resilient.drill_worker``, started by drill.py's
orchestrator under the launcher or by torchrun): serves the MoE half of a transformer with expert
parallelism through an ElasticGroup, each rank holding only its own expert slots, recovers from lost ranks and admits replacements, and records every event.

Protocol (one JSON line per event in ``out_dir/rank{r}.jsonl``):
    {"step", "batch_of", "served_by", "gen", "t0", "t1", "tokens", "pid"}      a batch served
        (+ "makeup": true for a lost rank's in-flight batch, re-run with the survivors' next step)
    {"event": "failure", "step", "lost", "t_detect", "t_recovered", "graphs", "recovery", "cause"}
    {"event": "done", "graphs"}                    graphs: torch.compile graphs built so far
    {"event": "admitted", "ranks", "step", "t"}    {"event": "fenced", "t", "error"}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

from moe_resilient import planner
from moe_resilient.dispatch import Loopback, ep_forward
from moe_resilient.elastic import check_placement_consistent, recover_across_ranks
from moe_resilient.group import ElasticGroup, FencedError, RankFailure
from moe_resilient.layer import MoEConfig, ResilientMoE
from moe_resilient.recovery import compiled_graphs
from moe_resilient.shadow import ShadowStore, resilient_layers

HIDDEN, EXPERTS, TOP_K, LAYERS = 64, 8, 2, 2  # the tests' size; ``moe-resilient drill`` serves a larger one


class DrillModel(nn.Module):
    """x [T, H] -> [T, H]: ``layers`` pre-norm residual MoE blocks (the MoE half of a transformer), each
    with ``experts`` SwiGLU experts of intermediate size 2H, top-2."""

    def __init__(self, world_size: int, slots_per_rank: int, seed: int = 0, ranks_per_host: int | None = None, *,
                 layers: int = LAYERS, hidden: int = HIDDEN, experts: int = EXPERTS):
        super().__init__()
        torch.manual_seed(seed)
        topo = planner.Topology(world_size, ranks_per_host or world_size)
        plan, slot_rank = planner.initial_placement(np.ones(experts), topo, slots_per_rank)
        cfg = MoEConfig(hidden, 2 * hidden, experts, TOP_K, num_slots=world_size * slots_per_rank,
                        world_size=world_size)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden) for _ in range(layers))
        self.moe = nn.ModuleList(ResilientMoE(cfg, phy2log=plan.phy2log, slot_rank=slot_rank) for _ in range(layers))
        for layer in self.moe:  # one set of logical weights, copied into every replica slot
            w13 = torch.randn(experts, 4 * hidden, hidden) / hidden**0.5
            w2 = torch.randn(experts, hidden, 2 * hidden) / (2 * hidden)**0.5
            layer.load_logical_weights(w13, w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, layer in zip(self.norms, self.moe):
            x = x + layer(norm(x))
        return x

    def ep(self, x: torch.Tensor, group: ElasticGroup | Loopback, compiled: bool = False) -> torch.Tensor:
        for norm, layer in zip(self.norms, self.moe):
            x = x + ep_forward(layer, norm(x), group, compiled=compiled)
        return x


def make_batch(step: int, batch_of: int, tokens: int, hidden: int = HIDDEN) -> torch.Tensor:
    g = torch.Generator().manual_seed(1_000_003 * step + batch_of)
    return torch.randn(tokens, hidden, generator=g)


def rerun_after_failure(change) -> tuple[list[tuple[int, int]], int]:
    """(batches to re-run, step to go on from), the same on every survivor. The survivors may have met
    the failure one step apart (a collective can complete on one and fail on another): all go on from
    the latest, and re-run, from the step before the earliest, every batch a lost rank served (it may
    have died after its part of a step's collectives but before its output: re-run at least once, maybe
    twice) and every batch a survivor had not completed. Who served what comes from the members'
    histories (``change.carried``), so a re-run batch lost again is re-run again."""
    met = change.member_steps
    first, step = min(met.values()), max(met.values())
    served_in = {}  # step -> {member: batches}, merged: members that computed a step computed it alike
    for history in change.carried.values():
        for s, batches in (history or {}).items():
            served_in.setdefault(int(s), {}).update({int(m): [tuple(b) for b in bs] for m, bs in batches.items()})
    rerun = set()
    for s in range(max(first - 1, 0), step + 1):
        for m, batches in served_in.get(s, {}).items():
            if m in change.lost or s >= met.get(m, s + 1):
                rerun.update(b for b in batches if b != (step, m) or m in change.lost)
    return sorted(rerun), step


def _save(tensor: torch.Tensor, path: str) -> None:
    """Atomically: a rank killed mid-write leaves no torn file behind."""
    torch.save(tensor, path + ".tmp")
    os.replace(path + ".tmp", path)


def worker(args) -> int:
    rank = int(os.environ["RANK"])
    log = open(os.path.join(args.out_dir, f"rank{rank}.jsonl"), "a", buffering=1)

    def emit(**rec):
        log.write(json.dumps(rec) + "\n")

    world = args.alone_of or int(os.environ["WORLD_SIZE"])
    model = DrillModel(world, args.slots_per_rank, args.seed, args.ranks_per_host, layers=args.layers,
                       hidden=args.hidden, experts=args.experts).eval()
    for layer in model.moe:  # each rank holds only its own slots
        layer.shard(rank)
    batch = lambda step, of: make_batch(step, of, args.tokens, args.hidden)  # noqa: E731
    shadow = ShadowStore.open(args.shadow)
    if args.restart:  # baseline: this rank's weights from safetensors (then compiled below, as every rank is)
        for name, layer in resilient_layers(model).items():
            for s in layer.experts.held:
                if int(layer.placement.phy2log[s]) >= 0:
                    layer.experts.write_slot(s, *shadow.read_expert(name, int(layer.placement.phy2log[s])))
    loopback = Loopback(world, model.moe[0].experts.held)  # to compile, and to serve alone (restart baseline)
    if args.compile:  # compile before the group forms: peers would otherwise wait out the first compile
        with torch.no_grad():
            model.ep(batch(0, rank), loopback, compiled=True)
        for layer in model.moe:
            layer.read_load(reset=True)
    if args.alone_of:  # restart baseline: one rank restarted alone, ready to rejoin once it served a step
        t0 = time.time()
        with torch.no_grad():
            model.ep(batch(0, rank), loopback, compiled=args.compile)
        emit(step=0, batch_of=rank, served_by=rank, gen=0, t0=t0, t1=time.time(), tokens=args.tokens)
        return 0
    timing = {"heartbeat_timeout": args.heartbeat_timeout} if args.heartbeat_timeout else {}
    group = ElasticGroup.from_env(timeout=args.collective_timeout, **timing).start()
    topology = group.topology(args.ranks_per_host)

    def catch_up(step, carry=None):  # every member applies the same repairs and readmissions (elastic.py)
        return recover_across_ranks(model, group, step=step, shadow=shadow, topology=topology, carry=carry,
                                    shadow_current=True)  # serving: weights never change

    step = 0
    if group.joined:  # a replacement: the members run the same readmission after their step boundary
        change = catch_up(None)
        step = change.step
        emit(event="admitted", ranks=change.admitted, step=step, t=time.time())
    else:  # all start alike: refuse to serve if a rank's placement differs
        check_placement_consistent(resilient_layers(model), group)
    pending = []  # (step, batch_of) of batches to re-run, the same list on every member
    history = {}  # step -> {member: the batches it serves in that step}, the last two steps
    rejoined_at = [step if group.joined else -1]  # step at which the last admission completed

    def stop_at() -> int:  # the orchestrator names a step far enough ahead that every member has read it
        try:
            with open(args.stop_file) as f:
                return int(f.read())
        except (TypeError, FileNotFoundError, ValueError):
            return 1 << 62

    def more_steps() -> bool:  # every member decides alike: same step, same agreed membership
        if step >= stop_at():
            return False
        short = len(group.members) < group.world_size
        waiting = args.until_full and short and step < args.steps + args.max_extra_steps
        after = args.until_full and not short and rejoined_at[0] >= 0 and step < rejoined_at[0] + args.after_full
        return step < args.steps or waiting or after

    with torch.no_grad():
        while more_steps():
            # Lost ranks' in-flight batches ride along with the survivors' next step, spread over them
            # (pending[i] on the i-th member, cyclically), so the re-run costs no extra step.
            n = len(group.members)
            history[step] = {m: [(step, m)] + [p for i, p in enumerate(pending) if group.members[i % n] == m]
                             for m in group.members}
            history.pop(step - 2, None)
            mine = history[step][rank][1:]
            served = torch.cat([batch(step, rank)] + [batch(s, b) for s, b in mine])
            t0 = time.time()
            try:
                out = model.ep(served, group, compiled=args.compile)
                t1 = time.time()
                for i, (batch_step, batch_of) in enumerate([(step, rank)] + mine):
                    if args.save_outputs:  # before the record: a batch recorded as served has its output
                        _save(out[i * args.tokens:(i + 1) * args.tokens],
                              os.path.join(args.out_dir, f"out_s{batch_step}_b{batch_of}.pt"))
                    emit(step=batch_step, batch_of=batch_of, served_by=rank, gen=group.generation, t0=t0, t1=t1,
                         tokens=args.tokens, pid=os.getpid(), **({"makeup": True} if i else {}))
                pending.clear()
                step += 1
                if group.step_boundary():
                    change = catch_up(step)
                    rejoined_at[0] = step
                    emit(event="admitted", ranks=change.admitted, step=step, t=time.time())
            except RankFailure as failure:
                t_agreed = time.time()
                graphs = compiled_graphs()
                t_detect = t_agreed - (time.monotonic() - group.last_failure_detect_s)
                change = catch_up(step, carry=history)
                report = change.report
                emit(event="failure", step=step, lost=change.lost, t_detect=t_detect, t_agreed=t_agreed,
                     t_recovered=time.time(), graphs=graphs, gen=group.generation,
                     recovery=report.summary() if report else "", uncovered=report.uncovered if report else {},
                     admitted=change.admitted, cause=str(failure))
                pending, step = rerun_after_failure(change)
                if change.admitted:
                    rejoined_at[0] = step
            except FencedError as exc:
                emit(event="fenced", t=time.time(), error=str(exc))
                return 3
            if args.step_sleep:
                time.sleep(args.step_sleep)
    emit(event="done", graphs=compiled_graphs())
    group.finish()
    return 0


def worker_args(argv=None):
    ap = argparse.ArgumentParser("moe_resilient.drill_worker")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--shadow", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--slots-per-rank", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--experts", type=int, default=EXPERTS)
    ap.add_argument("--ranks-per-host", type=int, help="placement topology (default: one host)")
    ap.add_argument("--collective-timeout", type=float, default=10.0, help="wait on live but absent peers")
    ap.add_argument("--heartbeat-timeout", type=float, help="default: ElasticGroup's")
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--save-outputs", action="store_true")
    ap.add_argument("--restart", action="store_true")
    ap.add_argument("--stop-file", help="serve until the step this file names (written by the orchestrator)")
    ap.add_argument("--alone-of", type=int, default=0, help="restart baseline: rank of a W-rank job, alone")
    ap.add_argument("--compile", action="store_true", help="each layer one compiled graph (dispatch.compiled_forward)")
    ap.add_argument("--until-full", action="store_true", help="keep serving until every rank is back")
    ap.add_argument("--max-extra-steps", type=int, default=3000)
    ap.add_argument("--after-full", type=int, default=5, help="steps served once every rank is back")
    return ap.parse_args(argv)


if __name__ == "__main__":
    code = worker(worker_args())
    sys.stdout.flush()
    sys.stderr.flush()
    # Abandoned gloo groups of old generations cannot be torn down cleanly (PyTorch #130345):
    # leave without running their destructors.
    os._exit(code)
