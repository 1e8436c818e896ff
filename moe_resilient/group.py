"""ElasticGroup: a process group whose membership changes at run time.

Membership moves in generations, all kept in a TCPStore that lives outside the workers (torchrun's
agent store, or the ``moe-resilient launch`` process), so any rank, rank 0 included, can die::

    gen                      current generation g
    gen/{g}/members          JSON list of the global ranks in generation g
    gen/{g}/pg/...           gloo rendezvous of generation g (a fresh PrefixStore each time)
    gen/{g}/checkin_bits     bit r set: survivor r reached agreement after a failure in generation g
    gen/{g}/decision         members of generation g+1 (compare_set: the first proposal wins, so
                             every survivor adopts the same membership)
    gen/{g}/here, here/{r}   count of members of g that have shown up before its gloo rendezvous
    hb/{r}                   heartbeat counter of rank r (control channel, own connection/thread)
    dead/{r}                 set by a launcher that saw rank r exit
    join/count, join/seq/{i} a replacement asks to be admitted (i-th request names its rank)
    gen/{g}/admitted         join requests admitted up to generation g

Failure detection: a collective that errors (a crashed peer's connections reset, once the kernel has
freed its memory); while a collective waits, a peer gone from the launcher's liveness board (at once,
see liveness.py), a member's heartbeat that stops advancing (a hung peer), a launcher's death notice,
or a survivor that has already begun agreement. A slow peer whose heartbeat advances is waited for.
Survivors check in and propose those who checked in and are not known dead since; the first proposal
stored wins. A rank left out of the decision is fenced: it gets FencedError and never touches the new
generation's communicator. A member named in the decision that dies before the new gloo group forms
(a node lost rank by rank) is found missing before the rendezvous, which would wait for it for gloo's
whole deadline, and the survivors agree once more. The old gloo group is shut down a second later on a
background thread (see ``_retire``), off the recovery pause.

Joins ride the data path: ``exchange_counts`` (the all-to-all of split sizes that every EP step does
anyway) carries one extra word, the number of join requests each rank has seen, so all members learn
the same value in the same step with no extra synchronisation, and admit at that step's end.
"""

from __future__ import annotations

import datetime
import json
import os
import threading
import time

import torch
import torch.distributed as dist

from moe_resilient.liveness import LivenessBoard


class RankFailure(RuntimeError):
    """A collective met dead or hung ranks. ``lost_ranks`` is the agreed dead set; the group has
    already moved to ``generation`` without them."""

    def __init__(self, lost_ranks: list[int], generation: int, cause: str = ""):
        self.lost_ranks = list(lost_ranks)
        self.generation = generation
        super().__init__(f"lost ranks {self.lost_ranks}; group rebuilt as generation {generation}. {cause}".strip())


class FencedError(RuntimeError):
    """This rank was excluded from the group (presumed dead) and may not take part any more."""


def _retire(pg, delay: float = 1.0) -> None:
    """Tear down an old generation's gloo group later, on a background thread: teardown joins worker
    threads and closes sockets, 20-30 ms of CPU on a loaded host; done at once (or even concurrently)
    it lengthens the recovery pause by as much, so it waits until serving has resumed."""
    box = [pg]

    def run():
        time.sleep(delay)
        old = box.pop()
        try:
            old.shutdown()
        except Exception:  # a group with a dead peer may refuse a clean shutdown: dropping it is enough
            pass

    threading.Thread(target=run, name="elastic-retire-pg", daemon=True).start()


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


