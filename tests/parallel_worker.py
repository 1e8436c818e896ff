"""One rank of the expert-parallel HF test: a tiny seeded HF MoE model, swapped, parallelized over the
launcher's ranks. Each rank runs its own batch through model(ids) and model.generate(), compares with
the single-process model, then (with a victim) survives a peer's SIGKILL and compares again."""

import json
import os
import signal
import sys

import torch
import transformers

from moe_resilient import ShadowStore
from moe_resilient.elastic import recover_across_ranks
from moe_resilient.group import ElasticGroup, RankFailure
from moe_resilient.hf import swap_moe_blocks
from moe_resilient.parallel import parallelize

W, SLOTS_PER_RANK = 4, 3
COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build(name: str) -> torch.nn.Module:
    """The same model in every process: seeded, swapped, slots numbered rank by rank."""
    torch.manual_seed(0)
    t = transformers
    if name == "mixtral":
        model = t.MixtralForCausalLM(t.MixtralConfig(**COMMON, intermediate_size=96, num_local_experts=8,
                                                     num_experts_per_tok=2))
    else:
        model = t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=48,
                                                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                                       head_dim=16))
    swap_moe_blocks(model, num_slots=W * SLOTS_PER_RANK, world_size=W)
    return model.eval()


def batch(rank: int, step: int = 0) -> torch.Tensor:
    return torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(100 * step + rank))


if __name__ == "__main__":
    out_dir, name, shadow_dir, victim = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    model = build(name)
    rank = int(os.environ["RANK"])
    ids = batch(rank)
    with torch.no_grad():  # the single-process answers, before this rank gives up the other slots
        want_logits = model(ids).logits
        want_tokens = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        want_after = model(batch(rank, 1)).logits
    full = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    group = ElasticGroup.from_env(timeout=20.0).start()
    layers = parallelize(model, group)
    held = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    result = {"full_bytes": full, "held_bytes": held}
    with torch.no_grad():
        result["logits_err"] = float((model(ids).logits - want_logits).abs().max())
        result["tokens_equal"] = bool(torch.equal(model.generate(ids, max_new_tokens=4, min_new_tokens=4,
                                                                 do_sample=False), want_tokens))
        # through the store, not a collective: a collective can complete on the victim before its peers
        group.store.set(f"served/{rank}", "1")
        if rank == victim:
            group.store.wait([f"served/{r}" for r in range(W)])
            os.kill(os.getpid(), signal.SIGKILL)
        while True:
            try:
                got = model(batch(rank, 1)).logits
                break
            except RankFailure:
                change = recover_across_ranks(model, group, step=1, shadow=ShadowStore.open(shadow_dir),
                                              shadow_current=True)
                result["lost"] = change.lost
        result["after_err"] = float((got - want_after).abs().max())
    result["sharded"] = all(layer.experts.sharded for layer in layers.values())
    json.dump(result, open(os.path.join(out_dir, f"rank{rank}.json"), "w"))
    group.finish()
    sys.stdout.flush()
    os._exit(0)
