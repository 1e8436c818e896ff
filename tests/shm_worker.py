"""One rank of the shared-memory transport tests (tests/test_shm.py).

    python shm_worker.py OUT equal          every exchange through shared memory equals gloo's, bit for bit
    python shm_worker.py OUT kill VICTIMS [stop] [receiver] [small]   VICTIMS (1 or 1,2) SIGKILL (or
                            SIGSTOP) themselves halfway through posting (or taking) a large exchange
                            (small: once they have taken one peer's message of a 1-message exchange)
"""

import json
import os
import signal
import sys

import torch

from moe_resilient.group import ElasticGroup, FencedError, RankFailure

SHAPES = [0, 1, 5, 300_000]  # rows to a peer: none, one, a few, and more than one message (1 MiB) of fp32 x 4


def exchange(group, sizes, dtype, width, seed, into=False):
    """Rows for each member: sizes[(src, dst)] rows of ``width``, values from (src, dst, seed); with
    ``into``, received into a given output tensor."""
    g = torch.Generator().manual_seed(seed * 100 + group.rank)
    send_counts = torch.tensor([sizes[(group.rank, d)] for d in range(group.world_size)])
    recv_counts = torch.tensor([sizes[(s, group.rank)] for s in range(group.world_size)])
    send = torch.randn(int(send_counts.sum()), width, generator=g).to(dtype)
    out = torch.full((int(recv_counts.sum()), width), 7.0, dtype=dtype) if into else None
    return group.all_to_all(send, send_counts, recv_counts, out=out)


if __name__ == "__main__":
    out_dir, mode = sys.argv[1], sys.argv[2]
    group = ElasticGroup.from_env(timeout=20.0).start()
    rank, W = group.rank, group.world_size
    result = {"shm": group._shm is not None}
    if mode == "equal":
        equal = []
        for seed in range(12):
            rng = torch.Generator().manual_seed(seed)
            sizes = {(s, d): SHAPES[int(torch.randint(len(SHAPES) - (seed % 2), (1,), generator=rng))]
                     for s in range(W) for d in range(W)}
            for dtype in (torch.float32, torch.bfloat16):
                width = 4 if sizes and max(sizes.values()) > 1000 else 33
                via_shm = exchange(group, sizes, dtype, width, seed, into=seed % 2 == 1)
                shm, group._shm = group._shm, None
                via_gloo = exchange(group, sizes, dtype, width, seed)
                group._shm = shm
                equal.append(bool(torch.equal(via_shm, via_gloo)) and via_shm.dtype == dtype)
        result["equal"] = equal
        try:  # an output of the wrong shape is refused before anything is exchanged, on every rank
            group.all_to_all(torch.zeros(W, 3), torch.ones(W, dtype=torch.long), torch.ones(W, dtype=torch.long),
                             out=torch.empty(W + 1, 3))
        except ValueError as exc:
            result["bad_out"] = str(exc)
        result["after_bad_out"] = exchange(group, {(s, d): 2 for s in range(W) for d in range(W)},
                                           torch.float32, 3, 5).shape[0]
    else:
        victims = [int(v) for v in sys.argv[3].split(",")]
        how = signal.SIGSTOP if "stop" in sys.argv[4:] else signal.SIGKILL
        counted = slice(1, 2) if "receiver" in sys.argv[4:] else slice(0, 1)  # its takes, or its posts
        rows = 7 if "small" in sys.argv[4:] else 300_000  # 1 or 5 messages per pair
        enough = 1 if "small" in sys.argv[4:] else 2
        sizes = {(s, d): rows for s in range(W) for d in range(W)}
        if rank in victims:
            from moe_resilient import shm
            real, hit = shm._exchange, []

            def exchange_then_die(*args):  # dies (or hangs) once it has posted (taken) enough
                *head, state, timeout_us, spin_us = args
                peers = len(head[4])
                while True:
                    done = real(*head, state, min(timeout_us, 200), spin_us)  # in 0.2 ms slices
                    if int(state.view(2, peers)[counted].sum()) >= enough and not hit:
                        hit.append(True)
                        os.kill(os.getpid(), how)
                    if done or timeout_us <= 200:
                        return done
                    timeout_us -= 200
            shm._exchange = exchange_then_die
        before = group._shm
        result.update(error=None, lost=[])
        big = True
        while True:  # goes on; a survivor whose exchange completed before the death sees it in the next
            try:
                if big:
                    exchange(group, sizes, torch.float32, 4, 0)
                else:
                    after = exchange(group, {(s, d): 7 for s in range(W) for d in range(W)}, torch.float32, 3, 1)
                    break
            except RankFailure as failure:
                result["error"] = result["error"] or str(failure)
                result["lost"] += failure.lost_ranks
            except FencedError:  # a hung victim, woken: the others went on without it
                json.dump({"fenced": True}, open(os.path.join(out_dir, f"rank{rank}.json"), "w"))
                os._exit(3)
            big = False
        result["mask"] = before.live.tolist()  # the failed generation's live-rank mask
        result["fresh_mask"] = group._shm.live.tolist()
        result["after_rows"] = after.shape[0]
    json.dump(result, open(os.path.join(out_dir, f"rank{rank}.json"), "w"))
    group.finish()
    sys.stdout.flush()
    os._exit(0)
