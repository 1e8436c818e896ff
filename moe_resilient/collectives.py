"""The collectives an ElasticGroup offers, over the current generation's backend.

This is the seam where transports plug in: each collective builds its call on a backend (gloo, or for
the all-to-alls among ranks of one host, shared memory: shm.py) and hands it to ``self._run``, which
turns a dead or hung peer into agreement and ``RankFailure``. Shapes are over the ``world_size`` global
ranks; non-members count 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Collectives:
    """Mixed into ElasticGroup, which provides ``members``, ``world_size``, ``_run(work_fn)`` (it passes
    ``gloo``: a call that returns the generation's gloo group), the join word (``_join_word()``,
    ``_agreed_join_word(words)``) and ``_shm`` (shm.ShmExchange or None)."""

    # Host work per call is a handful of small tensors and Python lists: on the hot path, advanced
    # indexing on [W] tensors cost more than the wrapper's whole remaining bookkeeping.
    def exchange_counts(self, send_counts: torch.Tensor) -> torch.Tensor:
        """send_counts [W] int64 (rows for each global rank) -> recv_counts [W]. Also carries the
        join word (see group.py); call ``step_boundary`` after the step."""
        counts, word = send_counts.tolist(), self._join_word()
        send = torch.tensor([v for r in self.members for v in (counts[r], word)], dtype=torch.long)
        recv = torch.empty_like(send)
        splits = [2] * len(self.members)
        self._run(lambda gloo: self._alltoall(gloo, recv, send, splits, splits))
        got = recv.tolist()
        self._agreed_join_word(got[1::2])
        out = [0] * self.world_size
        for r, n in zip(self.members, got[0::2]):
            out[r] = n
        return torch.tensor(out, dtype=torch.long)

    def all_to_all(self, send: torch.Tensor, send_counts: torch.Tensor, recv_counts: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """send [sum(send_counts), ...] rows grouped by destination global rank -> received rows
        grouped by source global rank. Counts are [W]; non-members must be 0. ``out``: a contiguous
        tensor of the received shape and send's dtype to receive into (a buffer reused across calls
        saves faulting in fresh pages each time)."""
        sent, got = send_counts.tolist(), recv_counts.tolist()
        in_splits, out_splits = [sent[r] for r in self.members], [got[r] for r in self.members]
        shape = (sum(out_splits), *send.shape[1:])
        if out is None:
            recv = send.new_empty(shape)
        elif tuple(out.shape) != shape or out.dtype != send.dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {send.dtype} tensor of shape {list(shape)}, got "
                             f"{out.dtype} {list(out.shape)}")
        else:
            recv = out
        send = send.contiguous()
        self._run(lambda gloo: self._alltoall(gloo, recv, send, out_splits, in_splits))
        return recv

    def _alltoall(self, gloo, recv: torch.Tensor, send: torch.Tensor, out_splits: list[int], in_splits: list[int]):
        """Through shared memory when every member shares this host (``self._shm``) and the rows are in
        host memory, else gloo (which stages CUDA tensors through the host)."""
        if self._shm is not None and recv.device.type == "cpu":
            return self._shm.all_to_all(recv, send, out_splits, in_splits, self.members)
        return gloo().alltoall_base(recv, send, out_splits, in_splits)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over the members; ``op`` is "sum" or "max"."""
        opts = dist.AllreduceOptions()
        opts.reduceOp = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        self._run(lambda gloo: gloo().allreduce([tensor], opts))
        return tensor

    def broadcast(self, tensor: torch.Tensor, root: int) -> torch.Tensor:
        """Broadcast from global rank ``root`` (a member)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = self.members.index(root)
        self._run(lambda gloo: gloo().broadcast([tensor], opts))
        return tensor

    def barrier(self) -> None:
        self.all_reduce(torch.zeros(1))
