"""Models to serve: an HF checkpoint directory (``save_pretrained`` layout, safetensors), loaded in every
rank and swapped for expert parallelism; and a seeded tiny Qwen3-MoE to build one without a download."""

from __future__ import annotations

import hashlib
import os

import torch

TINY = "tiny-qwen3-moe"


def tiny_qwen3_moe(seed: int = 0) -> torch.nn.Module:
    """A 4-layer Qwen3-MoE (16 experts, top-2, hidden 128, vocab 512) with seeded weights."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.Qwen3MoeForCausalLM(config).eval()


def materialize(model: str, directory: str) -> str:
    """The checkpoint directory to serve: ``model`` itself if it is one, else the named preset
    (``tiny-qwen3-moe``) saved under ``directory``."""
    if os.path.isdir(model):
        return model
    if model != TINY:
        raise ValueError(f"model {model!r} is neither a checkpoint directory nor the preset {TINY!r}")
    path = os.path.join(directory, TINY)
    if not os.path.exists(os.path.join(path, "config.json")):
        tiny_qwen3_moe().save_pretrained(path)
    return path


def model_id(checkpoint: str) -> str:
    """The fingerprint KV checkpoints carry: the directory's name and a hash of its config and
    weight files' names and sizes."""
    h = hashlib.sha256(open(os.path.join(checkpoint, "config.json"), "rb").read())
    for name in sorted(os.listdir(checkpoint)):
        if name.endswith(".safetensors"):
            h.update(f"{name}:{os.path.getsize(os.path.join(checkpoint, name))}".encode())
    return f"{os.path.basename(os.path.normpath(checkpoint))}@{h.hexdigest()[:16]}"


def load(checkpoint: str, world_size: int = 1, slots_per_rank: int | None = None, expert_ranks=None
         ) -> torch.nn.Module:
    """``from_pretrained`` then every MoE block swapped, slots numbered rank by rank over
    ``expert_ranks`` (default: every rank). Default slots per expert rank: room for every expert once
    and half as many replicas, and for every expert on the others once one of them is lost."""
    import transformers

    from moe_resilient.hf import swap_moe_blocks

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    experts = getattr(model.config, "num_experts", None) or getattr(model.config, "num_local_experts")
    holders = len(expert_ranks) if expert_ranks is not None else world_size
    if slots_per_rank is None:
        slots_per_rank = max(-(-(experts * 3 // 2) // holders), -(-experts // max(1, holders - 1)))
    swap_moe_blocks(model, num_slots=slots_per_rank * holders, world_size=world_size, expert_ranks=expert_ranks)
    return model
