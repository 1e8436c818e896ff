"""Launcher that survives its workers: hosts the TCPStore and the liveness board, spawns ranks with a
torchrun-compatible environment, tells the group when a rank exits (``dead/{r}/{incarnation}``), never kills
survivors, and with ``respawn`` starts a replacement that rejoins by itself.

torchrun, by contrast, restarts the whole local worker group when a local worker exits non-zero;
a node that vanishes in a multi-node job does not fail the other nodes' workers, whose ElasticGroup
then carries on (see tests/test_torchrun.py).
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
import time

import torch.distributed as dist

from moe_resilient import shm
from moe_resilient.liveness import ENV as LIVENESS_ENV
from moe_resilient.liveness import LivenessBoard

STORE_PREFIX = "moe_resilient/"


class Launcher:
    """Spawn ``nproc`` copies of ``cmd`` as ranks 0..nproc-1. Children are tracked by PID only."""

    def __init__(self, nproc: int, cmd: list[str], *, respawn: bool = False, env: dict | None = None,
                 host: str = "127.0.0.1", log_dir: str | None = None, max_respawns: int = 8):
        if nproc < 1:
            raise ValueError("nproc must be >= 1")
        self.nproc, self.cmd, self.respawn, self.host = nproc, list(cmd), respawn, host
        self.extra_env = dict(env or {})
        self.log_dir = log_dir
        self.max_respawns = max_respawns
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(60))
        self.board = LivenessBoard.create(nproc)  # crash detection within a millisecond (liveness.py)
        self.port = self.store.port
        self.procs: dict[int, subprocess.Popen] = {}
        self.exits: list[tuple[int, int, float]] = []  # (rank, return code, time)
        self.returncodes: dict[int, int] = {}  # pid -> return code, for every process that exited
        self.respawned = 0
        self._reaped: set[int] = set()
        self._logs = []
        self._lock = threading.Lock()  # watcher threads and poll() reap through it
        self._closing = False

    def env_for(self, rank: int) -> dict:
        env = dict(os.environ)
        if self.nproc > 1:  # as torchrun does: one intra-op thread per rank unless told otherwise
            env.setdefault("OMP_NUM_THREADS", "1")
        env.update(self.extra_env)
        env.update(MASTER_ADDR=self.host, MASTER_PORT=str(self.port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(self.nproc), LOCAL_WORLD_SIZE=str(self.nproc), GROUP_RANK="0",
                   TORCHELASTIC_USE_AGENT_STORE="True", **{LIVENESS_ENV: self.board.path})
        return env

    def _spawn(self, rank: int) -> None:
        out = None
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            out = open(os.path.join(self.log_dir, f"rank{rank}.log"), "ab")
            self._logs.append(out)
        proc = subprocess.Popen(self.cmd, env=self.env_for(rank), stdout=out, stderr=subprocess.STDOUT if out else None)
        self.procs[rank] = proc
        # A thread blocked in waitpid posts the death notice the moment the kernel reaps the child,
        # so survivors agree without waiting for a heartbeat timeout or for a poll() loop to come round.
        threading.Thread(target=self._watch, args=(rank, proc), name=f"watch-rank{rank}", daemon=True).start()

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        proc.wait()
        self._reap(rank, proc)

    def start(self) -> Launcher:
        for r in range(self.nproc):
            self._spawn(r)
        return self

    def pid(self, rank: int) -> int:
        return self.procs[rank].pid

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> float:
        """Send ``sig`` to one rank; returns the wall-clock time it was sent."""
        t = time.time()
        os.kill(self.procs[rank].pid, sig)
        return t

    def poll(self) -> None:
        """Reap exited ranks: announce deaths to the group, respawn if asked (the watcher threads
        already do this as each rank exits; polling only makes it certain before reading ``exits``)."""
        for rank, proc in list(self.procs.items()):
            if proc.poll() is not None:
                self._reap(rank, proc)

    def _reap(self, rank: int, proc: subprocess.Popen) -> None:
        with self._lock:
            if proc.pid in self._reaped:
                return
            self._reaped.add(proc.pid)
            rc = proc.returncode
            self.exits.append((rank, rc, time.time()))
            self.returncodes[proc.pid] = rc
            if rc != 0:
                incarnation = self.store.add(f"{STORE_PREFIX}inc/{rank}", 0)  # the one that died
                self.store.set(f"{STORE_PREFIX}dead/{rank}/{incarnation}", "1")
                if self.respawn and self.respawned < self.max_respawns and not self._closing:
                    self.respawned += 1
                    self._spawn(rank)

    def running(self) -> list[int]:
        return [r for r, p in self.procs.items() if p.poll() is None]

    def wait(self, timeout: float) -> dict[int, int]:
        """Until every current rank has exited (or ``timeout``); returns rank -> last return code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            if not self.running():
                self.poll()
                break
            time.sleep(0.01)
        return {r: p.returncode for r, p in self.procs.items()}

    def close(self) -> None:
        """Kill and reap every child still running, by PID."""
        with self._lock:
            self._closing = True  # no respawns from here on
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for f in self._logs:
            f.close()
        self.board.unlink()
        shm.unlink_job(f"{self.host}_{self.port}_")  # what ranks killed mid-generation left behind

    def __enter__(self) -> Launcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def launch_main(nproc: int, script: str, args: list[str], respawn: bool, timeout: float) -> int:
    """``moe-resilient launch``: run until every rank has exited; non-zero if any final exit failed."""
    with Launcher(nproc, [sys.executable, script, *args], respawn=respawn) as launcher:
        codes = launcher.wait(timeout)
    for rank, rc, _ in launcher.exits:
        print(f"rank {rank} exited with {rc}", file=sys.stderr)
    return 0 if all(rc == 0 for rc in codes.values()) else 1


def serve_store(host: str, port: int, echo=print) -> None:
    """``moe-resilient store``: a TCPStore server for ElasticGroup (MOE_RESILIENT_STORE=host:port),
    until this process is killed."""
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(60))
    echo(f"moe_resilient store listening on {host}:{store.port}")
    sys.stdout.flush()
    while True:
        time.sleep(3600)
