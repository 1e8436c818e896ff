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
    """A slot's weights, then its rows of the tracked optimizer state (experts.track_optimizer), as bytes."""
    e = layer.experts
    return [t.reshape(-1).view(torch.uint8) for t in (*e.slot_weights(slot), *e.slot_state(slot))]


def _payload_bytes(layer: ResilientMoE) -> int:
    return layer.experts.slot_bytes + layer.experts.slot_state_bytes


def transfer(layers: dict[str, ResilientMoE], copies: list[PeerCopy], group: ElasticGroup, name: str
             ) -> dict[PeerCopy, list[torch.Tensor]]:
    """Run ``copies`` (the same list, in the same order, on every member). Returns what this rank
    received: per copy, its weights (w13, w2) and its tracked optimizer state rows, to write with
    ``write``; nothing is written here. Raises RankFailure (on every member alike, through the
    commit) if a member is lost."""
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
            send_counts[dst] += _payload_bytes(layer)
        if dst == me:
            mine.append((c, src))
            recv_counts[src] += _payload_bytes(layer)
    flat = [t for per_rank in send for t in per_rank]
    payload = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8)
    got = group.all_to_all(payload, torch.tensor(send_counts), torch.tensor(recv_counts))
    group.commit(name)
    # rows arrive grouped by source rank, each source's in copy order
    at, start = {}, 0
    for r in range(group.world_size):
        at[r], start = start, start + recv_counts[r]
    received = {}
    for c, src in mine:
        e = layers[c.layer].experts
        pieces = []
        for like in (*e.slot_weights(c.target), *e.slot_state(c.target)):  # the senders' layout
            n = like.numel() * like.element_size()
            pieces.append(got[at[src]: at[src] + n].view(like.dtype).view(like.shape))
            at[src] += n
        received[c] = pieces
    return received


def write(layers: dict[str, ResilientMoE], received: dict[PeerCopy, list[torch.Tensor]]) -> None:
    """Write what ``transfer`` received into the target slots, weights and optimizer state."""
    for c, (w13, w2, *state) in received.items():
        layers[c.layer].experts.write_slot(c.target, w13, w2, state=state)
