"""Routing-state checkpoint (ReviveMoE): placement and load statistics of every ResilientMoE layer,
written to one safetensors file atomically (temp file, fsync, rename) and restorable into a live
model in place."""

from __future__ import annotations

import json

import torch
from torch import nn

from moe_resilient.placement import PlacementError
from moe_resilient.shadow import (
    MappedSafetensors, ShadowStore, ShadowStoreError, _atomic_save, checksum, layer_fingerprint, resilient_layers,
)

_FIELDS = ("phy2log", "slot_rank", "active")
_CHECKSUMS = "__checksums__"  # metadata key: tensor name -> checksum, so a flipped bit is refused


def save_routing_state(model: nn.Module, path: str) -> None:
    tensors, meta = {}, {}
    for name, layer in resilient_layers(model).items():
        for f in _FIELDS:
            tensors[f"{name}/{f}"] = getattr(layer.placement, f).detach().cpu().clone()
        tensors[f"{name}/expert_load"] = layer.expert_load.detach().cpu().clone()
        meta[name] = layer_fingerprint(name, layer)
    meta[_CHECKSUMS] = json.dumps({k: checksum(v) for k, v in tensors.items()})
    _atomic_save(tensors, path, meta)


def _read(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    f = MappedSafetensors(path)
    saved = {k: f.view(k).clone() for k in f.keys()}
    sums = json.loads(f.metadata.get(_CHECKSUMS, "{}"))
    for k, t in saved.items():
        if k in sums and sums[k] != checksum(t):
            raise ShadowStoreError(f"{path}: tensor {k!r} fails its checksum: the file is corrupt")
    return f.metadata, saved


def load_routing_state(model: nn.Module, path: str, *, shadow: ShadowStore | None = None) -> None:
    """Bring every layer to the saved placement and load statistics, in place.

    A slot whose saved expert differs from what it holds now gets that expert's weights from a
    current live replica, else from ``shadow``. Everything, for every layer, is read and checked
    before anything is written: a bad file raises and leaves the model as it was. Slots being
    rewritten leave routing before their weights change."""
    meta, saved = _read(path)
    staged = []
    for name, layer in resilient_layers(model).items():
        if meta.get(name) != layer_fingerprint(name, layer):
            raise ShadowStoreError(f"{path}: no matching routing state for layer {name!r}")
        p = layer.placement
        missing = [f for f in (*_FIELDS, "expert_load") if f"{name}/{f}" not in saved]
        if missing:
            raise ShadowStoreError(f"{path}: tensors {[f'{name}/{f}' for f in missing]} missing")
        state = {f: saved[f"{name}/{f}"] for f in (*_FIELDS, "expert_load")}
        if not torch.equal(state["slot_rank"], p.slot_rank.cpu()):
            raise ShadowStoreError(f"{path}: layer {name!r} slot_rank differs from the model's")
        if tuple(state["expert_load"].shape) != tuple(layer.expert_load.shape):
            raise ShadowStoreError(f"{path}: layer {name!r} expert_load has shape {list(state['expert_load'].shape)}")
        try:
            p.check(state["phy2log"], state["active"], allow_uncovered=True)
        except PlacementError as exc:
            raise PlacementError(f"{path}: layer {name!r}: {exc}") from None
        target = state["phy2log"]
        changing = [s for s in range(p.num_slots) if int(target[s]) >= 0 and int(target[s]) != int(p.phy2log[s])]
        weights = {}
        for e in {int(target[s]) for s in changing if layer.experts.holds(s)}:  # each rank writes its own slots
            live = [s for s in p.slots_of(e) if layer.experts.holds(s)]
            if live:
                weights[e] = tuple(w.clone() for w in layer.experts.slot_weights(live[0]))
            elif shadow is not None:
                weights[e] = shadow.read_expert(name, e)
            else:
                raise ShadowStoreError(f"{path}: expert {e} of {name!r} has no live replica and no shadow was given")
        staged.append((layer, state, changing, weights))
    for layer, state, changing, weights in staged:  # checked above: nothing here can fail
        p = layer.placement
        p.remap([-1 if s in changing else int(v) for s, v in enumerate(p.phy2log.tolist())], allow_uncovered=True)
        for s in changing:
            if layer.experts.holds(s):
                layer.experts.write_slot(s, *weights[int(state["phy2log"][s])])
        p.set_state(state["phy2log"], state["active"], allow_uncovered=True)
        with torch.no_grad():
            layer.expert_load.copy_(state["expert_load"])
