"""A continuous-batching engine for an HF causal LM (MoE blocks swapped and parallelized or not).

Each ``step()`` runs one forward over every scheduled request's next tokens, flattened into one row
(``paged.py``): each running request's last sampled token, and chunks of admitted requests' prompts
(chunked prefill, at most ``max_step_tokens`` rows a step). A request whose chunk reaches its last
known token samples its next one. A request restored from a KV checkpoint is the same case: its
cache holds positions ``0..computed-1`` and its tokens past them are scheduled as a chunk.

Sampling is greedy (``temperature == 0``) or seeded: the token at index i of a request is drawn with
a generator seeded by (``seed``, i), so a request restored on another process, in another batch,
draws the same tokens. A request is admitted once the pool has blocks for its prompt plus
``max_new_tokens``, so a running request never waits for memory.

    engine = Engine(model, num_blocks=256)
    engine.submit(Request("a", prompt=[5, 7, 9], max_new_tokens=16))
    while engine.busy:
        for event in engine.step(): print(event.request_id, event.index, event.token)
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from moe_resilient.serving.paged import PagedKVCache, StepRows, use_paged_attention


@dataclass
class Request:
    """``prompt`` token ids; ``max_new_tokens`` to generate (fewer if ``eos`` is drawn)."""

    request_id: str
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    eos: int | None = None
    generated: list[int] = field(default_factory=list)
    computed: int = 0  # positions whose keys and values are in the cache
    blocks: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # time.time() of each generated token

    def __post_init__(self):
        if not self.prompt:
            raise ValueError(f"request {self.request_id!r}: empty prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.request_id!r}: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"request {self.request_id!r}: temperature must be >= 0, got {self.temperature}")

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def finished(self) -> bool:
        return len(self.generated) >= self.max_new_tokens or (
            self.eos is not None and bool(self.generated) and self.generated[-1] == self.eos)

    def spec(self) -> dict:
        """What a survivor needs to take the request over (JSON)."""
        return {"request_id": self.request_id, "prompt": self.prompt, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "seed": self.seed, "eos": self.eos}


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    index: int  # in the request's generated tokens
    token: int
    time: float
    finished: bool


def sample(logits: torch.Tensor, request: Request, index: int) -> int:
    """logits [V] -> the request's token at ``index``: argmax, or a draw seeded by (seed, index)."""
    if request.temperature == 0:
        return int(logits.argmax())
    g = torch.Generator().manual_seed((request.seed * 1_000_003 + index) % (1 << 63))
    probs = torch.softmax(logits.float() / request.temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=g))


