"""What the fault tests share: reading the drill workers' records, waiting with a deadline, a free
port, and checking every saved output against the single-process model."""

import glob
import os
import socket
import time

import torch

from moe_resilient.drill import make_batch, read_records


def records(out: str, rank: int) -> list[dict]:
    return read_records(os.path.join(out, f"rank{rank}.jsonl"))


def free_port() -> int:
    """A TCP port free on loopback just now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str, poll: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(poll)
    raise TimeoutError(f"timed out waiting for {what}")


def check_outputs(out: str, reference, tokens: int) -> int:
    """Every saved output equals the single-process model's for its (step, batch); returns how many."""
    paths = glob.glob(os.path.join(out, "out_s*_b*.pt"))
    with torch.no_grad():
        for path in paths:
            step, batch = (int(p[1:]) for p in os.path.basename(path)[:-3].split("_")[1:])
            torch.testing.assert_close(torch.load(path), reference(make_batch(step, batch, tokens)), rtol=1e-5,
                                       atol=1e-5, msg=path)
    return len(paths)
