"""Peer weight transfer: experts' weights copied from the rank that holds a live replica into a slot
on another rank, over the group.

Every member holds the same copy list (plans are deterministic), so each derives the same byte counts
with no exchange: one all-to-all of raw bytes, then ``group.commit``, which succeeds on every member
or on none. Callers route to the targets only once it has succeeded, so a transfer cut by a failure
leaves every member's placement alike; they fall back to the shadow store or skip the copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_resilient.group import ElasticGroup
from moe_resilient.layer import ResilientMoE


@dataclass(frozen=True)
class PeerCopy:
    """Copy ``expert`` of layer ``layer`` from ``src`` (a slot holding a live replica) into ``target``."""

    layer: str
    expert: int
    src: int
    target: int


def _slot_payload(layer: ResilientMoE, slot: int) -> list[torch.Tensor]:
    return [w.reshape(-1).view(torch.uint8) for w in layer.experts.slot_weights(slot)]


def transfer(layers: dict[str, ResilientMoE], copies: list[PeerCopy], group: ElasticGroup, name: str
             ) -> list[PeerCopy]:
    """Run ``copies`` (the same list, in the same order, on every member) and write each into its
    target slot on the target's owner; placements are not touched. Returns the copies this rank
    received. Raises RankFailure (on every member alike, through the commit) if a member is lost."""
    me = group.rank
    send: list[list[torch.Tensor]] = [[] for _ in range(group.world_size)]
    send_counts = [0] * group.world_size
    recv_counts = [0] * group.world_size
    mine = []  # (copy, source rank) of each copy this rank receives, in the senders' order
    for c in copies:
        layer = layers[c.layer]
        owner = layer.placement.slot_rank
        src, dst = int(owner[c.src]), int(owner[c.target])
        if src == dst:
            raise ValueError(f"{c}: source and target are on rank {src}; copy it locally")
        if src == me:
            send[dst] += _slot_payload(layer, c.src)
            send_counts[dst] += layer.experts.slot_bytes
        if dst == me:
            mine.append((c, src))
            recv_counts[src] += layer.experts.slot_bytes
    flat = [t for per_rank in send for t in per_rank]
    payload = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)
    got = group.all_to_all(payload, torch.tensor(send_counts), torch.tensor(recv_counts))
    group.commit(name)
    # rows arrive grouped by source rank, each source's in copy order
    at, start = {}, 0
    for r in range(group.world_size):
        at[r], start = start, start + recv_counts[r]
    for c, src in mine:
        layer = layers[c.layer]
        n13 = layer.experts.w13[0].numel() * layer.experts.w13.element_size()
        n = layer.experts.slot_bytes
        raw = got[at[src]: at[src] + n]
        at[src] += n
        w13 = raw[:n13].view(layer.experts.w13.dtype).view(layer.experts.w13.shape[1:])
        w2 = raw[n13:].view(layer.experts.w2.dtype).view(layer.experts.w2.shape[1:])
        layer.experts.write_slot(c.target, w13, w2)
    return [c for c, _ in mine]
