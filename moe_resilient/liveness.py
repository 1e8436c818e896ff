"""Same-host crash detection that does not wait for a dead process's memory to be freed.

A killed process closes its sockets only after the kernel has torn down its address space, which
takes longer the larger it is (benchmarks/test_detection.py: 41 ms at +100 MiB, 326 ms at +3 GiB on top
of ``import torch``); its robust mutexes are released at the start of its exit. The launcher creates a board of one robust, process-shared
mutex per rank (csrc/process/liveness.cpp) and names it in ``MOE_RESILIENT_LIVENESS``; each rank holds
its own for life (``ElasticGroup.start`` does), and a collective that waits probes its peers'.
Ranks on other hosts (torchrun multi-node) are not on the board: their crashes are seen by sockets.
"""

from __future__ import annotations

import os
import tempfile
import uuid

from moe_resilient import _C

ENV = "MOE_RESILIENT_LIVENESS"


class LivenessBoard:
    """A board of one liveness slot per rank, named by its file path (shared by every process)."""

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def create(cls, num_ranks: int, directory: str | None = None) -> LivenessBoard:
        """A new board of ``num_ranks`` free slots, in /dev/shm where there is one."""
        directory = directory or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
        path = os.path.join(directory, f"moe_resilient_liveness_{os.getpid()}_{uuid.uuid4().hex[:8]}")
        _C.liveness_create(path, num_ranks)
        return cls(path)

    @classmethod
    def from_env(cls) -> LivenessBoard | None:
        path = os.environ.get(ENV)
        return cls(path) if path else None

    def hold(self, rank: int) -> None:
        """Mark ``rank`` alive until the calling thread ends: call it from the thread that lives as
        long as the rank does (the main thread)."""
        _C.liveness_hold(self.path, rank)

    def dead(self, ranks) -> list[int]:
        """Those of ``ranks`` whose slot nobody holds (exited, or not started); reads only."""
        return _C.liveness_dead(self.path, list(ranks))

    def watch(self, ranks) -> None:
        """Watch ``ranks``' slots from native threads, blocked in their locks: a shared-memory
        exchange waiting in this process wakes the moment one of them dies (csrc/process/liveness.cpp)."""
        _C.liveness_watch(self.path, list(ranks))

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
