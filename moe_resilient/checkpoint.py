"""Routing-state checkpoint (ReviveMoE): placement and load statistics of every ResilientMoE layer,
written to one safetensors file atomically (temp file, fsync, rename) and restorable into a live
model in place."""

from __future__ import annotations

import torch
from safetensors import safe_open
from torch import nn

from moe_resilient.shadow import ShadowStore, ShadowStoreError, _atomic_save, layer_fingerprint, resilient_layers

_FIELDS = ("phy2log", "slot_rank", "active")


def save_routing_state(model: nn.Module, path: str) -> None:
    tensors, meta = {}, {}
    for name, layer in resilient_layers(model).items():
        for f in _FIELDS:
            tensors[f"{name}/{f}"] = getattr(layer.placement, f).detach().cpu().clone()
        tensors[f"{name}/expert_load"] = layer.expert_load.detach().cpu().clone()
        meta[name] = layer_fingerprint(name, layer)
    _atomic_save(tensors, path, meta)


def load_routing_state(model: nn.Module, path: str, *, shadow: ShadowStore | None = None) -> None:
    """Bring every layer to the saved placement and load statistics, in place.

    A slot whose saved expert differs from what it holds now gets that expert's weights from a
    current live replica, else from ``shadow``. Everything is read and checked before anything is
    written; slots being rewritten leave routing before their weights change."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            saved = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise ShadowStoreError(f"{path}: missing") from None
    except Exception as exc:
        raise ShadowStoreError(f"{path}: truncated or corrupt routing state ({exc})") from None
    staged = []
    for name, layer in resilient_layers(model).items():
        if meta.get(name) != layer_fingerprint(name, layer):
            raise ShadowStoreError(f"{path}: no matching routing state for layer {name!r}")
        p = layer.placement
        state = {f: saved[f"{name}/{f}"] for f in (*_FIELDS, "expert_load")}
        if not torch.equal(state["slot_rank"], p.slot_rank.cpu()):
            raise ShadowStoreError(f"{path}: layer {name!r} slot_rank differs from the model's")
        target = state["phy2log"]
        changing = [s for s in range(p.num_slots) if int(target[s]) >= 0 and int(target[s]) != int(p.phy2log[s])]
        weights = {}
        for e in {int(target[s]) for s in changing}:
            live = p.slots_of(e)
            if live:
                weights[e] = (layer.experts.w13[live[0]].detach().clone(), layer.experts.w2[live[0]].detach().clone())
            elif shadow is not None:
                weights[e] = shadow.read_expert(name, e)
            else:
                raise ShadowStoreError(f"{path}: expert {e} of {name!r} has no live replica and no shadow was given")
        staged.append((layer, state, changing, weights))
    for layer, state, changing, weights in staged:
        p = layer.placement
        p.remap([-1 if s in changing else int(v) for s, v in enumerate(p.phy2log.tolist())], allow_uncovered=True)
        for s in changing:
            layer.experts.write_slot(s, *weights[int(state["phy2log"][s])])
        p.set_state(state["phy2log"], state["active"], allow_uncovered=True)
        with torch.no_grad():
            layer.expert_load.copy_(state["expert_load"])
