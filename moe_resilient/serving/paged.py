"""A paged KV cache for HF decoder models, and the attention that reads it.

The cache is one pool of blocks per layer, keys and values [num_blocks * block_tokens, kv_heads,
head_dim]; a request holds a block table (the pool blocks of its positions, in order). A step runs
every scheduled request's new tokens as one flattened row, ``model(ids [1, T], position_ids [1, T],
cache=pool, paged=step)``: the model's own attention module projects and rotates them, ``update``
writes their keys and values into their slots, and ``paged_attention`` (registered with HF's
``AttentionInterface``; no mask is built for it) attends each request to its own positions through
its block table. Decoding rows (one new token each) run as one padded SDPA call, chunks of several
tokens (prefill, or positions recomputed after a restore) one call each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_resilient.kv_checkpoint import KVLayout

ATTENTION = "moe_resilient_paged"


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than a request needs."""


@dataclass
class StepRows:
    """Which rows of a flattened step belong to which request. For request i: its new tokens are rows
    ``starts[i] : starts[i] + lengths[i]`` and its positions after the step number ``contexts[i]``;
    ``slots[i]``: pool slots of those positions [contexts[i]]. ``write_slots`` [T]: where each row's
    keys and values go."""

    starts: list[int]
    lengths: list[int]
    contexts: list[int]
    slots: list[torch.Tensor]
    write_slots: torch.Tensor

    def __post_init__(self):
        self.decode = [i for i, n in enumerate(self.lengths) if n == 1]
        self.chunks = [i for i, n in enumerate(self.lengths) if n > 1]
        if self.decode:  # one padded gather for every decoding request
            width = max(self.contexts[i] for i in self.decode)
            self.decode_slots = torch.zeros(len(self.decode), width, dtype=torch.long)
            self.decode_mask = torch.zeros(len(self.decode), 1, 1, width, dtype=torch.bool)
            for j, i in enumerate(self.decode):
                self.decode_slots[j, : self.contexts[i]] = self.slots[i]
                self.decode_mask[j, ..., : self.contexts[i]] = True
            self.decode_rows = torch.tensor([self.starts[i] for i in self.decode])


class PagedKVCache:
    """Pools of ``num_blocks`` blocks of ``block_tokens`` positions for every layer of an HF model."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_tokens: int = 16):
        self.layout = lay = KVLayout.of(model, block_tokens)  # what its checkpoints hold, block by block
        self.block_tokens, self.num_blocks = block_tokens, num_blocks
        shape, dtype = (num_blocks * block_tokens, lay.kv_heads, lay.head_dim), getattr(torch, lay.dtype)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in range(lay.layers)]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in range(lay.layers)]
        self.free = list(range(num_blocks - 1, -1, -1))
        self.step: StepRows | None = None

    # ------------------------------------------------------------------------- block tables
    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def allocate(self, count: int) -> list[int]:
        if count > len(self.free):
            raise OutOfBlocksError(f"{count} blocks wanted, {len(self.free)} free of {self.num_blocks}")
        return [self.free.pop() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        self.free.extend(reversed(blocks))

    def slots(self, table: list[int], start: int, stop: int) -> torch.Tensor:
        """Pool slots of positions start..stop-1 of a request with block table ``table``."""
        pos, bt = torch.arange(start, stop), self.block_tokens
        return torch.tensor(table, dtype=torch.long)[pos // bt] * bt + pos % bt

    def read(self, table: list[int], start: int, stop: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys and values of positions start..stop-1, per layer [kv_heads, stop - start, head_dim] (copies)."""
        s = self.slots(table, start, stop)
        return ([k[s].transpose(0, 1).contiguous() for k in self.keys],
                [v[s].transpose(0, 1).contiguous() for v in self.values])

    def write(self, table: list[int], start: int, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Put per-layer [kv_heads, n, head_dim] keys and values at positions start..start+n-1."""
        s = self.slots(table, start, start + keys[0].shape[1])
        for pool, k in zip(self.keys, keys):
            pool[s] = k.transpose(0, 1).to(pool.dtype)
        for pool, v in zip(self.values, values):
            pool[s] = v.transpose(0, 1).to(pool.dtype)

    # ------------------------------------------------------------------------- HF Cache protocol
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """key/value_states [1, kv_heads, T, head_dim] of this step's rows -> written to their slots."""
        slots = self.step.write_slots
        self.keys[layer_idx][slots] = key_states[0].transpose(0, 1)
        self.values[layer_idx][slots] = value_states[0].transpose(0, 1)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def attend(self, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query [1, heads, T, head_dim] -> attention output [1, T, heads, head_dim]."""
        step, q = self.step, query[0]
        out = q.new_empty(q.shape[1], q.shape[0], q.shape[2])
        pool_k, pool_v = self.keys[layer], self.values[layer]
        if step.decode:
            k = pool_k[step.decode_slots].permute(0, 2, 1, 3)  # [B, kv_heads, width, head_dim]
            v = pool_v[step.decode_slots].permute(0, 2, 1, 3)
            qd = q[:, step.decode_rows].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, head_dim]
            o = F.scaled_dot_product_attention(qd, k, v, attn_mask=step.decode_mask, scale=scaling, enable_gqa=True)
            out[step.decode_rows] = o[:, :, 0]
        for i in step.chunks:
            s, n, ctx = step.starts[i], step.lengths[i], step.contexts[i]
            k = pool_k[step.slots[i]].transpose(0, 1)  # [kv_heads, ctx, head_dim]
            v = pool_v[step.slots[i]].transpose(0, 1)
            qi = q[:, s:s + n]
            if n == ctx:
                o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scaling, enable_gqa=True)
            else:  # a chunk after cached positions: row j sees positions <= ctx - n + j
                mask = torch.ones(n, ctx, dtype=torch.bool).tril(ctx - n)
                o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
            out[s:s + n] = o.transpose(0, 1)
        return out.unsqueeze(0)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF attention-interface entry: the step's PagedKVCache comes as the ``paged`` keyword."""
    cache: PagedKVCache = kwargs["paged"]
    return cache.attend(module.layer_idx, query, scaling if scaling is not None else query.shape[-1] ** -0.5), None


def use_paged_attention(model: torch.nn.Module) -> None:
    """Make ``model``'s attention layers read a PagedKVCache passed as ``paged=`` (and nothing else:
    without it the model cannot run). Its ``generate()`` then no longer works."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, paged_attention)
    model.config._attn_implementation = ATTENTION
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and cfg is not model.config and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = ATTENTION
