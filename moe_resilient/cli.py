"""`moe-resilient` command line."""

from __future__ import annotations

import time

import click


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
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--mode", type=click.Choice(["default", "reduce-overhead"]), default="default", show_default=True,
              help="torch.compile mode; reduce-overhead records CUDA graphs on a GPU")
def demo(hidden, intermediate, experts, top_k, tokens, world_size, device, dtype, mode):
    """Compile a ResilientMoE once, then edit its placement (replicas, moves, a dead rank) and show
    that outputs stay equal and nothing recompiles."""
    import torch._dynamo

    from moe_resilient import MoEConfig, ResilientMoE

    device, dtype = torch.device(device), getattr(torch, dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA device here", param_hint="--device")
    torch.manual_seed(0)
    spare = world_size  # one spare slot per rank
    layer = ResilientMoE(
        MoEConfig(hidden, intermediate, experts, top_k, num_slots=experts + spare, world_size=world_size),
        dtype=dtype, device=device,
    )
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True, mode=None if mode == "default" else mode)
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
                err = (out - eager).abs().max().item()  # read before the next call: a CUDA graph reuses out
                click.echo(f"{what:<38} edit {edit_ms:6.2f} ms  max|diff| vs healthy {err:.1e}")
        click.echo(f"recompiles: 0 (error_on_recompile=True)  phy2log {p.phy2log.tolist()}  dead ranks {p.dead_ranks()}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--nproc", type=int, required=True, help="ranks to spawn")
@click.option("--respawn", is_flag=True, help="start a replacement for a rank that dies; it rejoins by itself")
@click.option("--timeout", type=float, default=24 * 3600.0, show_default=True)
@click.argument("script")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def launch(nproc, respawn, timeout, script, args):
    """Run SCRIPT as NPROC ranks (torchrun-style environment, store hosted here). A dying rank does
    not take the others down."""
    from moe_resilient.launch import launch_main

    raise SystemExit(launch_main(nproc, script, list(args), respawn, timeout))


@main.command()
@click.option("--host", default="0.0.0.0", show_default=True, help="address to listen on")
@click.option("--port", default=29600, show_default=True)
def store(host, port):
    """Host the group's control store in this process, outside every worker node (as TorchFT hosts its
    lighthouse), so that losing any node leaves the others serving. Workers find it through
    MOE_RESILIENT_STORE=host:port. Runs until killed."""
    from moe_resilient.launch import serve_store

    serve_store(host, port, echo=click.echo)


@main.command()
@click.option("--model", default="tiny-qwen3-moe", show_default=True,
              help="an HF checkpoint directory (safetensors), or the seeded preset tiny-qwen3-moe")
@click.option("--nproc", default=4, show_default=True, help="ranks: attention data-parallel, MoE expert-parallel")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--work-dir", type=click.Path(file_okay=False), help="journals and KV checkpoints (default: a temp dir)")
@click.option("--block-tokens", default=16, show_default=True, help="KV block size, and the checkpoint interval")
@click.option("--restore", type=click.Choice(["checkpoint", "recompute"]), default="checkpoint", show_default=True,
              help="how survivors take a lost rank's requests over")
@click.option("--expert-ranks", default=0, show_default=True,
              help="disaggregated: the last N ranks run experts only, the others attention (0: collocated)")
def serve(model, nproc, host, port, work_dir, block_tokens, restore, expert_ranks):
    """Serve MODEL on NPROC ranks behind an OpenAI-compatible /v1/completions (streaming) endpoint;
    requests survive the death of ranks."""
    import tempfile

    from moe_resilient.serving.http import serve as run

    try:
        run(model, nproc, work_dir or tempfile.mkdtemp(prefix="moe_resilient_serve_"), host, port, echo=click.echo,
            block_tokens=block_tokens, restore=restore, expert_ranks=expert_ranks)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@main.command()