class ElasticGroup:
    """Mutable-membership wrapper over gloo (CPU) process groups.

    ``rank`` is a stable global id in [0, world_size); ``world_size`` is the largest membership, which
    fixes every shape. Collectives run over the current generation's members only.

    ``heartbeat_timeout`` (s): a member whose heartbeat has not advanced for this long is presumed dead
    or hung. ``timeout`` (s): the longest a collective waits on members that are all alive by
    heartbeat (a live rank stuck outside the collective). ``agree_timeout`` (s): the longest
    agreement waits for a survivor to check in.
    """

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        *,
        timeout: float = 30.0,
        heartbeat_interval: float = 0.05,
        heartbeat_timeout: float = 1.0,
        agree_timeout: float = 5.0,
        prefix: str = "moe_resilient",
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.rank, self.world_size = rank, world_size
        self.timeout, self.heartbeat_interval = timeout, heartbeat_interval
        self.poll_interval = min(2 * heartbeat_interval, heartbeat_timeout / 4)
        # Same-host ranks are probed on the launcher's liveness board (see liveness.py) every slice.
        self._board = LivenessBoard.from_env()
        self._slice = _timedelta(0.002 if self._board else self.poll_interval)
        self.heartbeat_timeout, self.agree_timeout = heartbeat_timeout, agree_timeout
        self._host, self._port, self._prefix = host, port, prefix
        self.store = self._connect()
        self.generation = -1
        self.members: tuple[int, ...] = ()
        self._pg = None
        self.joined = False  # True when this process entered as a replacement
        self._seen_joins = 0  # join requests this rank has seen (background thread)
        self._admitted = 0  # join requests admitted so far (agreed in-band)
        self._admit_target = 0
        self._stop = threading.Event()
        self._hb_thread = threading.Thread(target=self._heartbeat, name="elastic-heartbeat", daemon=True)
        self._hb_thread.start()
        self.last_failure_detect_s: float | None = None

    @classmethod
    def from_env(cls, **kwargs) -> ElasticGroup:
        """From torchrun's (or ``moe-resilient launch``'s) environment: MASTER_ADDR/PORT, RANK,
        WORLD_SIZE. The store at MASTER_ADDR:MASTER_PORT must be hosted by the agent/launcher."""
        try:
            host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except KeyError as exc:
            raise RuntimeError(f"ElasticGroup.from_env: {exc.args[0]} is not set") from None
        return cls(host, port, rank, world, **kwargs)

    def _connect(self) -> dist.Store:
        client = dist.TCPStore(self._host, self._port, is_master=False, timeout=_timedelta(30), wait_for_workers=False)
        return dist.PrefixStore(self._prefix, client)

    # ----------------------------------------------------------------------------------- membership
    def start(self) -> ElasticGroup:
        """Form generation 0 with every rank, or, if the group already runs, ask to be admitted and
        wait until a generation lists this rank."""
        if self._board:  # before anything can see this rank as a member
            self._board.hold(self.rank)
        self.store.set(f"hb/{self.rank}", "0")
        if self.store.check(["gen"]):
            return self._join()
        self.store.set(f"init/{self.rank}", "1")
        self.store.wait([f"init/{r}" for r in range(self.world_size)], _timedelta(60))
        self.store.compare_set("gen", "", "0")
        self.store.compare_set("gen/0/members", "", json.dumps(list(range(self.world_size))))
        self._enter(0)
        return self

    def members_of(self, g: int) -> tuple[int, ...]:
        return tuple(json.loads(self.store.get(f"gen/{g}/members")))

    def _enter(self, g: int) -> None:
        members = self.members_of(g)
        if self.rank not in members:
            raise FencedError(f"rank {self.rank} is not a member of generation {g} (members {list(members)})")
        if os.environ.get("MOE_RESILIENT_DEBUG"):
            print(f"[rank {self.rank}] entering generation {g} members {list(members)}", flush=True)
        pg_store = dist.PrefixStore(f"gen/{g}/pg/", self.store)
        # gloo's own deadline (connecting, and each operation) stays above ours: _wait decides.
        pg = dist.ProcessGroupGloo(pg_store, members.index(self.rank), len(members),
                                   _timedelta(max(30.0, 2 * self.timeout)))
        if self._pg is not None:
            _retire(self._pg)
        self._pg = pg
        self.generation, self.members = g, members
        admitted = f"gen/{g}/admitted"
        self._admitted = int(self.store.get(admitted)) if self.store.check([admitted]) else 0
        self._admit_target = max(self._admit_target, self._admitted)

    def _join(self) -> ElasticGroup:
        self.store.delete_key(f"dead/{self.rank}")  # the launcher's notice was for our predecessor
        seq = self.store.add("join/count", 1)
        self.store.set(f"join/seq/{seq}", str(self.rank))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            g = int(self.store.get("gen"))
            if self.rank in self.members_of(g):
                self._enter(g)
                self.joined = True
                return self
            time.sleep(0.01)
        raise TimeoutError(f"rank {self.rank} was not admitted within 120 s")

    def check_fenced(self) -> None:
        """Raise FencedError if a newer generation left this rank out."""
        g = int(self.store.get("gen"))
        if g != self.generation and self.rank not in self.members_of(g):
            raise FencedError(
                f"rank {self.rank} was excluded at generation {g} (it was in {self.generation}); "
                "it is presumed dead: restart it to rejoin"
            )

    # ----------------------------------------------------------------------------------- heartbeat
    def _heartbeat(self) -> None:
        store = self._connect()  # its own connection: the control channel never queues behind data
        beat = 0
        while not self._stop.is_set():
            beat += 1
            try:
                store.set(f"hb/{self.rank}", str(beat))
                self._seen_joins = int(store.add("join/count", 0))
            except Exception:  # the launcher went away: nothing left to report to
                return
            self._stop.wait(self.heartbeat_interval)

    def finish(self, timeout: float = 10.0) -> None:
        """Exit barrier over the store, not the data path: a rank that leaves while a peer still
        reads its last message resets the socket under it, which the peer would take for a crash."""
        g = self.generation
        self.store.set(f"gen/{g}/done/{self.rank}", "1")
        try:
            self.store.wait([f"gen/{g}/done/{r}" for r in self.members], _timedelta(timeout))
        except Exception:  # a member died at the very end: nothing left to protect
            pass
        self.close()

    def close(self) -> None:
        self._stop.set()

    # ----------------------------------------------------------------------------------- collectives
    def _run(self, work_fn):
        """Run one collective; a crash, a hung peer or a peer's failure report becomes agreement, a
        new generation, RankFailure."""
        if self._pg is None:
            raise RuntimeError("ElasticGroup.start() has not been called")
        try:
            work = work_fn(self._pg)
            self._wait(work)
        except FencedError:
            raise
        except Exception as exc:  # gloo: "Connection closed by peer"; _wait: hung peer or a peer's report
            work = None  # the traceback keeps this frame: drop its hold on the old group (see _retire)
            self.last_failure_detect_s = time.monotonic()
            cause = str(exc).splitlines()[0][:160]
            lost = self._agree(getattr(exc, "heartbeats", None))
            if not lost:  # every member is alive: not a membership problem, do not loop on it
                raise RuntimeError(f"collective failed with every member alive (generation {self.generation}): {cause}")
            raise RankFailure(lost, self.generation, f"cause: {cause}") from None

    def _wait(self, work) -> None:
        """Wait for a collective in slices; a crashed peer's reset connection ends the wait at once
        (gloo raises), but only after the kernel has freed its memory. Between slices, which only a
        slow step reaches, look for a reason to give up: a peer gone from the liveness board (every
        slice: a local probe), and every ``poll_interval`` the store's view: a survivor already
        agreeing, a launcher's death notice, a heartbeat stalled for ``heartbeat_timeout``. A peer
        that is merely slow (its heartbeat advances) is waited for up to ``timeout``: under load a
        fixed collective deadline would evict live ranks."""
        start = last_poll = time.monotonic()
        first = None  # (heartbeats, when read) at the first store poll
        peers = [r for r in self.members if r != self.rank]
        while True:
            try:
                work.wait(self._slice)
                return
            except Exception:
                if work.is_completed():  # finished as the slice ran out, or failed: its own outcome
                    work.wait()
                    return
            gone = self._board.dead(peers) if self._board else []
            reason = f"ranks {gone} exited (liveness board)" if gone else None
            now = time.monotonic()
            if reason is None and now - last_poll >= self.poll_interval:
                last_poll = now
                beats = self._heartbeats(peers)
                first = first or (beats, now)
                stalled = [r for r in peers if beats[r] == first[0][r]]
                reason = (
                    "a survivor reported a failure" if int(self.store.add(f"gen/{self.generation}/checkin_bits", 0))
                    else "death notice" if any(self.store.check([f"dead/{r}"]) for r in peers)
                    else f"heartbeat of ranks {stalled} stalled" if stalled and now - first[1] > self.heartbeat_timeout
                    else f"collective timed out after {self.timeout} s" if now - start > self.timeout
                    else None
                )
            if reason:
                exc = TimeoutError(f"{reason} (waited {now - start:.3f} s)")
                exc.heartbeats = first
                raise exc

    # Host work per call is a handful of small tensors and Python lists: on the hot path, advanced
    # indexing on [W] tensors cost more than the wrapper's whole remaining bookkeeping.
    def exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        """send_counts [W] int64 (rows for each global rank) -> recv_counts [W]. Also carries the
        join word (see module docstring); call ``step_boundary`` after the step."""
        counts, seen = send_counts.tolist(), self._seen_joins
        send = torch.tensor([v for r in self.members for v in (counts[r], seen)], dtype=torch.long)
        recv = torch.empty_like(send)
        splits = [2] * len(self.members)
        self._run(lambda pg: pg.alltoall_base(recv, send, splits, splits))
        got = recv.tolist()
        self._admit_target = max(self._admit_target, min(got[1::2]))
        out = [0] * self.world_size
        for r, n in zip(self.members, got[0::2]):
            out[r] = n
        return torch.tensor(out, dtype=torch.long)

    def all_to_all(self, send: torch.Tensor, send_counts: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
        """send [sum(send_counts), ...] rows grouped by destination global rank -> received rows
        grouped by source global rank. Counts are [W]; non-members must be 0."""
        sent, got = send_counts.tolist(), recv_counts.tolist()
        in_splits, out_splits = [sent[r] for r in self.members], [got[r] for r in self.members]
        recv = send.new_empty((sum(out_splits), *send.shape[1:]))
        send = send.contiguous()
        self._run(lambda pg: pg.alltoall_base(recv, send, out_splits, in_splits))
        return recv

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over the members; ``op`` is "sum" or "max"."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        self._run(lambda pg: pg.allreduce([tensor], opts))
        return tensor

    def broadcast(self, tensor: torch.Tensor, root: int) -> torch.Tensor:
        """Broadcast from global rank ``root`` (a member)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = self.members.index(root)
        self._run(lambda pg: pg.broadcast([tensor], opts))
        return tensor

    def barrier(self) -> None:
        self.all_reduce(torch.zeros(1))

    # ----------------------------------------------------------------------------------- agreement
    def _heartbeats(self, ranks) -> dict[int, bytes]:
        """Each rank's heartbeat counter as the store holds it now (one round trip)."""
        return dict(zip(ranks, self.store.multi_get([f"hb/{r}" for r in ranks])))

    def _alive_by_heartbeat(self, candidates, since: dict) -> set[int]:
        """Members whose heartbeat advanced since ``since`` (a first reading)."""
        now = self._heartbeats(candidates)
        return {r for r in candidates if now[r] != since[r]}

    def _known_dead(self, ranks) -> set[int]:
        """Those of ``ranks`` off the liveness board (a local probe) or with a launcher's death notice."""
        gone = set(self._board.dead(ranks)) if self._board else set()
        return gone | {r for r in ranks if r not in gone and self.store.check([f"dead/{r}"])}

    def _agree(self, heartbeats: tuple[dict, float] | None = None) -> list[int]:
        """After a failed collective: check in, wait until each member has checked in or is known
        dead (off the liveness board, a launcher notice, or no heartbeat for heartbeat_timeout),
        propose, adopt the decision.
        ``heartbeats``: (readings by rank, monotonic time) taken while waiting, so that a heartbeat
        already seen stalled is not waited for twice."""
        g, members = self.generation, self.members
        bits = f"gen/{g}/checkin_bits"  # one atomic add per survivor; one read gives everyone's
        self.store.add(bits, 1 << self.rank)
        if heartbeats is None:
            heartbeats = (self._heartbeats(members), time.monotonic())
        (first, since), start = heartbeats, time.monotonic()
        while not self.store.check([f"gen/{g}/decision"]):
            mask = int(self.store.add(bits, 0))
            checked = {r for r in members if mask >> r & 1}
            unchecked = [r for r in members if r not in checked]
            undecided = set(unchecked) - self._known_dead(unchecked)
            waited = time.monotonic() - start
            if undecided and time.monotonic() - since > self.heartbeat_timeout:  # silent: dead or hung
                undecided &= self._alive_by_heartbeat(sorted(undecided), first)
            if not undecided or waited > self.agree_timeout:
                # a member can check in and die before the decision (a node lost rank by rank)
                died = self._known_dead([r for r in members if r in checked and r != self.rank])
                proposal = [r for r in members if r in checked and r not in died]
                self.store.compare_set(f"gen/{g}/decision", "", json.dumps(proposal))
                break
            time.sleep(0.0005)
        survivors = json.loads(self.store.get(f"gen/{g}/decision"))
        lost = sorted(set(members) - set(survivors))
        if self.rank not in survivors:
            raise FencedError(f"rank {self.rank} was left out of generation {g + 1}; it is presumed dead")
        self.store.compare_set(f"gen/{g + 1}/members", "", json.dumps(survivors))
        self.store.compare_set(f"gen/{g + 1}/admitted", "", str(self._admitted))
        self.store.compare_set("gen", str(g), str(g + 1))
        if self._missing(g + 1, survivors):  # agree again, one generation on: every survivor comes here alike
            self.generation, self.members = g + 1, tuple(survivors)
            return sorted(set(lost) | set(self._agree()))
        self._enter(g + 1)  # a member dying between showing up and gloo's rendezvous still fails it
        return lost

    def _missing(self, g: int, members) -> set[int]:
        """Before generation g's gloo group forms (its rendezvous waits for every member for gloo's
        whole deadline, then fails): wait until every member has shown up, or one that has not is known
        dead (off the board, a launcher notice, no heartbeat for heartbeat_timeout). Returns the dead
        (empty: all are here)."""
        here = f"gen/{g}/here"
        self.store.set(f"{here}/{self.rank}", "1")
        self.store.add(here, 1)
        others = [r for r in members if r != self.rank]
        first = since = last_poll = None
        while int(self.store.add(here, 0)) < len(members):
            now = time.monotonic()
            if first is None:
                first, since, last_poll = self._heartbeats(others), now, now
            elif now - last_poll >= self.poll_interval:  # who is missing, and is any of them dead
                last_poll = now
                absent = [r for r in others if not self.store.check([f"{here}/{r}"])]
                dead = self._known_dead(absent)
                if not dead and now - since > self.heartbeat_timeout:
                    dead = set(absent) - self._alive_by_heartbeat(absent, first)
                if dead:
                    return dead
            time.sleep(0.0005)
        return set()

    # ----------------------------------------------------------------------------------- joins
    def pending_admission(self) -> bool:
        """True when this step's count exchange agreed that join requests are waiting."""
        return self._admit_target > self._admitted

    def step_boundary(self) -> list[int]:
        """Admit replacements agreed in-band during this step. Every member calls this after the
        same step; returns the admitted ranks ([] almost always)."""
        if not self.pending_admission():
            return []
        g, target = self.generation, self._admit_target
        seq_keys = [f"join/seq/{i}" for i in range(self._admitted + 1, target + 1)]
        self.store.wait(seq_keys, _timedelta(10))
        joiners = sorted({int(v) for v in self.store.multi_get(seq_keys)} - set(self.members))
        self.store.compare_set(f"gen/{g + 1}/members", "", json.dumps(sorted(set(self.members) | set(joiners))))
        self.store.compare_set(f"gen/{g + 1}/admitted", "", str(target))
        self.store.compare_set("gen", str(g), str(g + 1))
        before = set(self.members)
        self._enter(g + 1)
        return sorted(set(self.members) - before)
