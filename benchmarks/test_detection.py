"""How soon a SIGKILLed process is seen dead: through the liveness board (a robust mutex it held) and
through a socket it held, for processes of growing size. Linux frees a dying process's memory before
it closes its files; it releases its robust futexes first of all.

    python -m pytest benchmarks/test_detection.py --benchmark-json=benchmarks/results/detection.json
"""

import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest

from moe_resilient.liveness import LivenessBoard

CHILD = """
import socket, sys, time
import torch
from moe_resilient.liveness import LivenessBoard
LivenessBoard(sys.argv[1]).hold(0)
conn = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
ballast = torch.ones(int(sys.argv[3]) << 18)  # MiB of touched memory
conn.sendall(b"r")
time.sleep(600)
"""


def _one_kill(mib: int, env: dict | None = None) -> tuple[float, float]:
    """Seconds from SIGKILL to (the board showing the slot free, the socket reading EOF)."""
    board = LivenessBoard.create(1)
    server = socket.create_server(("127.0.0.1", 0))
    child = subprocess.Popen([sys.executable, "-c", CHILD, board.path, str(server.getsockname()[1]), str(mib)],
                             env={**os.environ, **(env or {})})
    try:
        server.settimeout(60)
        conn, _ = server.accept()
        conn.settimeout(60)
        assert conn.recv(1) == b"r"
        seen = {}

        def watch_socket():
            conn.recv(1)  # b"" once the peer's socket is closed
            seen["socket"] = time.perf_counter()

        watcher = threading.Thread(target=watch_socket)
        watcher.start()
        t0 = time.perf_counter()
        os.kill(child.pid, signal.SIGKILL)
        while not board.dead([0]):
            if time.perf_counter() - t0 > 30:
                raise TimeoutError("the board never showed the killed process dead")
        seen["board"] = time.perf_counter()
        watcher.join(60)
        return seen["board"] - t0, seen["socket"] - t0
    finally:
        child.kill()
        child.wait(timeout=30)
        server.close()
        board.unlink()


KILLS = 5


def _median_kills(benchmark, mib: int, env: dict | None = None) -> tuple[float, float]:
    """Median milliseconds from SIGKILL to (the board, the socket) over KILLS kills."""
    samples = benchmark.pedantic(lambda: [_one_kill(mib, env) for _ in range(KILLS)], rounds=1, iterations=1)
    return tuple(statistics.median(x[i] for x in samples) * 1e3 for i in (0, 1))


@pytest.mark.parametrize("mib", [100, 300, 1000, 3000])
def test_crash_detection(benchmark, mib):
    board, sock = _median_kills(benchmark, mib)
    benchmark.extra_info.update(mib=mib, board_ms=board, socket_ms=sock, kills=KILLS)
    print(f"\n{mib} MiB: board {board:.2f} ms, socket {sock:.1f} ms (median of {KILLS} kills)")


@pytest.mark.parametrize("tunables", ["glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=1"])
def test_teardown_with_huge_pages(benchmark, tunables):
    """The socket closes when the teardown ends: malloc's memory in transparent huge pages (the
    launcher's default for its ranks) frees faster."""
    _, sock = _median_kills(benchmark, 1000, {"GLIBC_TUNABLES": tunables})
    benchmark.extra_info.update(tunables=tunables, mib=1000, socket_ms=sock, kills=KILLS)
    print(f"\n{tunables}: socket {sock:.1f} ms (median of {KILLS} kills, +1000 MiB)")


# ---------------------------------------------------------------------------------------------
# Across hosts there is no liveness board and no launcher's death notice: two torchrun "nodes" on
# localhost, node 1 lost whole (SIGKILL of agent and workers) or hung (SIGSTOP of its workers). The
# survivors' first detection after the fault, from the drill worker's records.

NODE_FAULTS = 3


def _node_fault(tmp_path, hang: bool) -> float:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_torchrun import _children, _kill_tree, _reap, _two_nodes, _wait_serving

    from moe_resilient.drill import read_records

    # two "nodes" on one host stand for two hosts, whose all-to-alls go through gloo, not shared memory
    nodes, out = _two_nodes(tmp_path, 1 << 20, env={**os.environ, "MOE_RESILIENT_TRANSPORT": "gloo"})
    try:
        _wait_serving(out, 2, steps=20)
        t_fault = time.time()
        if hang:
            for pid in _children(nodes[1].pid):
                os.kill(pid, signal.SIGSTOP)
        else:
            _kill_tree(nodes[1].pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            failures = [x for r in (0, 1) for x in read_records(out / f"rank{r}.jsonl") if x.get("event") == "failure"]
            if failures:
                return min(f["t_detect"] for f in failures) - t_fault
            time.sleep(0.01)
        raise TimeoutError("node 0 never detected the fault")
    finally:
        _reap(nodes)


@pytest.mark.parametrize("fault", ["node-sigkill", "node-sigstop"])
def test_cross_host_detection(benchmark, tmp_path_factory, fault):
    samples = benchmark.pedantic(lambda: [_node_fault(tmp_path_factory.mktemp(fault), fault == "node-sigstop")
                                          for _ in range(NODE_FAULTS)], rounds=1, iterations=1)
    ms = sorted(s * 1e3 for s in samples)
    benchmark.extra_info.update(fault=fault, detection_ms=ms)
    print(f"\n{fault}: detection {statistics.median(ms):.0f} ms median of {NODE_FAULTS} ({ms})")
