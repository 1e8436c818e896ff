"""Per-request KV-cache checkpoints: incremental, asynchronous, fingerprinted, refused on a mismatch.

A request's cache is checkpointed in whole blocks of ``block_tokens`` tokens: keys and values of
every layer for those positions, with the token ids they were computed from. Each save writes only
blocks completed since the last one, as one safetensors file (written aside, then renamed; named by
its first and end token) whose metadata holds the fingerprint (model, cache layout, request id,
first token, token count) and a checksum of every tensor (the shadow store's,
csrc/cpu/checksum.cpp): ``save`` a file per block of an HF cache, ``save_blocks`` a file for a
serving engine's step. With ``background=True`` the new blocks are copied at once and written on a
thread (``flush`` waits).

``load`` / ``restore`` read the request's files back in order and refuse
(``KVCheckpointError``, naming the request, block and what differs) a file of another model, layout
or request, one that does not continue the block before it, or one whose bytes changed. The caller
then recomputes that request from its tokens instead. After a restore only the tokens past the last
whole block need recomputing: fewer than ``block_tokens``.

    ckpt = KVCheckpointer(directory, model_id="mixtral-8x7b@rev", layout=KVLayout.of(model, block_tokens=16))
    ckpt.save("req-7", cache, token_ids)       # after any decode step; writes only new whole blocks
    cache, tokens = ckpt.restore("req-7")      # on a survivor: continue decoding from tokens[len(cache):]
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import threading
from dataclasses import asdict, dataclass

import torch
from safetensors import safe_open

from moe_resilient.shadow import _atomic_save, checksum


class KVCheckpointError(ValueError):
    """A checkpoint that must not be restored: foreign, out of order, or corrupt."""


@dataclass(frozen=True)
class KVLayout:
    """What a cache block's tensors look like: [kv_heads, block_tokens, head_dim] of ``dtype`` for
    each of ``layers`` layers, keys and values."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    block_tokens: int

    @classmethod
    def of(cls, model: torch.nn.Module, block_tokens: int = 16) -> KVLayout:
        """The layout of an HF causal LM's cache (its config and parameter dtype)."""
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return cls(cfg.num_hidden_layers, kv_heads, head_dim, dtype, block_tokens)


