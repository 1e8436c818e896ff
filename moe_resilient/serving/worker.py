"""One rank of a collocated serving job (started by ``cluster.ServingCluster``): attention data-parallel
(each rank runs its own requests through its own paged cache), MoE layers expert-parallel over the
ranks. Every rank steps in lockstep, idle or not, because every MoE layer's forward is a collective.

Disaggregated (``--expert-ranks K``): the last K ranks are expert workers. They hold every expert
slot and no request, and each step only serve their experts to the others; the first W - K are
attention workers, holding no expert. Losing an expert worker is repaired from replicas and the
shadow (``StepRunner``); losing an attention worker, by taking its requests over.

Requests come through the job's store: the front door writes ``serve/req/{n}`` then bumps
``serve/count``. Request n belongs to attention rank ``n % A`` while it lives; once the group has
agreed a rank away, each of its requests belongs to live attention rank ``n % len(live)``. Every
rank computes the same owners from the same membership, so a lost rank's requests are each taken
over exactly once.

Per request the owner keeps a journal (its generated tokens, appended before they are streamed) and,
with ``--restore checkpoint``, its KV cache's whole blocks (``KVCheckpointer``, on a writer thread).
A step's tokens are streamed once the blocks completed by the step before are on disk (written
while the step ran), so a survivor taking a decoding request over recomputes at most one block.
It streams the journal's tokens again (the front door keeps each index once), loads the
checkpoint, and recomputes only the positions past it; ``--restore recompute``
re-prefills the prompt and every generated token instead, as vLLM and Dynamo do. A checkpoint that
fails its checks is refused and the request recomputed.

    python -m moe_resilient.serving.worker CHECKPOINT WORK_DIR [--block-tokens 16] [--restore checkpoint]
                                           [--expert-ranks 0]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch

from moe_resilient.group import ElasticGroup
from moe_resilient.kv_checkpoint import KVCheckpointer, KVCheckpointError
from moe_resilient.parallel import StepRunner, parallelize
from moe_resilient.serving import models
from moe_resilient.serving.engine import Engine, Request
from moe_resilient.shadow import ShadowStore, resilient_layers

EVENTS_ENV = "MOE_RESILIENT_SERVE_EVENTS"
POLL_STOP_EVERY = 16  # steps between the members' agreement on stopping


def owner(n: int, attention: tuple[int, ...], members: tuple[int, ...]) -> int:
    """The rank that runs request n under ``members``: its home among the ``attention`` ranks while it
    lives, else one of the live attention ranks."""
    home = attention[n % len(attention)]
    if home in members:
        return home
    live = [r for r in attention if r in members]
    if not live:
        raise RuntimeError("every attention rank is lost: no rank can run requests")
    return live[n % len(live)]


class Journal:
    """Each request's generated tokens, one per line, appended before they are streamed."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self._files: dict[str, int] = {}

    def append(self, request_id: str, tokens: list[int]) -> None:
        fd = self._files.get(request_id)
        if fd is None:
            fd = self._files[request_id] = os.open(os.path.join(self.directory, request_id),
                                                   os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.write(fd, "".join(f"{t}\n" for t in tokens).encode())

    def close(self, request_id: str) -> None:
        fd = self._files.pop(request_id, None)
        if fd is not None:
            os.close(fd)

    def read(self, request_id: str) -> list[int]:
        try:
            with open(os.path.join(self.directory, request_id)) as f:
                return [int(line) for line in f.read().split("\n")[:-1]]  # a torn last line is dropped
        except FileNotFoundError:
            return []


class Worker:
    def __init__(self, checkpoint: str, work_dir: str, *, block_tokens: int, restore: str, num_blocks: int,
                 max_step_tokens: int, expert_ranks: int = 0):
        self.group = ElasticGroup.from_env()
        self.rank, self.world_size = self.group.rank, self.group.world_size
        if not 0 <= expert_ranks < self.world_size:
            raise ValueError(f"--expert-ranks {expert_ranks}: between 0 and {self.world_size - 1}")
        self.attention = tuple(range(self.world_size - expert_ranks))
        holders = list(range(self.world_size - expert_ranks, self.world_size)) if expert_ranks else None
        self.model = models.load(checkpoint, self.group.world_size, expert_ranks=holders)
        self.layers = list(resilient_layers(self.model).values())
        parallelize(self.model, self.group)
        self.engine = Engine(self.model, num_blocks=num_blocks, block_tokens=block_tokens,
                             max_step_tokens=max_step_tokens) if self.rank in self.attention else None
        self.journal = Journal(os.path.join(work_dir, "journal"))
        self.ckpt = KVCheckpointer(os.path.join(work_dir, "kv"), model_id=models.model_id(checkpoint),
                                   layout=self.engine.cache.layout, background=True) \
            if self.engine is not None and restore == "checkpoint" else None
        self.shadow = ShadowStore.from_hf_checkpoint(checkpoint, model=self.model)
        host, port = os.environ[EVENTS_ENV].rsplit(":", 1)
        self.events = socket.create_connection((host, int(port)), timeout=30)
        self.events.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.seen = 0  # requests read from the store
        self.steps = 0

    def send(self, message: dict) -> None:
        self.events.sendall((json.dumps(message) + "\n").encode())

    # ------------------------------------------------------------------------------ requests
    def _spec(self, n: int) -> Request:
        spec = json.loads(self.group.store.get(f"serve/req/{n}"))
        return Request(**spec)

    def poll_requests(self) -> None:
        count = int(self.group.store.add("serve/count", 0))
        for n in range(self.seen, count):
            if owner(n, self.attention, self.group.members) == self.rank:
                self.engine.submit(self._spec(n))
        self.seen = max(self.seen, count)

    def take_over(self, before: tuple[int, ...]) -> None:
        """Run every request the lost ranks owned that now falls to this rank."""
        for n in range(self.seen):
            lost = owner(n, self.attention, before)
            if lost != self.rank and owner(n, self.attention, self.group.members) == self.rank:
                self._adopt(self._spec(n), lost)

    def _adopt(self, r: Request, lost: int) -> None:
        t0 = time.time()
        r.generated = self.journal.read(r.request_id)[: r.max_new_tokens]
        self.send({"rank": self.rank, "tokens": [[r.request_id, i, tok, t0, False]
                                                  for i, tok in enumerate(r.generated)]})
        if r.finished:
            return
        tokens, keys, values, refused = r.tokens, [], [], None
        if self.ckpt is not None:
            try:
                keys, values, saved = self.ckpt.load(r.request_id)
                if saved != tokens[: len(saved)]:
                    raise KVCheckpointError(f"request {r.request_id!r}: the checkpoint's tokens are not the "
                                            "request's")
            except KVCheckpointError as exc:
                keys, values, refused = [], [], str(exc)
        self.engine.restore(r, keys, values)
        self.send({"adopt": {"request_id": r.request_id, "from": lost, "by": self.rank, "tokens": len(tokens),
                             "covered": r.computed, "recomputed": max(0, len(tokens) - 1 - r.computed),
                             "refused": refused, "seconds": time.time() - t0}})

    # ------------------------------------------------------------------------------ steps
    def _step(self, plan, poll_stop: bool):
        if plan:
            logits = self.engine.forward(plan)
        else:  # nothing to run here: still take part in every MoE layer's exchange
            with torch.no_grad():
                empty = torch.zeros(0, self.layers[0].config.hidden_size)
                for layer in self.layers:
                    layer(empty)
            logits = None
        stop = False
        if poll_stop:
            flag = torch.tensor([float(self.group.store.check(["serve/stop"]))])
            stop = bool(self.group.all_reduce(flag, "max")[0] > 0)
        return logits, stop

    def _checkpoint(self) -> None:
        """One file per request per step, of the blocks the step completed."""
        bt = self.engine.cache.block_tokens
        for r in self.engine.running.values():
            start, stop = self.ckpt.saved(r.request_id), r.computed // bt * bt
            if stop > start:
                keys, values = self.engine.cache.read(r.blocks, start, stop)
                self.ckpt.save_blocks(r.request_id, start, r.tokens[start:stop], keys, values)

    def serve(self) -> None:
        self.group.start()
        runner = StepRunner(self.model, self.group, shadow=self.shadow, shadow_current=True)
        self.send({"ready": self.rank, "pid": os.getpid()})
        stop = False
        while not stop:
            plan = []
            if self.engine is not None:
                self.poll_requests()
                plan = self.engine.schedule()
                if not plan:
                    time.sleep(0.001)  # an idle rank leaves the cores to the busy ones
            members = self.group.members
            logits, stop = runner(self._step, plan, self.steps % POLL_STOP_EVERY == 0)
            self.steps += 1
            if self.engine is not None:
                self._release(plan, logits)
                if self.group.members != members:
                    self.take_over(members)
        if self.ckpt is not None:
            self.ckpt.flush()
        self.group.finish()

    def _release(self, plan, logits) -> None:
        """Stream a committed step's tokens (journaled first, once the step before's blocks are on disk),
        then checkpoint the blocks it completed."""
        events = self.engine.advance(plan, logits) if plan else []
        if self.ckpt is not None:
            self.ckpt.flush()  # the blocks of the step before: written while this one ran
        for e in events:
            self.journal.append(e.request_id, [e.token])
        if events:
            self.send({"rank": self.rank, "tokens": [[e.request_id, e.index, e.token, e.time, e.finished]
                                                     for e in events]})
        for e in (e for e in events if e.finished):
            self.journal.close(e.request_id)
            if self.ckpt is not None:
                self.ckpt.discard(e.request_id)
        if self.ckpt is not None:
            self._checkpoint()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("work_dir")
    parser.add_argument("--block-tokens", type=int, default=16)
    parser.add_argument("--restore", choices=["checkpoint", "recompute"], default="checkpoint")
    parser.add_argument("--num-blocks", type=int, default=1024)
    parser.add_argument("--max-step-tokens", type=int, default=128)
    parser.add_argument("--expert-ranks", type=int, default=0, help="the last N ranks serve experts only")
    a = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    Worker(a.checkpoint, a.work_dir, block_tokens=a.block_tokens, restore=a.restore, num_blocks=a.num_blocks,
           max_step_tokens=a.max_step_tokens, expert_ranks=a.expert_ranks).serve()


if __name__ == "__main__":
    main()
