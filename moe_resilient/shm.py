"""Shared-memory all-to-all among the members of an ElasticGroup that share one host.

Each generation maps a fresh segment in /dev/shm, named by the job (its store's address and a nonce
drawn once per job, so a later job on a reused port never maps a segment left behind) and the
generation. It holds a doorbell per rank and one slot per ordered pair of ranks
(csrc/process/shm_exchange.cpp: the sender copies a message in and publishes its sequence number
last; the receiver copies it out and acknowledges it; each rings the other's doorbell). A pair's bytes
go in messages of at most ``capacity`` bytes, numbered alike on both sides, so any size passes. An
exchange runs in C++ for a slice of its deadline at a time (``ShmWork.wait(timeout)``), sleeping on its
rank's doorbell, or on a peer's death seen by the liveness-board watchers, while nothing can move; so
ElasticGroup waits on it exactly as on a gloo work, between slices probing the liveness board and
heartbeats. A sender killed mid-copy never publishes, so no receiver reads torn rows, and a new
generation starts from a fresh segment. A rank that gives up on an exchange withdraws the messages no
peer has taken, so a rank that wakes after the others moved on (it was hung) cannot complete it.
"""

from __future__ import annotations

import datetime
import glob
import math
import mmap
import os
import re

import importlib

import torch

importlib.import_module("moe_resilient._C")  # registers moe_resilient::shm_post / shm_take / shm_exchange
_post, _take = torch.ops.moe_resilient.shm_post, torch.ops.moe_resilient.shm_take
_exchange, _withdraw = torch.ops.moe_resilient.shm_exchange, torch.ops.moe_resilient.shm_withdraw

HEADER = 64  # seq, ack, bytes; a cache line, so that slots never share one
BELL = 64  # one doorbell line per rank: the word peers ring, and whether its owner sleeps
SPIN_US = 300  # how long a waiting rank yields its core before it sleeps
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
        work = ShmWork(self, src_bytes, dst_bytes)
        a = b = 0
        for r, n_in, n_out in zip(members, in_splits, out_splits):
            if r == self.rank:
                dst_bytes[b: b + n_out * row].copy_(src_bytes[a: a + n_in * row])
            else:
                work.add(r, a, n_in * row, b, n_out * row)
            a, b = a + n_in * row, b + n_out * row
        return work.ready()

    def messages(self, nbytes: int) -> int:
        """How many messages carry ``nbytes`` between a pair (one at least, as in C++)."""
        return max(1, -(-nbytes // self.capacity))

    def close(self, unlink: bool = False) -> None:
        if unlink:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class ShmWork:
    """An exchange in progress, shaped like a gloo work for ElasticGroup._wait: ``wait(timeout)`` makes
    progress (in C++, sleeping on this rank's doorbell) until every message is posted and taken, or
    raises TimeoutError. ``state`` keeps its progress between calls: messages posted to and taken from
    each peer."""

    def __init__(self, exchange: ShmExchange, send: torch.Tensor, recv: torch.Tensor):
        self.exchange, self.send, self.recv = exchange, send, recv
        self.peers, self.send_at, self.send_bytes, self.post_seqs = [], [], [], []
        self.recv_at, self.recv_bytes, self.take_seqs = [], [], []

    def add(self, peer: int, send_at: int, send_bytes: int, recv_at: int, recv_bytes: int) -> None:
        """Bytes [send_at, + send_bytes) of ``send`` go to ``peer``; [recv_at, + recv_bytes) of ``recv``
        come from it."""
        ex = self.exchange
        self.peers.append(peer)
        self.send_at.append(send_at)
        self.send_bytes.append(send_bytes)
        self.post_seqs.append(ex.sent[peer] + 1)
        self.recv_at.append(recv_at)
        self.recv_bytes.append(recv_bytes)
        self.take_seqs.append(ex.taken[peer] + 1)
        ex.sent[peer] += ex.messages(send_bytes)
        ex.taken[peer] += ex.messages(recv_bytes)

    def ready(self) -> ShmWork:
        self.state = torch.zeros(2 * len(self.peers), dtype=torch.long)
        return self

    def _run(self, timeout_s: float) -> bool:
        ex = self.exchange
        return _exchange(ex.segment, ex.rank, ex.world_size, ex.capacity, self.peers, self.send, self.send_at,
                         self.send_bytes, self.post_seqs, self.recv, self.recv_at, self.recv_bytes, self.take_seqs,
                         self.state, int(timeout_s * 1e6), SPIN_US)

    def is_completed(self) -> bool:
        return self._run(0.0)

    def abandon(self) -> bool:
        """Give up (a peer is dead or hung); returns True only if the exchange had in fact completed.
        Otherwise withdraws every message no peer has taken, so that no rank completes it later."""
        if self._run(0.0):
            return True
        ex = self.exchange
        _withdraw(ex.segment, ex.rank, ex.world_size, ex.capacity, self.peers, self.post_seqs, self.state)
        return False

    def drop(self, lost: list[int]) -> None:
        """After agreement: clear the ``lost`` ranks in the live mask; bytes still due from them count
        as none (zeroed)."""
        taken = self.state[len(self.peers):].tolist()
        for i, peer in enumerate(self.peers):
            if peer in lost:
                done = min(taken[i] * self.exchange.capacity, self.recv_bytes[i])
                self.recv[self.recv_at[i] + done: self.recv_at[i] + self.recv_bytes[i]].zero_()
        for r in lost:
            self.exchange.live[r] = False

    def wait(self, timeout: datetime.timedelta | None = None) -> None:
        if not self._run(3600.0 if timeout is None else timeout.total_seconds()):
            raise TimeoutError("shared-memory exchange: peers have not posted or taken every message")