class KVCheckpointer:
    """Checkpoints of requests' caches under ``directory`` (files or a /dev/shm folder)."""

    def __init__(self, directory: str, *, model_id: str, layout: KVLayout, background: bool = False):
        if layout.block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {layout.block_tokens}")
        self.directory, self.model_id, self.layout = directory, model_id, layout
        os.makedirs(directory, exist_ok=True)
        self._saved: dict[str, int] = {}  # request -> tokens covered by blocks written or queued
        self._queue: queue.Queue | None = None
        self._error: BaseException | None = None
        if background:
            self._queue = queue.Queue()
            threading.Thread(target=self._writer, name="kv-checkpoint", daemon=True).start()

    # ----------------------------------------------------------------------------------- save
    def save(self, request_id: str, cache, tokens) -> int:
        """Checkpoint the whole blocks of ``cache`` (an HF DynamicCache of batch 1) not yet saved;
        ``tokens``: the ids its positions were computed from (at least as many). Returns the tokens
        the request's checkpoint covers."""
        _check_id(request_id)
        length = cache.get_seq_length()
        if len(tokens) < length:
            raise ValueError(f"request {request_id!r}: {len(tokens)} token ids for a cache of {length} positions")
        block = self.layout.block_tokens
        done = self._saved.get(request_id, 0)
        for start in range(done, length // block * block, block):  # a file per block
            self.save_blocks(request_id, start, tokens[start:start + block],
                             [layer.keys[0, :, start:start + block] for layer in cache.layers],
                             [layer.values[0, :, start:start + block] for layer in cache.layers])
        return self._saved.get(request_id, 0)

    def saved(self, request_id: str) -> int:
        """Tokens covered by the blocks this checkpointer has written or queued for the request."""
        return self._saved.get(request_id, 0)

    def save_blocks(self, request_id: str, start: int, tokens, keys: list, values: list) -> None:
        """Checkpoint the request's next whole blocks, from position ``start`` (blocks are saved in
        order) as one file: their token ids and, per layer, keys and values [kv_heads, len(tokens),
        head_dim]. They are copied before this returns."""
        _check_id(request_id)
        if start != self._saved.get(request_id, 0):
            raise ValueError(f"request {request_id!r}: blocks at {start} saved after {self._saved.get(request_id, 0)} "
                             "tokens (blocks go in order)")
        if not tokens or len(tokens) % self.layout.block_tokens:
            raise ValueError(f"request {request_id!r}: {len(tokens)} tokens is not a whole number of "
                             f"{self.layout.block_tokens}-token blocks")
        item = (request_id, start, [int(t) for t in tokens], [k.detach().to("cpu", copy=True) for k in keys],
                [v.detach().to("cpu", copy=True) for v in values])
        self._do(functools.partial(self._write, *item))
        self._saved[request_id] = start + len(tokens)

    def _do(self, work) -> None:
        if self._queue is None:
            work()
        else:
            self._queue.put(work)

    def flush(self) -> None:
        """Wait until every queued block is written; re-raises a writer's error."""
        if self._queue is not None:
            self._queue.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _writer(self) -> None:
        while True:
            work = self._queue.get()
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - handed to flush()
                self._error = exc
            finally:
                self._queue.task_done()

    def _write(self, request_id: str, start: int, tokens: list[int], keys: list, values: list) -> None:
        tensors = {"tokens": torch.tensor(tokens, dtype=torch.int64)}
        for i, (k, v) in enumerate(zip(keys, values)):
            tensors[f"k{i}"], tensors[f"v{i}"] = k.contiguous(), v.contiguous()
        self._check_shapes(request_id, start, tensors, len(tokens))
        meta = self._fingerprint(request_id, start, len(tokens))
        meta["checksums"] = json.dumps({name: checksum(t) for name, t in tensors.items()})
        _atomic_save(tensors, self._path(request_id, start, start + len(tokens)), meta)

    # ----------------------------------------------------------------------------------- restore
    def covered(self, request_id: str) -> int:
        """Tokens covered by the request's blocks on disk (in order from 0, unchecked)."""
        stops = self._segments(request_id)
        n = 0
        while n in stops:
            n = stops[n]
        return n

    def load(self, request_id: str) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
        """(keys, values per layer [kv_heads, n, head_dim], the n token ids) of the request's
        checkpoint, every block checked first; raises KVCheckpointError if there is none or any block
        is foreign, out of order or corrupt."""
        _check_id(request_id)
        n = self.covered(request_id)
        if n == 0:
            raise KVCheckpointError(f"request {request_id!r}: no checkpoint in {self.directory}")
        tokens, keys, values = [], [[] for _ in range(self.layout.layers)], [[] for _ in range(self.layout.layers)]
        segments, start = self._segments(request_id), 0
        while start < n:
            block = self._read(request_id, start, segments[start])
            start = segments[start]
            tokens += block["tokens"].tolist()
            for i in range(self.layout.layers):
                keys[i].append(block[f"k{i}"])
                values[i].append(block[f"v{i}"])
        self._saved[request_id] = n
        return [torch.cat(k, dim=1) for k in keys], [torch.cat(v, dim=1) for v in values], tokens

    def restore(self, request_id: str, config=None):
        """(DynamicCache, token ids) of the request's checkpoint (``load``, into an HF cache)."""
        from transformers import DynamicCache

        keys, values, tokens = self.load(request_id)
        cache = DynamicCache(config=config) if config is not None else DynamicCache()
        for i, (k, v) in enumerate(zip(keys, values)):
            cache.update(k[None], v[None], i)
        return cache, tokens

    def discard(self, request_id: str) -> None:
        """Delete the request's blocks (it finished), after its queued writes."""
        _check_id(request_id)
        self._saved.pop(request_id, None)
        self._do(functools.partial(self._delete, request_id))

    def _delete(self, request_id: str) -> None:
        for start, stop in self._segments(request_id).items():
            os.unlink(self._path(request_id, start, stop))

    def _read(self, request_id: str, start: int, stop: int) -> dict[str, torch.Tensor]:
        path = self._path(request_id, start, stop)
        where = f"request {request_id!r}, block at token {start} ({path})"
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:  # noqa: BLE001 - a truncated or garbled file
            raise KVCheckpointError(f"{where}: unreadable: {exc}") from None
        want = self._fingerprint(request_id, start, stop - start)
        for field, value in want.items():
            if meta.get(field) != value:
                raise KVCheckpointError(f"{where}: {field} is {meta.get(field)!r}, expected {value!r}")
        sums = json.loads(meta.get("checksums", "{}"))
        if set(sums) != set(tensors):
            raise KVCheckpointError(f"{where}: tensors {sorted(tensors)} do not match their checksums {sorted(sums)}")
        for name, t in tensors.items():
            if checksum(t) != sums[name]:
                raise KVCheckpointError(f"{where}: tensor {name!r} fails its checksum (the bytes changed)")
        self._check_shapes(request_id, start, tensors, stop - start, error=KVCheckpointError)
        return tensors

    # ----------------------------------------------------------------------------------- helpers
    def _fingerprint(self, request_id: str, start: int, count: int) -> dict[str, str]:
        return {"model": self.model_id, "layout": json.dumps(asdict(self.layout), sort_keys=True),
                "request": request_id, "start": str(start), "count": str(count)}

    def _check_shapes(self, request_id, start, tensors, count, error=ValueError) -> None:
        lay = self.layout
        shape = [lay.kv_heads, count, lay.head_dim]
        for i in range(lay.layers):
            for name in (f"k{i}", f"v{i}"):
                t = tensors.get(name)
                if t is None or list(t.shape) != shape or str(t.dtype).removeprefix("torch.") != lay.dtype:
                    got = None if t is None else (list(t.shape), str(t.dtype))
                    raise error(f"request {request_id!r}, block at token {start}: {name} is {got}, layout wants "
                                f"{shape} {lay.dtype}")
        if tensors["tokens"].shape != (count,):
            raise error(f"request {request_id!r}, block at token {start}: {tensors['tokens'].shape[0]} token ids, "
                        f"expected {count}")

    def _path(self, request_id: str, start: int, stop: int) -> str:
        return os.path.join(self.directory, f"{request_id}.{start:09d}-{stop:09d}.safetensors")

    def _segments(self, request_id: str) -> dict[int, int]:
        """{start: stop} of the request's files."""
        pattern = re.compile(re.escape(request_id) + r"\.(\d{9})-(\d{9})\.safetensors$")
        return {int(m.group(1)): int(m.group(2)) for name in os.listdir(self.directory) if (m := pattern.match(name))}


def _check_id(request_id: str) -> None:
    if not isinstance(request_id, str) or not re.fullmatch(r"[A-Za-z0-9_\-]{1,128}", request_id):
        raise ValueError(f"request id {request_id!r}: use 1-128 letters, digits, '-' or '_'")
