"""`moe-resilient` command line."""

from __future__ import annotations

import time

import click
import torch


@click.group()
def main():
    """moe_resilient: MoE serving that survives rank loss without restart or recompile."""


@main.command()
@click.option("--hidden", default=256, show_default=True)
@click.option("--intermediate", default=512, show_default=True)
@click.option("--experts", default=8, show_default=True)
@click.option("--top-k", default=2, show_default=True)
@click.option("--tokens", default=64, show_default=True)
@click.option("--world-size", default=4, show_default=True, help="simulated ranks that own slots")
def demo(hidden, intermediate, experts, top_k, tokens, world_size):
    """Compile a ResilientMoE once, then edit its placement (replicas, moves, a dead rank) and show
    that outputs stay equal and nothing recompiles."""
    import torch._dynamo

    from moe_resilient import MoEConfig, ResilientMoE

    torch.manual_seed(0)
    spare = world_size  # one spare slot per rank
    layer = ResilientMoE(
        MoEConfig(hidden, intermediate, experts, top_k, num_slots=experts + spare, world_size=world_size)
    )
    x = torch.randn(tokens, hidden)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)
        t0 = time.perf_counter()
        compiled(x)
        click.echo(f"compiled once in {time.perf_counter() - t0:.1f} s")
        p = layer.placement
        lost_rank = int(p.slot_rank[0])
        victims = sorted({int(p.phy2log[s]) for s in range(p.num_slots) if int(p.slot_rank[s]) == lost_rank} - {-1})
        steps = [(f"replicate expert {e} into spare slot {s}", lambda e=e, s=s: layer.add_replica(e, s))
                 for e, s in zip(victims, p.spare_slots()[-len(victims):])]
        steps.append((f"rank {lost_rank} dies", lambda: p.mark_dead(lost_rank)))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for what, edit in steps:  # a recompile would raise here
                t0 = time.perf_counter()
                edit()
                edit_ms = (time.perf_counter() - t0) * 1e3
                out = compiled(x)
                err = (out - eager).abs().max().item()
                click.echo(f"{what:<38} edit {edit_ms:6.2f} ms  max|diff| vs healthy {err:.1e}")
        click.echo(f"recompiles: 0 (error_on_recompile=True)  phy2log {p.phy2log.tolist()}  dead ranks {p.dead_ranks()}")


if __name__ == "__main__":
    main()