class Engine:
    """Continuous batching over a paged KV cache of ``num_blocks`` blocks of ``block_tokens``."""

    def __init__(self, model: torch.nn.Module, *, num_blocks: int = 512, block_tokens: int = 16,
                 max_step_tokens: int = 256, max_running: int = 64):
        use_paged_attention(model)
        self.model, self.max_step_tokens, self.max_running = model, max_step_tokens, max_running
        self.cache = PagedKVCache(model, num_blocks, block_tokens)
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}
        self.device = next(model.parameters()).device

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def submit(self, request: Request) -> None:
        """Queue a request; a request that could never fit the pool is refused here."""
        if request.request_id in self.running or any(r.request_id == request.request_id for r in self.waiting):
            raise ValueError(f"request {request.request_id!r} is already queued or running")
        need = self._blocks_needed(request)
        if need > self.cache.num_blocks:
            raise ValueError(f"request {request.request_id!r} needs {need} blocks, the pool has "
                             f"{self.cache.num_blocks}")
        self.waiting.append(request)

    def _blocks_needed(self, r: Request) -> int:
        return self.cache.blocks_for(len(r.prompt) + r.max_new_tokens)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            r = self.waiting[0]
            need = self._blocks_needed(r)
            if need > len(self.cache.free):
                return
            self.waiting.popleft()
            r.blocks = self.cache.allocate(need)
            self.running[r.request_id] = r

    def restore(self, request: Request, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Run ``request`` (its ``generated`` tokens already streamed) from keys and values of its first
        positions, per layer [kv_heads, n, head_dim]: only positions n.. are recomputed."""
        r = request
        r.blocks = self.cache.allocate(self._blocks_needed(r))
        n = keys[0].shape[1] if keys else 0
        if n:
            self.cache.write(r.blocks, 0, keys, values)
        r.computed = min(n, len(r.tokens) - 1)  # the last known token is always run: it gives the next
        self.running[r.request_id] = r

    def schedule(self) -> list[tuple[Request, int]]:
        """(request, rows this step): every decoding request one row, then chunks to the budget, those
        of restored requests first."""
        self._admit()
        plan, budget = [], self.max_step_tokens
        for r in self.running.values():
            pending = len(r.tokens) - r.computed
            if pending == 1:
                plan.append((r, 1))
                budget -= 1
        # restored requests (already streaming) before prompts still prefilling
        for r in sorted(self.running.values(), key=lambda r: not r.generated):
            pending = len(r.tokens) - r.computed
            if pending > 1 and budget > 0:
                plan.append((r, min(pending, budget)))
                budget -= plan[-1][1]
        return plan

    def rows(self, plan: list[tuple[Request, int]]) -> tuple[torch.Tensor, torch.Tensor, StepRows]:
        """(ids [1, T], positions [1, T], StepRows) of a plan."""
        ids, pos, starts, lengths, contexts, slots, writes, at = [], [], [], [], [], [], [], 0
        for r, n in plan:
            ctx = r.computed + n
            ids += r.tokens[r.computed:ctx]
            pos += range(r.computed, ctx)
            starts.append(at)
            lengths.append(n)
            contexts.append(ctx)
            slots.append(self.cache.slots(r.blocks, 0, ctx))
            writes.append(slots[-1][r.computed:])
            at += n
        rows = StepRows(starts, lengths, contexts, slots, torch.cat(writes))
        return torch.tensor([ids], device=self.device), torch.tensor([pos], device=self.device), rows

    @torch.no_grad()
    def forward(self, plan: list[tuple[Request, int]]) -> torch.Tensor:
        """Logits [len(plan), V] at each planned request's last row. Writes only the planned rows'
        slots, so running it again (after a failed attempt) gives the same result."""
        ids, pos, rows = self.rows(plan)
        last = torch.tensor([s + n - 1 for s, n in zip(rows.starts, rows.lengths)], device=self.device)
        self.cache.step = rows
        try:
            out = self.model(input_ids=ids, position_ids=pos, cache=self.cache, use_cache=True, paged=self.cache,
                             logits_to_keep=last)
        finally:
            self.cache.step = None
        return out.logits[0]

    def advance(self, plan: list[tuple[Request, int]], logits: torch.Tensor) -> list[TokenEvent]:
        """Commit a step's result: positions computed, a token sampled for every request whose rows
        reached its last known token; finished requests release their blocks."""
        events, now = [], time.time()
        for (r, n), row in zip(plan, logits):
            r.computed += n
            if r.computed < len(r.tokens):
                continue  # a prompt chunk: more to prefill
            index = len(r.generated)
            r.generated.append(sample(row, r, index))
            r.times.append(now)
            events.append(TokenEvent(r.request_id, index, r.generated[-1], now, r.finished))
            if r.finished:
                self.cache.release(r.blocks)
                del self.running[r.request_id]
        return events

    def step(self) -> list[TokenEvent]:
        plan = self.schedule()
        if not plan:
            return []
        return self.advance(plan, self.forward(plan))

    def generate(self, requests: list[Request]) -> dict[str, list[int]]:
        """Run ``requests`` to completion: {request_id: generated tokens}."""
        for r in requests:
            self.submit(r)
        while self.busy:
            self.step()
        return {r.request_id: r.generated for r in requests}
