"""Failure detection for ElasticGroup: who among the members is dead or hung.

Each process is one *incarnation* of its rank (``inc/{r}`` counts them): a process restarted with an
old rank id (torchrun restarts, the launcher's respawns) is a new incarnation, and every key a rank
writes about itself names its incarnation, so a successor's heartbeat never makes its dead predecessor
look alive. Four signals, cheapest first:

- the launcher's liveness board (same host, at once: see liveness.py);
- a death notice ``dead/{r}/{inc}``: posted by the launcher that reaped the process, or by the
  successor incarnation as it starts (torchrun posts none);
- a heartbeat ``hb/{r}/{inc}`` that stops advancing for ``heartbeat_timeout`` (a hung or vanished
  host). The heartbeat runs on a native thread with its own store connection
  (csrc/process/heartbeat.cpp): it needs no GIL, so a rank that is merely slow, even inside a long C
  call that holds the GIL, keeps beating and is never evicted for it.
"""

from __future__ import annotations

import importlib
import time
from typing import Callable

import torch
import torch.distributed as dist

from moe_resilient.liveness import LivenessBoard

Members = dict  # global rank -> incarnation


class FailureDetector:
    """Heartbeats of this incarnation, and the liveness of others. ``connect`` opens a new store
    connection, under ``prefix`` of the store at ``host:port`` (the heartbeat thread has its own).
    Each beat also reads ``joins_key`` (``joins()``)."""

    def __init__(self, connect: Callable[[], dist.Store], rank: int, incarnation: int, *, host: str, port: int,
                 prefix: str, interval: float, timeout: float, joins_key: str):
        self.rank, self.incarnation = rank, incarnation
        self.interval, self.timeout = interval, timeout
        self.store = connect()
        self.board = LivenessBoard.from_env()
        importlib.import_module("moe_resilient._C")  # registers torch.classes.moe_resilient.Heartbeat
        self._heartbeat = torch.classes.moe_resilient.Heartbeat(
            host, port, f"{prefix}/hb/{rank}/{incarnation}", f"{prefix}/{joins_key}", interval)

    def start(self) -> None:
        """Announce this incarnation (and its predecessor's death), then beat until ``stop``."""
        if self.board:  # before anything can see this rank as a member
            self.board.hold(self.rank)
        self.store.set(f"hb/{self.rank}/{self.incarnation}", "0")
        if self.incarnation > 1:  # whatever became of our predecessor, it is gone now
            self.store.set(f"dead/{self.rank}/{self.incarnation - 1}", "1")
        self._heartbeat.start()

    def stop(self) -> None:
        self._heartbeat.stop()

    def joins(self) -> int:
        """The join counter as of the last beat."""
        return self._heartbeat.joins()

    # ----------------------------------------------------------------------------------- probes
    def heartbeats(self, members: Members) -> dict[int, bytes]:
        """Each member's heartbeat counter as the store holds it now (one round trip)."""
        ranks = list(members)
        return dict(zip(ranks, self.store.multi_get([f"hb/{r}/{members[r]}" for r in ranks])))

    def off_board(self, ranks) -> list[int]:
        """Those of ``ranks`` on this host's liveness board whose slot nobody holds (a local probe)."""
        return self.board.dead(list(ranks)) if self.board else []

    def noticed_dead(self, members: Members) -> set[int]:
        """Members with a death notice for their incarnation."""
        return {r for r in members if self.store.check([f"dead/{r}/{members[r]}"])}

    def known_dead(self, members: Members) -> set[int]:
        """Members off the liveness board or with a death notice."""
        gone = set(self.off_board(members))
        return gone | self.noticed_dead({r: i for r, i in members.items() if r not in gone})


class Stall:
    """Members' heartbeats watched over time: ``poll`` names those whose counter has not moved for
    longer than the detector's timeout. A heartbeat that moves restarts its member's clock, so a rank
    that hangs after a first reading is still caught, and one that beats is never named."""

    def __init__(self, detector: FailureDetector, members: Members):
        self.detector, self.members = detector, dict(members)
        beats, now = detector.heartbeats(self.members), time.monotonic()
        self.seen = {r: (beats[r], now) for r in self.members}

    def poll(self, ranks=None) -> list[int]:
        """One store read (of ``ranks``, default every member): the stalled ones."""
        ranks = [r for r in (self.members if ranks is None else ranks) if r in self.members]
        if not ranks:
            return []
        beats, now = self.detector.heartbeats({r: self.members[r] for r in ranks}), time.monotonic()
        stalled = []
        for r in ranks:
            last, since = self.seen[r]
            if beats[r] != last:
                self.seen[r] = (beats[r], now)
            elif now - since > self.detector.timeout:
                stalled.append(r)
        return stalled
