"""The front door of a serving job: starts the ranks (``worker.py``) under the launcher, hands them
requests through the job's store, and streams each request's tokens back to its client once each.

    cluster = ServingCluster("tiny-qwen3-moe", nproc=4, work_dir=tmp).start()
    stream = cluster.submit([5, 7, 9], max_new_tokens=32)
    for token in stream: ...        # blocks per token; raises StreamTimeout past the deadline

Ranks send their tokens over one socket each. A token whose index the stream already holds is not
passed on again (a survivor that takes a lost rank's request over re-sends its journal), and one that
differs from what was passed on is recorded in ``mismatches``: a failure-free run and a run with a
failure must stream the same tokens.

``recovery="restart"``: the baseline a plain serving system gives. When a rank dies, every rank is
killed and the job relaunched (load, group, shadow), and every unfinished request resubmitted and
recomputed from its prompt; its client still sees each token once.
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import torch.distributed as dist

from moe_resilient.launch import Launcher
from moe_resilient.serving import models
from moe_resilient.serving.engine import Request
from moe_resilient.serving.worker import EVENTS_ENV


class StreamTimeout(TimeoutError):
    """No token came for a stream within its deadline."""


@dataclass
class Stream:
    """One request's tokens as its client receives them. ``times``: time.time() each token reached the
    front door; ``submitted``: when the request was."""

    request_id: str
    max_new_tokens: int
    submitted: float
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    finished: bool = False
    listeners: list = field(default_factory=list)  # called (on the receiving thread) after new tokens
    _pending: dict = field(default_factory=dict)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def _offer(self, index: int, token: int, finished: bool, now: float) -> str | None:
        """Take a token from a rank; returns a mismatch description, if any."""
        with self._cond:
            if index < len(self.tokens):
                return None if self.tokens[index] == token else (
                    f"{self.request_id}[{index}]: streamed {self.tokens[index]}, later computed {token}")
            self._pending[index] = (token, finished)
            while len(self.tokens) in self._pending:
                token, finished = self._pending.pop(len(self.tokens))
                self.tokens.append(token)
                self.times.append(now)
                self.finished = finished or len(self.tokens) >= self.max_new_tokens
            self._cond.notify_all()
        for listener in self.listeners:
            listener()
        return None

    def wait(self, timeout: float = 60.0) -> list[int]:
        """Until finished; the tokens."""
        for _ in self.iter(timeout):
            pass
        return self.tokens

    def iter(self, timeout: float = 60.0):
        """Tokens as they come, each within ``timeout`` of the one before."""
        i = 0
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: len(self.tokens) > i or self.finished, timeout):
                    raise StreamTimeout(f"request {self.request_id}: no token for {timeout} s after {i}")
                new, done = self.tokens[i:], self.finished
            yield from new
            i += len(new)
            if done and i >= len(self.tokens):
                return

    __iter__ = iter


class ServingCluster:
    """``nproc`` ranks serving ``model`` (an HF checkpoint directory or ``tiny-qwen3-moe``): collocated,
    or with ``expert_ranks`` K disaggregated (the last K ranks run experts only, the others attention).
    ``restore``: "checkpoint" (per-request KV checkpoints; a lost rank's requests recompute only past
    them) or "recompute" (they re-prefill everything). ``recovery``: "repair" (survivors go on) or
    "restart" (relaunch the job)."""

    def __init__(self, model: str, nproc: int, work_dir: str, *, block_tokens: int = 16, restore: str = "checkpoint",
                 recovery: str = "repair", max_step_tokens: int = 128, expert_ranks: int = 0,
                 log_dir: str | None = None, env: dict | None = None):
        if restore not in ("checkpoint", "recompute"):
            raise ValueError(f"restore {restore!r}: use 'checkpoint' or 'recompute'")
        if recovery not in ("repair", "restart"):
            raise ValueError(f"recovery {recovery!r}: use 'repair' or 'restart'")
        if not 0 <= expert_ranks < nproc:
            raise ValueError(f"expert_ranks {expert_ranks}: at least one of the {nproc} ranks must run attention")
        self.nproc, self.work_dir, self.recovery = nproc, work_dir, recovery
        self.attention = list(range(nproc - expert_ranks))
        self.checkpoint = models.materialize(model, work_dir)
        self.args = ["--block-tokens", str(block_tokens), "--restore", restore, "--max-step-tokens",
                     str(max_step_tokens), "--expert-ranks", str(expert_ranks)]
        self.log_dir, self.env = log_dir, dict(env or {})
        self.streams: dict[str, Stream] = {}
        self.specs: list[dict] = []  # every request submitted, in order
        self.adoptions: list[dict] = []
        self.mismatches: list[str] = []
        self.restarts: list[tuple[float, float]] = []  # (rank death seen, every rank ready again)
        self.launcher: Launcher | None = None
        self._lock = threading.Lock()
        self._ready: dict[int, int] = {}  # rank -> pid, once serving
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._closing = False

    # ------------------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 120.0) -> ServingCluster:
        threading.Thread(target=self._receive, name="serve-events", daemon=True).start()
        self._launch(timeout)
        if self.recovery == "restart":
            threading.Thread(target=self._watch_restart, name="serve-restart", daemon=True).start()
        return self

    def _launch(self, timeout: float) -> None:
        run_dir = tempfile.mkdtemp(prefix="run", dir=self.work_dir)  # journals and checkpoints of this launch
        env = {EVENTS_ENV: f"127.0.0.1:{self._listener.getsockname()[1]}", **self.env}
        cmd = [sys.executable, "-m", "moe_resilient.serving.worker", self.checkpoint, run_dir, *self.args]
        with self._lock:
            self._ready = {}
            self._count = 0
        self.launcher = Launcher(self.nproc, cmd, env=env, log_dir=self.log_dir).start()
        self.store = dist.PrefixStore("moe_resilient", self.launcher.store)
        deadline = time.monotonic() + timeout
        while len(self._ready) < self.nproc:
            self.launcher.poll()
            if any(rc != 0 for _, rc, _ in self.launcher.exits):
                raise RuntimeError(f"a rank exited while starting: {self.launcher.exits} (logs: {self.log_dir})")
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.nproc)) - set(self._ready))
                raise TimeoutError(f"ranks {missing} not ready in {timeout} s")
            time.sleep(0.01)

    def close(self) -> None:
        self._closing = True
        if self.launcher is not None:
            try:
                self.store.set("serve/stop", "1")
                self.launcher.wait(15)
            finally:
                self.launcher.close()
        self._selector.close()
        self._listener.close()

    def __enter__(self) -> ServingCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ requests
    def submit(self, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0, seed: int = 0,
               eos: int | None = None) -> Stream:
        with self._lock:
            request_id = f"r{len(self.specs)}"
            spec = {"request_id": request_id, "prompt": [int(t) for t in prompt], "max_new_tokens": max_new_tokens,
                    "temperature": temperature, "seed": seed, "eos": eos}
            Request(**spec)  # a bad request is refused here, before any rank sees it
            stream = self.streams[request_id] = Stream(request_id, max_new_tokens, time.time())
            self.specs.append(spec)
            self._post(spec)
        return stream

    def _post(self, spec: dict) -> None:
        self.store.set(f"serve/req/{self._count}", json.dumps(spec))
        self._count += 1
        self.store.add("serve/count", 1)  # after the spec: a rank reads only requests below the count

    def home(self, n: int) -> int:
        """The rank request n (the n-th submitted) starts on."""
        return self.attention[n % len(self.attention)]

    @property
    def pids(self) -> dict[int, int]:
        """rank -> pid of every rank that has started serving."""
        return dict(self._ready)

    def kill(self, rank: int, sig: int) -> float:
        return self.launcher.kill(rank, sig)

    # ------------------------------------------------------------------------------ events
    def _receive(self) -> None:
        buffers: dict[socket.socket, bytes] = {}
        while not self._closing:
            try:
                ready = self._selector.select(timeout=0.1)
            except (OSError, ValueError):
                return
            for key, _ in ready:
                sock = key.fileobj
                if sock is self._listener:
                    conn, _ = self._listener.accept()
                    conn.setblocking(False)
                    self._selector.register(conn, selectors.EVENT_READ)
                    buffers[conn] = b""
                    continue
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                except ConnectionError:
                    data = b""
                if not data:  # the rank exited or died
                    self._selector.unregister(sock)
                    sock.close()
                    buffers.pop(sock, None)
                    continue
                *lines, buffers[sock] = (buffers[sock] + data).split(b"\n")
                now = time.time()
                for line in lines:
                    self._handle(json.loads(line), now)

    def _handle(self, message: dict, now: float) -> None:
        if "ready" in message:
            with self._lock:
                self._ready[message["ready"]] = message["pid"]
        elif "adopt" in message:
            self.adoptions.append(message["adopt"])
        for request_id, index, token, _, finished in message.get("tokens", ()):
            stream = self.streams.get(request_id)
            if stream is not None and (bad := stream._offer(index, token, finished, now)):
                self.mismatches.append(bad)

    # ------------------------------------------------------------------------------ restart baseline
    def _watch_restart(self) -> None:
        while not self._closing:
            self.launcher.poll()
            if any(rc != 0 for _, rc, _ in self.launcher.exits):
                seen = time.time()
                self.launcher.close()
                self._launch(timeout=120)
                with self._lock:
                    for spec in self.specs:
                        if not self.streams[spec["request_id"]].finished:
                            self._post(spec)
                self.restarts.append((seen, time.time()))
            time.sleep(0.005)
