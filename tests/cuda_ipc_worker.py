"""One rank of the CUDA IPC transport test (tests/test_cuda_ipc.py), all ranks sharing GPU 0:

1. three eager exchanges, each rank's rows for every destination named by (src, dst, exchange);
2. one exchange captured in a CUDA graph and replayed twice;
3. rank 2 leaves; the others clear its bit in the live mask and replay the same graph: its rows count
   none, and nobody waits for it;
4. rank 1 SIGKILLs itself; rank 0 exchanges eagerly and finds it cleared in the mask at the deadline.

    python cuda_ipc_worker.py OUT
"""

import json
import os
import signal
import sys

import torch

from moe_resilient.cuda_ipc import CudaIpcExchange
from moe_resilient.group import ElasticGroup

CAPACITY = 4096

if __name__ == "__main__":
    out = sys.argv[1]
    group = ElasticGroup.from_env(timeout=60.0, heartbeat_timeout=5.0).start()
    rank, W = group.rank, group.world_size
    torch.cuda.set_device(0)
    ex = CudaIpcExchange(group, CAPACITY, timeout_cycles=500_000_000)
    send = torch.zeros(W, CAPACITY, dtype=torch.uint8, device="cuda")
    send_bytes = torch.tensor([16 * (1 + rank + 3 * d) for d in range(W)], dtype=torch.int64, device="cuda")

    def fill(k):
        for d in range(W):
            send[d].fill_((rank * 16 + d * 4 + k) % 251)

    def check(recv, recv_bytes, k, sources):
        got = recv_bytes.tolist()
        ok = True
        for s in range(W):
            n = 16 * (1 + s + 3 * rank) if s in sources else 0
            ok &= got[s] == n and bool((recv[s, :n] == (s * 16 + rank * 4 + k) % 251).all())
        return ok

    result = {"eager": [], "graph": []}
    for k in range(3):
        fill(k)
        result["eager"].append(check(*ex.exchange(send, send_bytes), k, range(W)))
    recv, recv_bytes = torch.empty_like(send), torch.empty_like(send_bytes)
    fill(7)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ex.exchange(send, send_bytes, out=(recv, recv_bytes))
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        result["graph"].append(check(recv, recv_bytes, 7, range(W)))
    group.gather("after-graph", "1")
    if rank == 2:
        json.dump(result, open(os.path.join(out, f"rank{rank}.json"), "w"))
        os._exit(0)
    ex.live[2] = 0  # as agreement would: rank 2 is gone
    graph.replay()
    torch.cuda.synchronize()
    result["graph_without_2"] = check(recv, recv_bytes, 7, [0, 1])
    group.gather("before-kill", "1")
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    fill(9)
    recv, recv_bytes = ex.exchange(send, send_bytes)
    torch.cuda.synchronize()
    result["after_kill"] = check(recv, recv_bytes, 9, [0])
    result["live"] = ex.live.tolist()
    json.dump(result, open(os.path.join(out, f"rank{rank}.json"), "w"))
    os._exit(0)
