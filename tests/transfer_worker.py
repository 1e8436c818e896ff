"""One rank of the peer-transfer tests: two sharded ResilientMoE layers over 4 ranks, every expert on
two ranks and one spare slot per rank, served through StepRunner with no shadow store at all, so
every copy a repair or readmission makes must come from a peer. Rank 3 SIGKILLs itself at step 3
(but in "rebalance"). Modes: "repair" (survivors restore lost redundancy from peers), "cut" (rank 2 dies as the transfer
starts; a step-0 shadow covers experts both ranks held), "rejoin" (rank 3's replacement gets every
slot back from peers), "rebalance" (every rank alive; all rebalance at step 3), "train" (AdamW through the loss: a repaired replica takes its optimizer state
from its peer)."""

import json
import os
import signal
import sys
import time

import numpy as np
import torch
from torch import nn

from moe_resilient import MoEConfig, ResilientMoE, ShadowStore, StepRunner, parallelize, planner
from moe_resilient.group import ElasticGroup

W, SPR, STEPS = 4, 5, 8


def build() -> nn.Module:
    torch.manual_seed(0)
    plan, slot_rank = planner.initial_placement(np.ones(8), planner.Topology(W, W), SPR, num_replicas=16)
    cfg = MoEConfig(32, 64, 8, 2, num_slots=W * SPR, world_size=W)
    return nn.Sequential(*[ResilientMoE(cfg, phy2log=plan.phy2log, slot_rank=slot_rank) for _ in range(2)]).eval()


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(6, 32, generator=torch.Generator().manual_seed(100 * step + rank))


def weights_err(model: nn.Module, reference: nn.Module) -> float:
    """Largest difference between a routed slot this rank holds and its expert's true weights."""
    err = 0.0
    for layer, ref in zip(model, reference):
        p = layer.placement
        for s in layer.experts.held:
            e = int(p.phy2log[s])
            if e >= 0 and bool(p.active[p.slot_rank[s]]):
                for got, want in zip(layer.experts.slot_weights(s), ref.expert_weights(e)):
                    err = max(err, float((got - want).abs().max()))
    return err


def target(rank: int, step: int) -> torch.Tensor:
    return torch.randn(6, 32, generator=torch.Generator().manual_seed(100 * step + rank + 7))


def train_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    loss = (model(x) - t).square().mean()
    loss.backward()
    return loss.item()


def train(model: nn.Module, group: ElasticGroup, rank: int, out_dir: str) -> None:
    """AdamW steps through StepRunner; rank 3 dies at step 3. Saves the losses, and every routed slot
    held here with its expert, weights and optimizer state rows."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    runner = StepRunner(model, group, optimizer=opt)
    losses = []
    for step in range(STEPS):
        if step == 3 and rank == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        losses.append(runner(train_step, model, batch(rank, step), target(rank, step)))
    slots = {}
    for i, layer in enumerate(model):
        p = layer.placement
        for s in layer.experts.held:
            if int(p.phy2log[s]) >= 0 and bool(p.active[p.slot_rank[s]]):
                slots[(i, s)] = (int(p.phy2log[s]), *layer.experts.slot_weights(s), *layer.experts.slot_state(s))
    report = runner.changes[-1].report
    torch.save({"losses": losses, "slots": slots, "peer_transfers": report.peer_transfers,
                "state_resets": report.state_resets}, os.path.join(out_dir, f"train{rank}.pt"))


if __name__ == "__main__":
    out_dir, mode = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    model, reference = build(), build()
    group = ElasticGroup.from_env(timeout=20.0).start()
    parallelize(model, group)
    if mode == "train":
        train(model, group, rank, out_dir)
        group.finish()
        os._exit(0)
    if mode == "cut" and rank == 2:  # dies the moment the repair's transfer starts
        import moe_resilient.recovery as recovery
        recovery.transfer = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    # no shadow ("cut": one as old as step 0, for experts left with no replica at all): a redundancy
    # copy can only come from a peer
    runner = StepRunner(model, group, shadow=ShadowStore.open(sys.argv[3]) if len(sys.argv) > 3 else None)
    errs, full_since = [], None
    with torch.no_grad():
        while runner.step < 3000:  # a replacement takes seconds to start: serve until it is back
            full_since = None if len(group.members) < W else full_since if full_since is not None else runner.step
            if runner.step >= STEPS and (mode != "rejoin" or (full_since is not None and runner.step >= full_since + 3)):
                break
            step = runner.step
            if step == 3 and mode == "rebalance":
                before = [layer.placement.phy2log.tolist() for layer in model]
                report = runner.rebalance()
                rebalanced = {"before": before, "peer_transfers": report.peer_transfers, "bytes": report.bytes_by_source,
                              "copies": report.replicas_added}
            elif step == 3 and rank == 3 and not group.joined:
                os.kill(os.getpid(), signal.SIGKILL)
            y = runner(model, batch(rank, step))
            errs.append(float((y - reference(batch(rank, step))).abs().max()))
            time.sleep(0.005)
    reports = [{"lost": c.lost, "admitted": c.admitted,
                "bytes": c.report.bytes_by_source if c.report else None,
                "peer_transfers": c.report.peer_transfers if c.report else 0,
                "skipped": c.report.redundancy_skipped if c.report else None} for c in runner.changes]
    json.dump({"out_err": max(errs), "steps": runner.step, "weights_err": weights_err(model, reference),
               "rebalanced": rebalanced if mode == "rebalance" else None,
               "changes": reports, "joined": group.joined, "slot_bytes": model[0].experts.slot_bytes,
               "placement": [layer.placement.phy2log.tolist() for layer in model]},
              open(os.path.join(out_dir, f"rank{rank}_{int(group.joined)}.json"), "w"))
    group.finish()
    sys.stdout.flush()
    os._exit(0)
