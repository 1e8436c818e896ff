"""One rank of the expert-parallel HF tests: a small seeded HF MoE model (4 layers, 16 experts) saved as
safetensors, loaded with ``from_pretrained``, swapped and parallelized over the ranks, each rank
holding only its own expert slots and running its own prompts.

    python parallel_worker.py OUT NAME CHECKPOINT serve VICTIM SLOTS_PER_RANK WAIT_FOR_REJOIN [STEPS]
    python parallel_worker.py OUT NAME CHECKPOINT train VICTIM

serve: greedy ``generate()`` through StepRunner, MoE stages compiled, no recompile allowed after the
first step; VICTIM (-1: none) SIGKILLs itself mid-generation at KILL_STEP; with WAIT_FOR_REJOIN the
members serve until its replacement has served too. Each step's tokens are saved once per process.
train: AdamW on the LM loss through StepRunner; VICTIM SIGKILLs itself mid-backward at KILL_STEP."""

import functools
import json
import os
import signal
import sys
import time

import torch
import transformers

W, KILL_STEP, STEPS, TRAIN_STEPS, MAX_STEPS = 4, 2, 5, 5, 3000
COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def hf_model(name: str) -> torch.nn.Module:
    """The seeded HF model itself: the single-process reference."""
    torch.manual_seed(0)
    t = transformers
    if name == "mixtral":
        return t.MixtralForCausalLM(t.MixtralConfig(**COMMON, intermediate_size=96, num_local_experts=16,
                                                    num_experts_per_tok=2)).eval()
    return t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=48,
                                                  num_experts=16, num_experts_per_tok=2, norm_topk_prob=True,
                                                  head_dim=16)).eval()


def save_checkpoint(name: str, directory: str) -> None:
    hf_model(name).save_pretrained(directory)  # safetensors


def load(name: str, checkpoint: str, slots_per_rank: int, world_size: int = W) -> torch.nn.Module:
    """from_pretrained, then every MoE block swapped: slots numbered rank by rank."""
    from moe_resilient.hf import swap_moe_blocks

    cls = transformers.MixtralForCausalLM if name == "mixtral" else transformers.Qwen3MoeForCausalLM
    model = cls.from_pretrained(checkpoint)
    swap_moe_blocks(model, num_slots=world_size * slots_per_rank, world_size=world_size)
    return model.eval()


MARGIN = 1e-4  # smallest gap allowed between a token's k-th and (k+1)-th router logit


def routing_margin(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Over ``ids``' tokens and ``model``'s MoE layers, the smallest gap between the k-th and (k+1)-th
    router logit. Below float32 rounding, any reimplementation of the layers may pick the other expert."""
    gaps = []

    def hook(gate, _, out):
        top = out[0].float().topk(gate.top_k + 1, dim=-1).values
        gaps.append((top[:, -2] - top[:, -1]).min().item())

    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return min(gaps)


@functools.cache
def _references() -> tuple[torch.nn.Module, ...]:
    return hf_model("mixtral"), hf_model("qwen")


@functools.cache
def batch(rank: int, step: int = 0) -> torch.Tensor:
    """Prompt ids [2, 6] of ``rank`` at ``step``: seeded, redrawn from the same generator while either
    reference model's routing of it is a near-tie (``routing_margin`` < MARGIN), where a result 0.01
    off the reference would be the tie's, not the library's."""
    gen = torch.Generator().manual_seed(100 * step + rank)
    while True:
        ids = torch.randint(3, 96, (2, 6), generator=gen)
        if min(routing_margin(m, ids) for m in _references()) >= MARGIN:
            return ids


def generate(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)


def expert_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)


def _die_on_call(module: torch.nn.Module, n: int, backward: bool = False) -> None:
    """SIGKILL this process on the n-th forward (or backward) call of ``module``."""
    calls = [0]

    def hook(*_):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    if backward:
        module.register_full_backward_hook(hook)
    else:
        module.register_forward_pre_hook(hook)


def serve(out_dir, name, checkpoint, victim, slots_per_rank, wait_for_rejoin, steps=STEPS):
    from moe_resilient import ShadowStore, StepRunner, parallelize
    from moe_resilient.group import ElasticGroup

    rank = int(os.environ["RANK"])
    model = load(name, checkpoint, slots_per_rank)
    full = expert_bytes(model)
    group = ElasticGroup.from_env(timeout=20.0)
    parallelize(model, group, compiled=True)  # compiles before the group forms: no peer waits on it
    group.start()
    runner = StepRunner(model, group, shadow=ShadowStore.from_hf_checkpoint(checkpoint, model=model),
                        shadow_current=True)
    full_since = None
    with torch.no_grad():
        while runner.step < MAX_STEPS:
            full_since = None if len(group.members) < W else runner.step if full_since is None else full_since
            if runner.step >= steps and (not wait_for_rejoin or (full_since is not None and runner.step >= full_since + 2)):
                break
            step = runner.step
            if step == KILL_STEP and rank == victim and not group.joined:
                _die_on_call(model.model, 3)  # the third decoder pass of this generate
            tokens = runner(generate, model, batch(rank, step))
            path = os.path.join(out_dir, f"rank{rank}_step{step}.pt")
            if os.path.exists(path):
                raise SystemExit(f"step {step} of rank {rank} released twice")
            torch.save(tokens, path)
            torch._dynamo.config.error_on_recompile = True  # the first step ran every stage
            time.sleep(0.01)
    changes = [{"lost": c.lost, "admitted": c.admitted} for c in runner.changes]
    json.dump({"changes": changes, "held_bytes": expert_bytes(model), "full_bytes": full, "steps": runner.step,
               "joined": group.joined}, open(os.path.join(out_dir, f"rank{rank}_{int(group.joined)}.json"), "w"))
    group.finish()


def train(out_dir, name, checkpoint, victim):
    from moe_resilient import StepRunner, parallelize
    from moe_resilient.group import ElasticGroup
    from moe_resilient.shadow import resilient_layers

    rank = int(os.environ["RANK"])
    model = load(name, checkpoint, slots_per_rank=8)  # every expert on two ranks: a loss uncovers none
    group = ElasticGroup.from_env(timeout=20.0)
    layers = parallelize(model, group)
    group.start()
    runner = StepRunner(model, group, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))

    def step_fn(ids):
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.item()

    losses = []
    for step in range(TRAIN_STEPS):
        if step == KILL_STEP and rank == victim:
            _die_on_call(list(layers.values())[2], 1, backward=True)  # mid-backward, layer 2 of 4
        losses.append(runner(step_fn, batch(rank, step)))
    replicas = {}
    for lname, layer in resilient_layers(model).items():
        p = layer.placement
        for s in layer.experts.held:
            if int(p.phy2log[s]) >= 0 and bool(p.active[p.slot_rank[s]]):
                replicas[f"{lname}/{int(p.phy2log[s])}/{s}"] = layer.experts.slot_weights(s)
    torch.save({"losses": losses, "replicas": replicas, "lost": [r for c in runner.changes for r in c.lost]},
               os.path.join(out_dir, f"train{rank}.pt"))
    group.finish()


if __name__ == "__main__":
    out_dir, name, checkpoint, mode = sys.argv[1:5]
    if mode == "serve":
        serve(out_dir, name, checkpoint, int(sys.argv[5]), int(sys.argv[6]), bool(int(sys.argv[7])),
              *map(int, sys.argv[8:]))
    else:
        train(out_dir, name, checkpoint, int(sys.argv[5]))
    sys.stdout.flush()
    os._exit(0)  # old gloo generations hold sockets to dead ranks: skip their destructors