@click.option("--nproc", default=4, show_default=True)
@click.option("--steps", default=300, show_default=True)
@click.option("--tokens", default=32, show_default=True, help="tokens per rank per step")
@click.option("--fail-rank", default="2", show_default=True, help="rank to fail, or a list: 1,3")
@click.option("--fail-step", default="100", show_default=True,
              help="step each rank fails at: one for all, or one per --fail-rank")
@click.option("--fail-host", type=int, help="fail every rank of this host at once (needs --ranks-per-host)")
@click.option("--ranks-per-host", type=int, help="ranks per host in the placement topology (default: one host)")
@click.option("--hang", is_flag=True, help="SIGSTOP (then SIGCONT) instead of SIGKILL")
@click.option("--replace", is_flag=True, help="start a replacement that rejoins")
@click.option("--baseline", type=click.Choice(["none", "restart"]), default="none", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the measurements here")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="PNG: step latency around the failure, throughput over the run")
@click.option("--compile/--eager", "compile_", default=True, show_default=True,
              help="serve through compiled graphs and count recompiles")
@click.option("--layers", default=4, show_default=True, help="MoE blocks")
@click.option("--hidden", default=512, show_default=True, help="hidden size (experts' intermediate size: 2x)")
@click.option("--experts", default=16, show_default=True, help="experts per block")
@click.option("--serving", is_flag=True, help="request-level drill: a Poisson load of streamed requests on the "
              "serving engine, the failure --fail-at seconds in, against recompute-style recovery (and with "
              "--baseline restart, a full restart)")
@click.option("--requests", default=24, show_default=True, help="--serving: requests in the load")
@click.option("--rate", default=6.0, show_default=True, help="--serving: arrivals per second")
@click.option("--prompt-tokens", default="256,768", show_default=True, help="--serving: prompt length range")
@click.option("--new-tokens", default=64, show_default=True, help="--serving: tokens generated per request")
@click.option("--fail-at", default=2.0, show_default=True, help="--serving: seconds into the load")
@click.option("--expert-ranks", default=0, show_default=True,
              help="--serving: disaggregated, the last N ranks run experts only")
def drill(nproc, steps, tokens, fail_rank, fail_step, fail_host, ranks_per_host, hang, replace, baseline, json_path,
          plot_path, compile_, layers, hidden, experts, serving, requests, rate, prompt_tokens, new_tokens, fail_at,
          expert_ranks):
    """Serve a MoE model expert-parallel on NPROC ranks, fail ranks mid-stream, measure the interruption."""
    from moe_resilient.drill import plot, run_drill

    def ints(text, option):
        try:
            return [int(v) for v in text.split(",")]
        except ValueError:
            raise click.BadParameter(f"{text!r} is not a comma-separated list of integers",
                                     param_hint=option) from None

    if serving:
        return _serving_drill(nproc, ints(fail_rank, "--fail-rank"), hang, baseline, json_path, plot_path, requests,
                              rate, ints(prompt_tokens, "--prompt-tokens"), new_tokens, fail_at, expert_ranks)
    try:
        result = run_drill(nproc, steps, ints(fail_rank, "--fail-rank"), ints(fail_step, "--fail-step"), hang=hang,
                           replace=replace, baseline=baseline == "restart", tokens=tokens, compile=compile_,
                           fail_host=fail_host, ranks_per_host=ranks_per_host, echo=click.echo, layers=layers,
                           hidden=hidden, experts=experts)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    ms = lambda v: "n/a" if v is None else f"{v * 1e3:.1f} ms"  # noqa: E731
    back = result["time_to_95pct_throughput_s"]
    click.echo(f"detection {ms(result['detection_latency_s'])}, agreement {ms(result['agreement_s'])}, "
               f"recovery {ms(result['recovery_s'])}, serving again {ms(result['serving_again_after_detection_s'])} "
               f"after detection, pause {ms(result['pause_s'])} ({ms(result['pause_after_detection_s'])} "
               f"after detection; a step takes {ms(result['step_s'])}), stall {ms(result['stall_s'])}, "
               f"95% throughput after {'never' if back is None else f'{back:.2f} s'}, lost batches "
               f"{result['lost_batches']}, re-run {result['rerun_batches']}, "
               f"recompiles {result['recompiles']}{'' if compile_ else ' (eager)'}")
    if result["throughput_retained"] is not None:
        click.echo(f"throughput after the failure {result['throughput_retained']:.0%} of before, "
                   f"with {result['capacity_retained']:.0%} of the ranks")
    if result["rejoin_pause_s"] is not None:
        click.echo(f"rejoin pause {ms(result['rejoin_pause_s'])}")
    if "restart_total_s" in result:
        click.echo(f"full restart: every rank {result['restart_cold_s']:.2f} s cold, {result['restart_warm_s']:.2f} s "
                   f"warm; one rank alone {result['restart_one_rank_s']:.2f} s warm; with detection and teardown "
                   f"{result['restart_total_s']:.2f} s = {result['restart_over_pause']:.0f}x the elastic pause")
    _save(result, json_path, plot_path, plot)


def _save(result: dict, json_path, plot_path, plot) -> None:
    import json

    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    if plot_path:
        plot(result, plot_path)


def _serving_drill(nproc, fail_ranks, hang, baseline, json_path, plot_path, requests, rate, prompt_tokens, new_tokens,
                   fail_at, expert_ranks):
    from moe_resilient.serving.loadgen import Load, plot, serving_drill

    if len(fail_ranks) != 1 or not 0 <= fail_ranks[0] < nproc or nproc < 2:
        raise click.UsageError(f"--serving fails one rank of 0..{nproc - 1} (and needs --nproc >= 2)")
    if len(prompt_tokens) != 2 or not 1 <= prompt_tokens[0] <= prompt_tokens[1]:
        raise click.UsageError("--prompt-tokens takes LOW,HIGH with 1 <= LOW <= HIGH")
    if hang and baseline == "restart":
        raise click.UsageError("--baseline restart relaunches on a rank's exit; a hung rank does not exit")
    attention = nproc - expert_ranks
    victim_kind, left = ("attention", attention - 1) if fail_ranks[0] < attention else ("expert", expert_ranks - 1)
    if not 0 <= expert_ranks < nproc or (left < 1 and (expert_ranks or victim_kind == "attention")):
        raise click.UsageError(f"--expert-ranks {expert_ranks} of --nproc {nproc}: no {victim_kind} rank would "
                               f"outlive rank {fail_ranks[0]}")
    load = Load(requests=requests, rate=rate, prompt_tokens=tuple(prompt_tokens), new_tokens=new_tokens)
    recoveries = ("checkpoint", "recompute") + (("restart",) if baseline == "restart" else ())
    result = serving_drill(nproc, load, fail_rank=fail_ranks[0], fail_after=fail_at, hang=hang, recoveries=recoveries,
                           expert_ranks=expert_ranks, echo=click.echo)
    ms = lambda v: "n/a" if v is None else f"{v * 1e3:.0f} ms"  # noqa: E731
    free = result["free"]
    click.echo(f"failure-free: TTFT p50 {ms(free['ttft_p50_s'])}, ITL p50 {ms(free['itl_p50_s'])}, "
               f"p99 {ms(free['itl_p99_s'])}")
    for name in recoveries:
        r = result[name]
        back = r["time_to_95pct_s"]
        click.echo(f"{name}: stall {ms(r['stall_s'])}, ITL p99 in the second after the failure "
                   f"{ms(r['itl_window_p99_s'])} (before {ms(r['itl_p99_s'])}), recomputed per request "
                   f"{r['recomputed_per_request']}, 95% throughput after {'never' if back is None else f'{back:.1f} s'}"
                   f", tokens equal to failure-free: {r['tokens_equal']}, mismatches {len(r['mismatches'])}")
    _save(result, json_path, plot_path, plot)


if __name__ == "__main__":
    main()
