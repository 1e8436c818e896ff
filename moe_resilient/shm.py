"""Shared-memory all-to-all among the members of an ElasticGroup that share one host.

Each generation maps a fresh segment in /dev/shm, named by the job (its store's address and a nonce
drawn once per job, so a later job on a reused port never maps a segment left behind) and the
generation. It holds a doorbell per rank and one slot per ordered pair of ranks
(csrc/process/shm_exchange.cpp: the sender copies a message in and publishes its sequence number
last; the receiver copies it out and acknowledges it; each rings the other's doorbell). A pair's bytes
go in messages of at most ``capacity`` bytes, numbered alike on both sides, so any size passes. The
calls never block: ``ShmWork.wait(timeout)`` polls them and sleeps on its rank's doorbell in between,
so ElasticGroup waits on it exactly as on a gloo work, between slices probing the liveness board and
heartbeats. A sender killed mid-copy never publishes, so no receiver reads torn rows, and a new
generation starts from a fresh segment.
"""

from __future__ import annotations

import datetime
import glob
import math
import mmap
import os
import re
import time

import importlib

import torch

importlib.import_module("moe_resilient._C")  # registers moe_resilient::shm_post / shm_take
_post, _take = torch.ops.moe_resilient.shm_post, torch.ops.moe_resilient.shm_take
_bell, _sleep = torch.ops.moe_resilient.shm_bell, torch.ops.moe_resilient.shm_sleep

HEADER = 64  # seq, ack, bytes; a cache line, so that slots never share one
BELL = 64  # one doorbell word per rank, each on its own cache line
SHM_DIR = "/dev/shm"


def _name(job: str) -> str:
    return "moe_resilient_" + re.sub(r"[^A-Za-z0-9]", "_", job)


def segment_path(job: str, generation: int) -> str:
    return os.path.join(SHM_DIR, f"{_name(job)}_g{generation}")


def unlink_job(job_prefix: str) -> None:
    """Remove every segment of the jobs whose name starts with ``job_prefix`` (the launcher does, for
    its store's address, once its ranks have exited: a killed rank leaves its segments behind)."""
    for path in glob.glob(os.path.join(SHM_DIR, _name(job_prefix) + "*")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class ShmExchange:
    """One generation's segment, mapped by ``rank``, and the message counts of each pair so far."""

    def __init__(self, path: str, rank: int, world_size: int, capacity: int = 1 << 20):
        self.path, self.rank, self.world_size, self.capacity = path, rank, world_size, capacity
        size = world_size * BELL + world_size * world_size * (HEADER + capacity)
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # zero-filled: every slot at seq 0, ack 0
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.segment = torch.frombuffer(self._map, dtype=torch.uint8)
        # live-rank mask [W], at a fixed address: the ranks agreed lost while an exchange waited on them
        # are cleared here (their rows count as none) before the group raises RankFailure
        self.live = torch.ones(world_size, dtype=torch.bool)
        self.sent = [0] * world_size  # messages this rank has posted to each rank
        self.taken = [0] * world_size  # messages this rank has taken from each rank

    def slot(self, src: int, dst: int) -> int:
        return self.world_size * BELL + (src * self.world_size + dst) * (HEADER + self.capacity)

    def all_to_all(self, recv: torch.Tensor, send: torch.Tensor, out_splits: list[int], in_splits: list[int],
                   members: tuple[int, ...]) -> ShmWork:
        """Start an exchange: ``send`` rows grouped by destination member (``in_splits`` rows each) into
        ``recv`` grouped by source member (``out_splits``), both in ``members`` order."""
        row = math.prod(send.shape[1:]) * send.element_size()
        src_bytes = send.contiguous().view(-1).view(torch.uint8)
        dst_bytes = recv.view(-1).view(torch.uint8)
        posts, takes, a, b = [], [], 0, 0
        for r, n_in, n_out in zip(members, in_splits, out_splits):
            out_part = dst_bytes[b: b + n_out * row]
            in_part = src_bytes[a: a + n_in * row]
            if r == self.rank:
                out_part.copy_(in_part)
            else:
                posts.append(self._messages(r, in_part, self.sent, outgoing=True))
                takes.append(self._messages(r, out_part, self.taken, outgoing=False))
            a, b = a + n_in * row, b + n_out * row
        return ShmWork(self, [m for ms in posts for m in ms], [m for ms in takes for m in ms])

    def _messages(self, peer: int, data: torch.Tensor, counts: list[int], outgoing: bool) -> list[tuple]:
        """(slot offset, bytes, seq, peer's doorbell offset, peer) of each message carrying ``data`` to or
        from ``peer`` (one at least)."""
        n = max(1, -(-data.numel() // self.capacity))
        first, counts[peer] = counts[peer] + 1, counts[peer] + n
        offset = self.slot(self.rank, peer) if outgoing else self.slot(peer, self.rank)
        return [(offset, data[i * self.capacity:(i + 1) * self.capacity], first + i, peer * BELL, peer)
                for i in range(n)]

    def close(self, unlink: bool = False) -> None:
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class ShmWork:
    """An exchange in progress, shaped like a gloo work for ElasticGroup._wait: ``wait(timeout)`` makes
    progress until every message is posted and taken, or raises TimeoutError."""

    def __init__(self, exchange: ShmExchange, posts: list[tuple], takes: list[tuple]):
        self.exchange, self.posts, self.takes = exchange, posts, takes

    def _progress(self) -> bool:
        seg, cap = self.exchange.segment, self.exchange.capacity
        post, take = _post, _take
        busy = set()  # a pair's messages go in order: one per slot per pass
        keep = []
        for m in self.posts:
            if m[0] in busy or not post(seg, m[0], cap, m[1], m[2], m[3]):
                keep.append(m)
                busy.add(m[0])
        self.posts, keep, busy = keep, [], set()
        for m in self.takes:
            if m[0] in busy or not take(seg, m[0], m[1], m[2], m[3]):
                keep.append(m)
                busy.add(m[0])
        self.takes = keep
        return not self.posts and not self.takes

    def is_completed(self) -> bool:
        return self._progress()

    def abandon(self) -> bool:
        """Give up (a peer is dead or hung); returns True only if the exchange had in fact completed."""
        return self._progress()

    def drop(self, lost: list[int]) -> None:
        """After agreement: clear the ``lost`` ranks in the live mask; rows still due from them count
        as none (zeroed)."""
        for r in lost:
            self.exchange.live[r] = False
        for _, out, _, _, src in self.takes:
            if src in lost:
                out.zero_()

    def wait(self, timeout: datetime.timedelta | None = None) -> None:
        seg, bell = self.exchange.segment, self.exchange.rank * BELL
        deadline = time.monotonic() + (3600.0 if timeout is None else timeout.total_seconds())
        rung = _bell(seg, bell)  # read before polling: a ring after it ends the sleep below at once
        while not self._progress():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("shared-memory exchange: peers have not posted or taken every message")
            rung = _sleep(seg, bell, rung, int(left * 1e6) + 1)
