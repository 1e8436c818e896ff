"""ElasticGroup: a process group whose membership changes at run time.

Membership moves in generations, all kept in a TCPStore that lives outside the workers (the
``moe-resilient store`` process, torchrun's agent store, or the ``moe-resilient launch`` process).
Each process is one incarnation of its rank (detector.py): members are (rank, incarnation) pairs::

    gen                      current generation g
    gen/{g}/members          JSON [[rank, incarnation], ...] of generation g
    gen/{g}/pg/...           gloo rendezvous of generation g (a fresh PrefixStore each time)
    gen/{g}/checkin_bits/{w} bit r % 62 of word r // 62 set: survivor r reached agreement after a
                             failure in generation g (``_rank_set``)
    gen/{g}/decision         members of generation g+1 (compare_set: the first proposal wins, so
                             every survivor adopts the same membership)
    gen/{g}/here/{w}         the members of g that have shown up (a rank set, as checkin_bits)
    gen/{g}/admitted         join requests admitted up to generation g
    inc/{r}                  incarnations of rank r so far
    hb/{r}/{i}, dead/{r}/{i} heartbeat and death notice of incarnation i of rank r (detector.py)
    join/count, join/seq/{n} a replacement asks to be admitted (the n-th request names [rank, inc])

Failure detection (detector.py): a collective that errors (a crashed peer's connections reset); while
a collective waits, a peer off the liveness board, a death notice, a heartbeat that stops advancing,
or a survivor that has already begun agreement. A slow peer whose heartbeat advances is waited for.
Survivors check in and propose those who checked in and are not known dead since; the first proposal
stored wins. A rank left out of the decision is fenced: it gets FencedError and never touches the new
generation's communicator. A hung rank that wakes and checks in before the decision is taken back:
nobody is lost, and every member gets a RankFailure with no lost ranks (re-run the step). Before a
generation's gloo group forms, every member must show up (its rendezvous would wait for a dead one for
gloo's whole deadline); one that is known dead, or does not come within ``agree_timeout``, is agreed
away one generation on. The old gloo group is shut down a second later on a background thread (see
``_retire``), off the recovery pause.

Joins ride the data path: ``exchange_counts`` (the all-to-all of split sizes that every EP step does
anyway) carries one extra word, the number of join requests each rank has seen, so all members learn
the same value in the same step with no extra synchronisation, and admit at that step's end. A request
for a rank whose previous incarnation is still a member waits until the failure has been agreed.

Every wait has a deadline: ``start_timeout`` (generation 0 forming), ``join_timeout`` (a replacement
waiting to be admitted), ``timeout`` (a collective waiting on live members), ``agree_timeout``
(agreement, members showing up, join requests), ``finish``'s own.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid

import torch.distributed as dist

from moe_resilient.collectives import Collectives
from moe_resilient.detector import FailureDetector, Members, Stall

STORE_ENV = "MOE_RESILIENT_STORE"  # host:port of a store outside the worker nodes (moe-resilient store)
TRANSPORT_ENV = "MOE_RESILIENT_TRANSPORT"  # "auto" (the default: shared memory on one host) or "gloo"


class RankFailure(RuntimeError):
    """A collective met dead or hung ranks. ``lost_ranks`` is the agreed dead set (empty when a late
    member was taken back: re-run the step); the group has already moved to ``generation``."""

    def __init__(self, lost_ranks: list[int], generation: int, cause: str = ""):
        self.lost_ranks = list(lost_ranks)
        self.generation = generation
        what = f"lost ranks {self.lost_ranks}" if self.lost_ranks else "no rank lost (a late member was taken back)"
        super().__init__(f"{what}; group rebuilt as generation {generation}. {cause}".strip())


class FencedError(RuntimeError):
    """This rank was excluded from the group (presumed dead) and may not take part any more."""


RANKS_PER_WORD = 62  # ranks per word of a rank set in the store: one int64 atomic add


def _rank_set(store: dist.Store, key: str, world_size: int, rank: int | None = None) -> set[int]:
    """Add ``rank`` (None: none) to the set of ranks kept under ``key`` as bit words, and return the
    set: one atomic add per word, so one round trip reads 62 ranks."""
    ranks = set()
    for w in range(-(-world_size // RANKS_PER_WORD)):
        mine = rank is not None and rank // RANKS_PER_WORD == w
        word = int(store.add(f"{key}/{w}", 1 << rank % RANKS_PER_WORD if mine else 0))
        ranks.update(w * RANKS_PER_WORD + i for i in range(RANKS_PER_WORD) if word >> i & 1)
    return ranks


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


class _StoreBarrier:
    """A count of members reached in the store, shaped like a gloo work for ``_wait``. Its outcome is
    decided once, by compare_set: the first member to see every member counted in stores "ok", the
    first to give up (a peer died or hung) stores "fail", and every member reads the same. Without
    it, a member counting in late could see the count complete after another had given up."""

    def __init__(self, store: dist.Store, key: str, members: int):
        self.store, self.key, self.members = store, key, members
        store.add(key, 1)

    def _decide(self, outcome: str) -> bool:
        won = self.store.compare_set(f"{self.key}/outcome", "", outcome)
        return won == b"ok"

    def is_completed(self) -> bool:
        if int(self.store.add(self.key, 0)) < self.members and not self.store.check([f"{self.key}/outcome"]):
            return False
        if not self._decide("ok"):
            raise RuntimeError(f"{self.key}: a member gave up on this barrier")
        return True

    def abandon(self) -> bool:
        """Give up, unless the barrier was already decided complete: returns True if it was."""
        return self._decide("fail")

    def wait(self, timeout: datetime.timedelta | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
        while not self.is_completed():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.key}: not every member has arrived")
            time.sleep(0.0002)


class _Connecting:
    """``build()`` running on a thread, shaped like a gloo work for ``ElasticGroup._wait``."""

    def __init__(self, build):
        self.result, self.error = None, None
        self.thread = threading.Thread(target=self._run, args=(build,), name="elastic-connect", daemon=True)
        self.thread.start()

    def _run(self, build) -> None:
        try:
            self.result = build()
        except Exception as exc:  # noqa: BLE001 - raised in the waiting thread
            self.error = exc

    def is_completed(self) -> bool:
        return not self.thread.is_alive()

    def wait(self, timeout: datetime.timedelta | None = None) -> None:
        self.thread.join(None if timeout is None else timeout.total_seconds())
        if self.thread.is_alive():
            raise TimeoutError("still connecting")
        if self.error is not None:
            raise self.error


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


class ElasticGroup(Collectives):
    """Mutable-membership wrapper over gloo (CPU) process groups.

    ``rank`` is a stable global id in [0, world_size); ``world_size`` is the largest membership, which
    fixes every shape. Collectives (collectives.py) run over the current generation's members only.

    ``heartbeat_timeout`` (s): a member whose heartbeat has not advanced for this long is presumed dead
    or hung. ``timeout`` (s): the longest a collective waits on members that are all alive by
    heartbeat (a live rank stuck outside the collective). ``agree_timeout`` (s): the longest
    agreement waits for a survivor to check in, a member to show up, or a join request to be written.
    ``start_timeout`` / ``join_timeout`` (s): the longest ``start`` waits for every rank to arrive, or
    for this replacement to be admitted. ``peer_bytes_per_s``: what copying weights between members
    moves (gloo over TCP: benchmarks/RESULTS.md), against which repairs weigh the shadow store.
    ``transport`` (default ``MOE_RESILIENT_TRANSPORT`` or "auto"): "auto" runs the all-to-alls through
    shared memory (shm.py) whenever every member of a generation shares this host, "gloo" never.
    """

    def __init__(
        self,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        *,
        timeout: float = 30.0,
        heartbeat_interval: float = 0.02,
        heartbeat_timeout: float = 0.12,
        agree_timeout: float = 5.0,
        start_timeout: float = 60.0,
        join_timeout: float = 120.0,
        peer_bytes_per_s: float = 1e9,
        transport: str | None = None,
        prefix: str = "moe_resilient",
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if not 0 < heartbeat_interval < heartbeat_timeout:
            raise ValueError(f"heartbeat_interval {heartbeat_interval} must lie in (0, heartbeat_timeout "
                             f"{heartbeat_timeout})")
        self.rank, self.world_size = rank, world_size
        self.timeout, self.heartbeat_interval = timeout, heartbeat_interval
        self.poll_interval = min(1.5 * heartbeat_interval, heartbeat_timeout / 4)
        self.heartbeat_timeout, self.agree_timeout = heartbeat_timeout, agree_timeout
        self.start_timeout, self.join_timeout = start_timeout, join_timeout
        self.peer_bytes_per_s = peer_bytes_per_s
        self.transport = transport or os.environ.get(TRANSPORT_ENV, "auto")
        if self.transport not in ("auto", "gloo"):
            raise ValueError(f"transport {self.transport!r}: use 'auto' (shared memory among ranks of one host) "
                             "or 'gloo'")
        self._shm = None  # shm.ShmExchange of this generation, when every member shares this host
        self._host, self._port, self._prefix = host, port, prefix
        self.store = self._connect()
        self.incarnation = int(self.store.add(f"inc/{rank}", 1))
        self._nonce = self.store.compare_set("job/nonce", "", uuid.uuid4().hex[:12]).decode()  # first one wins
        self.detector = FailureDetector(self._connect, rank, self.incarnation, host=host, port=port, prefix=prefix,
                                        interval=heartbeat_interval, timeout=heartbeat_timeout, joins_key="join/count")
        # Same-host ranks are probed on the launcher's liveness board (see liveness.py) every slice.
        self._slice = _timedelta(0.002 if self.detector.board else self.poll_interval)
        self.generation = -1
        self.members: tuple[int, ...] = ()
        self.incarnations: Members = {}
        self._pg = None  # this generation's gloo group, once connected (see _gloo)
        self.joined = False  # True when this process entered as a replacement
        self._admitted = 0  # join requests admitted so far (agreed in-band)
        self._admit_target = 0
        self.last_failure_detect_s: float | None = None
        # the generation the caller's expert placement reflects (elastic.recover_across_ranks moves it on)
        self.placement_generation = -1

    @classmethod
    def from_env(cls, **kwargs) -> ElasticGroup:
        """From torchrun's (or ``moe-resilient launch``'s) environment: RANK, WORLD_SIZE, and the store
        at MOE_RESILIENT_STORE (host:port, a ``moe-resilient store`` outside the worker nodes) or else
        at MASTER_ADDR:MASTER_PORT (hosted by the agent or launcher)."""
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            if os.environ.get(STORE_ENV):
                host, _, port = os.environ[STORE_ENV].rpartition(":")
            else:
                host, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
        except KeyError as exc:
            raise RuntimeError(f"ElasticGroup.from_env: {exc.args[0]} is not set") from None
        return cls(host, int(port), rank, world, **kwargs)

    def topology(self, ranks_per_host: int | None = None):
        """The planner's copy costs for this group: ``ranks_per_host`` (default: all on one host), a
        copy between members at ``peer_bytes_per_s``."""
        from moe_resilient import planner

        return planner.Topology(self.world_size, ranks_per_host or self.world_size,
                                intra_host_bw=self.peer_bytes_per_s, inter_host_bw=min(self.peer_bytes_per_s, 12.5e9))

    def _connect(self) -> dist.Store:
        client = dist.TCPStore(self._host, self._port, is_master=False, timeout=_timedelta(30), wait_for_workers=False)
        return dist.PrefixStore(self._prefix, client)

    # ----------------------------------------------------------------------------------- membership
    def start(self) -> ElasticGroup:
        """Form generation 0 with every rank, or, if the group already runs, ask to be admitted and
        wait until a generation lists this incarnation."""
        self.detector.start()
        if self.detector.board:  # a peer's death wakes a shared-memory exchange at once
            self.detector.board.watch(r for r in range(self.world_size) if r != self.rank)
        self.store.set(f"host/{self.rank}/{self.incarnation}", socket.gethostname())
        if self.store.check(["gen"]):
            return self._join()
        self.store.set(f"init/{self.rank}", str(self.incarnation))
        keys = [f"init/{r}" for r in range(self.world_size)]
        self._wait_keys(keys, self.start_timeout, "every rank to start")
        first = {r: int(v) for r, v in enumerate(self.store.multi_get(keys))}
        self.store.compare_set("gen/0/members", "", json.dumps(sorted(first.items())))
        self.store.compare_set("gen", "", "0")
        self._form(0, self._membership(0))
        self.placement_generation = self.generation
        return self

    def _wait_keys(self, keys: list[str], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            missing = [k for k in keys if not self.store.check([k])]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {self.rank}: waited {timeout} s for {what}; still missing {missing}")
            time.sleep(0.005)

    def _membership(self, g: int) -> Members:
        return {r: inc for r, inc in json.loads(self.store.get(f"gen/{g}/members"))}

    def members_of(self, g: int) -> tuple[int, ...]:
        return tuple(sorted(self._membership(g)))

    def _form(self, g: int, members: Members) -> list[int]:
        """Become a member of generation g once every member has shown up, and map its shared-memory
        segment or, where the members span hosts, connect its gloo group. A member that is known dead
        or does not come is agreed away (one generation on); returns the ranks lost on the way."""
        if members.get(self.rank) != self.incarnation:
            raise FencedError(f"rank {self.rank} (incarnation {self.incarnation}) is not a member of generation "
                              f"{g} (members {sorted(members.items())})")
        self.generation, self.incarnations, self.members = g, dict(members), tuple(sorted(members))
        admitted = f"gen/{g}/admitted"
        self._admitted = int(self.store.get(admitted)) if self.store.check([admitted]) else 0
        self._admit_target = max(self._admit_target, self._admitted)
        if self._missing():
            return self._agree()
        if os.environ.get("MOE_RESILIENT_DEBUG"):
            print(f"[rank {self.rank}] entering generation {g} members {list(self.members)}", flush=True)
        if self._pg is not None:
            _retire(self._pg)
            self._pg = None
        self._use_shm(g)
        if self._shm is None:  # every all-to-all rides gloo: connect now, off the step's path
            try:
                self._pg = self._connect_gloo(g)
            except Exception:  # a member died after showing up, before every pair connected
                self.last_failure_detect_s = time.monotonic()
                return self._agree()
        return []

    def _gloo(self):
        """This generation's gloo group. Where shared memory carries the all-to-alls it is connected
        on first use (an all-reduce, a broadcast), so a new generation costs no connect until then."""
        if self._pg is None:
            self._pg = self._connect_gloo(self.generation)
        return self._pg

    @property
    def job(self) -> str:
        """Names this job's shared-memory segments: its store's address and prefix, and a nonce drawn
        once per job (a later job on a reused port never maps what this one left behind)."""
        return f"{self._host}_{self._port}_{self._prefix}_{self._nonce}"

    def _use_shm(self, g: int) -> None:
        """Map generation g's shared-memory segment if every member shares this host (and the transport
        allows it); the lowest member removes the previous generation's file (mappings outlive it)."""
        from moe_resilient import shm

        old, self._shm = self._shm, None
        hosts = self.store.multi_get([f"host/{r}/{i}" for r, i in sorted(self.incarnations.items())])
        if self.transport == "auto" and len(set(hosts)) == 1 and os.path.isdir(shm.SHM_DIR):
            self._shm = shm.ShmExchange(shm.segment_path(self.job, g), self.rank, self.world_size)
        if old is not None:
            old.close(unlink=self.rank == min(self.members))

    def _connect_gloo(self, g: int):
        """Generation g's gloo group, built on a thread while this one waits on it as on a collective
        (``_wait``): gloo would wait for a member that died mid-connect for its whole deadline. Raises
        once one is known dead or stalled, or has reported a failure, or after ``timeout`` (the builder
        thread fails on its own later; nothing uses its group)."""
        # its own store connection: one client serialises its requests, and a rendezvous waiting for a
        # dead member's address would hold every other store call of this rank behind it
        pg_store = dist.PrefixStore(f"gen/{g}/pg/", self._connect())
        index, size = self.members.index(self.rank), len(self.members)
        # gloo's own deadline (connecting, and each operation) stays above ours: _wait decides
        deadline = _timedelta(max(30.0, 2 * self.timeout))
        connecting = _Connecting(lambda: dist.ProcessGroupGloo(pg_store, index, size, deadline))
        self._wait(connecting, [])
        return connecting.result

    def _join(self) -> ElasticGroup:
        """Ask to be admitted: the n-th request is written once, by compare_set, so that members that
        gave up waiting for it (a joiner killed in between) and voided it all read the same."""
        me = json.dumps([self.rank, self.incarnation])
        deadline = time.monotonic() + self.join_timeout
        while self.store.compare_set(f"join/seq/{self.store.add('join/count', 1)}", "", me) != me.encode():
            pass  # voided by the members: ask again
        while time.monotonic() < deadline:
            g = int(self.store.get("gen"))
            members = self._membership(g)
            if members.get(self.rank) == self.incarnation:
                self.placement_generation = g - 1  # this process's placement is not the group's yet
                self._form(g, members)
                self.joined = True
                return self
            time.sleep(0.01)
        raise TimeoutError(f"rank {self.rank} was not admitted within {self.join_timeout} s")

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
        self.detector.stop()
        if self._shm is not None:
            self._shm.close(unlink=bool(self.members) and self.rank == min(self.members))

    # ----------------------------------------------------------------------------------- collectives
    def _run(self, work_fn):
        """Run one collective, ``work_fn(self._gloo)`` (it calls ``_gloo()`` for the gloo group if it
        needs it); a crash, a hung peer or a peer's failure report becomes agreement, a new
        generation, RankFailure."""
        if not self.members:
            raise RuntimeError("ElasticGroup.start() has not been called")
        stall, work = [], None  # the waiting's heartbeat watch, carried into agreement
        try:
            work = work_fn(self._gloo)
            self._wait(work, stall)
        except FencedError:
            raise
        except Exception as exc:  # gloo: "Connection closed by peer"; _wait: hung peer or a peer's report
            if hasattr(work, "abandon") and work.abandon():  # a store barrier or a shared-memory exchange
                return  # it had completed after all (a barrier: decided so for everyone)
            exchange = work if hasattr(work, "drop") else None
            work = None  # the traceback keeps this frame: drop its hold on the old group (see _retire)
            self.last_failure_detect_s = time.monotonic()
            cause = str(exc).splitlines()[0][:160]
            lost = self._agree(stall[0] if stall else None)
            if exchange is not None:
                exchange.drop(lost)
            raise RankFailure(lost, self.generation, f"cause: {cause}") from None

    def _wait(self, work, stall: list) -> None:
        """Wait for a collective in slices; a crashed peer's reset connection ends the wait at once
        (gloo raises), but only after the kernel has freed its memory. Between slices, which only a
        slow step reaches, look for a reason to give up: a peer gone from the liveness board (every
        slice: a local probe), and every ``poll_interval`` the store's view: a survivor already
        agreeing, a death notice, a heartbeat stalled for ``heartbeat_timeout``. A peer that is merely
        slow (its heartbeat advances) is waited for up to ``timeout``: under load a fixed collective
        deadline would evict live ranks. ``stall`` receives the heartbeat watch."""
        start = last_poll = time.monotonic()
        peers = {r: i for r, i in self.incarnations.items() if r != self.rank}
        while True:
            try:
                work.wait(self._slice)
                return
            except Exception:
                if work.is_completed():  # finished as the slice ran out, or failed: its own outcome
                    work.wait()
                    return
            gone = self.detector.off_board(peers)
            reason = f"ranks {gone} exited (liveness board)" if gone else None
            now = time.monotonic()
            if reason is None and now - last_poll >= self.poll_interval:
                last_poll = now
                if not stall:
                    stall.append(Stall(self.detector, peers))
                stalled = stall[0].poll()
                reason = (
                    "a survivor reported a failure" if self._checked_in()
                    else "death notice" if self.detector.noticed_dead(peers)
                    else f"heartbeat of ranks {stalled} stalled" if stalled
                    else f"collective timed out after {self.timeout} s" if now - start > self.timeout
                    else None
                )
            if reason:
                raise TimeoutError(f"{reason} (waited {now - start:.3f} s)")

    def commit(self, name: str) -> None:
        """A barrier over the store that succeeds on every member or on none: each member counts itself
        in, and it completes once all have. A member lost before it counted in makes every member
        raise RankFailure (a step's results are then released nowhere, and re-run everywhere); one lost
        after it counted in lets the commit succeed everywhere."""
        key = f"gen/{self.generation}/commit/{name}"
        self._run(lambda gloo: _StoreBarrier(self.store, key, len(self.members)))

    # ----------------------------------------------------------------------------------- agreement
    def _agree(self, stall: Stall | None = None) -> list[int]:
        """After a failed collective: check in, wait until each member has checked in or is known
        dead (off the liveness board, a death notice, or a heartbeat stalled), propose, adopt the
        decision, form the next generation. ``stall``: the heartbeat watch of the failed wait, so that
        a heartbeat already seen stalled is not waited for twice. Returns the lost ranks."""
        g, members = self.generation, self.incarnations
        self._checked_in(self.rank)
        stall = stall or Stall(self.detector, members)
        start = last_poll = time.monotonic()
        stalled: set[int] = set()
        while not self.store.check([f"gen/{g}/decision"]):
            checked = self._checked_in() & set(members)
            unchecked = {r: i for r, i in members.items() if r not in checked}
            now = time.monotonic()
            if unchecked and now - last_poll >= self.poll_interval:  # silent: dead or hung (a woken one beats)
                last_poll, stalled = now, set(stall.poll(unchecked))
            undecided = set(unchecked) - self.detector.known_dead(unchecked) - stalled
            if not undecided or now - start > self.agree_timeout:
                # a member can check in and die before the decision (a node lost rank by rank)
                died = self.detector.known_dead({r: members[r] for r in checked if r != self.rank})
                proposal = sorted((r, members[r]) for r in checked if r not in died)
                self.store.compare_set(f"gen/{g}/decision", "", json.dumps(proposal))
                break
            time.sleep(0.0005)
        survivors = {r: inc for r, inc in json.loads(self.store.get(f"gen/{g}/decision"))}
        lost = sorted(set(members) - set(survivors))
        if survivors.get(self.rank) != self.incarnation:
            raise FencedError(f"rank {self.rank} was left out of generation {g + 1}; it is presumed dead")
        self.store.compare_set(f"gen/{g + 1}/members", "", json.dumps(sorted(survivors.items())))
        self.store.compare_set(f"gen/{g + 1}/admitted", "", str(self._admitted))
        self.store.compare_set("gen", str(g), str(g + 1))
        return sorted(set(lost) | set(self._form(g + 1, survivors)))

    def _agreement_pending(self) -> bool:
        """A member has reported a failure in the current generation and this one has not checked in."""
        checked = self._checked_in()
        return bool(checked) and self.rank not in checked

    def _checked_in(self, rank: int | None = None) -> set[int]:
        """The survivors that have reached agreement in this generation (adding ``rank``)."""
        return _rank_set(self.store, f"gen/{self.generation}/checkin_bits", self.world_size, rank)

    def _missing(self) -> set[int]:
        """Before this generation's gloo group forms (its rendezvous waits for every member for gloo's
        whole deadline, then fails): wait until every member has shown up. Returns those that have not
        and are known dead, stalled, or still absent after ``agree_timeout`` (empty: all are here)."""
        g, members = self.generation, self.incarnations
        here = f"gen/{g}/here"
        present = _rank_set(self.store, here, self.world_size, self.rank)
        stall, start = None, time.monotonic()
        last_poll = start
        while absent := {r: i for r, i in members.items() if r not in present}:
            now = time.monotonic()
            if now - last_poll >= self.poll_interval:  # is any of the missing dead
                last_poll = now
                stall = stall or Stall(self.detector, absent)
                dead = self.detector.known_dead(absent) | set(stall.poll(absent))
                if not dead and now - start > self.agree_timeout:
                    dead = set(absent)  # alive but elsewhere: its own deadline
                if dead:
                    return dead
            time.sleep(0.0005)
            present = _rank_set(self.store, here, self.world_size)
        return set()

    def gather(self, name: str, value: str, generation: int | None = None) -> dict[int, str]:
        """Every member of ``generation`` (default: the current one) posts ``value`` under ``name``;
        returns {rank: value} of the members that count: those that posted before every other one was
        known dead or stalled (or ``agree_timeout`` passed), decided once by compare_set. Every member
        gets the same dict, however late it comes and whoever dies meanwhile: store traffic only, no
        collective that could complete on some members and fail on others. While it waits, a failure
        reported in the current generation is agreed on here (a member agreeing would otherwise wait
        for this one to check in, while this one waits for its post)."""
        g = self.generation if generation is None else generation
        members = self._membership(g)
        base = f"gen/{g}/gather/{name}"
        self.store.set(f"{base}/{self.rank}", value)
        # who has posted, as bit words: a poll is one round trip, which leaves the cores to the members
        # still restoring experts
        posted = _rank_set(self.store, f"{base}/posted", self.world_size, self.rank)
        closed = f"{base}/closed"
        stall, start, last_poll, stalled = Stall(self.detector, members), time.monotonic(), 0.0, set()
        while True:
            waiting = {r: i for r, i in members.items() if r not in posted}
            now = time.monotonic()
            if waiting and now - last_poll >= self.poll_interval:
                last_poll, stalled = now, set(stall.poll(waiting))
                if self.store.check([closed]):  # decided by a member that gave up on some sooner
                    break
                if self._agreement_pending():  # a member it waits for may be agreeing, waiting for it
                    self._agree()
            if not set(waiting) - self.detector.known_dead(waiting) - stalled or now - start > self.agree_timeout:
                counted = sorted(set(members) - set(waiting))  # the dead post no more
                self.store.compare_set(closed, "", json.dumps(counted))
                break
            time.sleep(0.0005)
            posted = _rank_set(self.store, f"{base}/posted", self.world_size)
        ranks = json.loads(self.store.get(closed))
        return {r: v.decode() for r, v in zip(ranks, self.store.multi_get([f"{base}/{r}" for r in ranks]))}

    # ----------------------------------------------------------------------------------- joins
    def _join_word(self) -> int:
        return self.detector.joins()  # join requests seen as of the last heartbeat

    def _agreed_join_word(self, words: list[int]) -> None:
        self._admit_target = max(self._admit_target, min(words))

    def pending_admission(self) -> bool:
        """True when this step's count exchange agreed that join requests are waiting."""
        return self._admit_target > self._admitted

    def _join_request(self, n: int) -> tuple[int, int] | None:
        """The n-th join request, or None if its joiner died before writing it (voided after
        ``agree_timeout`` by compare_set, so every member reads the same)."""
        key = f"join/seq/{n}"
        deadline = time.monotonic() + self.agree_timeout
        while not self.store.check([key]) and time.monotonic() < deadline:
            time.sleep(0.001)
        value = json.loads(self.store.compare_set(key, "", "null"))
        return tuple(value) if value else None

    def step_boundary(self) -> list[int]:
        """Admit replacements agreed in-band during this step. Every member calls this after the
        same step; returns the admitted ranks ([] almost always)."""
        if not self.pending_admission():
            return []
        g, joiners, admitted = self.generation, {}, self._admitted
        for n in range(self._admitted + 1, self._admit_target + 1):
            request = self._join_request(n)
            if request and request[0] in self.incarnations:
                break  # its predecessor is still a member: admit once the failure has been agreed
            if request:
                joiners[request[0]] = request[1]
            admitted = n
        if admitted == self._admitted:
            return []
        members = {**self.incarnations, **joiners}
        self.store.compare_set(f"gen/{g + 1}/members", "", json.dumps(sorted(members.items())))
        self.store.compare_set(f"gen/{g + 1}/admitted", "", str(admitted))
        self.store.compare_set("gen", str(g), str(g + 1))
        lost = self._form(g + 1, members)
        if lost:  # a member or joiner died before the new group formed: agreed away already
            raise RankFailure(lost, self.generation, "cause: lost while admitting replacements")
        return sorted(joiners)
