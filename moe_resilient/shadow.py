"""ShadowStore: every logical expert's weights in safetensors files, memory-mapped, so a lost expert
can be restored into a free slot from host memory (page cache) or disk without touching the rest of
the model.

Layout of a store directory (``ShadowStore.export``)::

    manifest.json             {"format": "moe_resilient.shadow/1",
                               "layers": {name: {"file", "fingerprint", "num_experts",
                                                 "w13_shape", "w2_shape", "dtype", "step"}}}
    layer_000.safetensors     w13 [E, 2I, H], w2 [E, H, I]: logical expert e is row e
                              metadata: layer, fingerprint, step

A layer's fingerprint hashes its name, expert count, shapes and dtype: a store made for another
model fails ``validate``. ``from_hf_checkpoint`` indexes an existing Hugging Face checkpoint in place
(fused v5 ``experts.gate_up_proj`` / ``down_proj`` or v4 per-expert keys) instead of copying it.
Files are replaced atomically (write a temp file, fsync, rename), so a reader never sees a torn file:
an open memory map keeps the old inode.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from moe_resilient.layer import ResilientMoE

FORMAT = "moe_resilient.shadow/1"
MANIFEST = "manifest.json"


class ShadowStoreError(RuntimeError):
    """A shadow store file is missing, truncated, corrupt, foreign, or does not fit the model."""


def resilient_layers(model: nn.Module) -> dict[str, ResilientMoE]:
    """Qualified name -> ResilientMoE for every such layer in ``model`` ("layer" for a bare layer)."""
    if isinstance(model, ResilientMoE):
        return {"layer": model}
    return {name: m for name, m in model.named_modules() if isinstance(m, ResilientMoE)}


def fingerprint(name: str, num_experts: int, w13_shape, w2_shape, dtype: torch.dtype | str) -> str:
    text = json.dumps([name, num_experts, list(w13_shape), list(w2_shape), str(dtype).replace("torch.", "")])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def layer_fingerprint(name: str, layer: ResilientMoE) -> str:
    return fingerprint(name, layer.config.num_experts, layer.experts.w13.shape[1:], layer.experts.w2.shape[1:],
                       layer.experts.w13.dtype)


def logical_expert_weights(layer: ResilientMoE) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 [E, 2I, H], w2 [E, H, I]) from each expert's first held slot (live or not)."""
    p2l = layer.placement.phy2log.tolist()
    first = {}
    for s, e in enumerate(p2l):
        if e >= 0:
            first.setdefault(e, s)
    missing = [e for e in range(layer.config.num_experts) if e not in first]
    if missing:
        raise ShadowStoreError(f"experts {missing} are held by no slot; nothing to export")
    slots = [first[e] for e in range(layer.config.num_experts)]
    return layer.experts.w13.detach()[slots], layer.experts.w2.detach()[slots]


def _atomic_save(tensors: dict, path: str, metadata: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_json(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class _LayerEntry:
    """Where one layer's experts live: (file, key) pairs per weight, fused or per expert."""

    name: str
    num_experts: int
    w13_shape: tuple
    w2_shape: tuple
    dtype: str
    fingerprint: str
    step: int
    files: dict  # role -> file path; roles: "w13"/"w2" (stacked) or per-expert key patterns
    keys: dict  # role -> tensor key (may contain {e})
    layout: str  # "stacked" (ours and HF v5) or "per_expert" (HF v4)


class ShadowStore:
    """Memory-mapped logical expert weights for every ResilientMoE layer of a model."""

    def __init__(self, directory: str, entries: dict[str, _LayerEntry]):
        self.directory = directory
        self._entries = entries
        self._handles: dict[str, object] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow-refresh")

    # ----------------------------------------------------------------------------------- create / open
    @classmethod
    def export(cls, model: nn.Module, directory: str, *, step: int = 0) -> ShadowStore:
        """Write every logical expert of every ResilientMoE layer of ``model`` to ``directory``."""
        layers = resilient_layers(model)
        if not layers:
            raise ShadowStoreError("the model has no ResilientMoE layer to export")
        os.makedirs(directory, exist_ok=True)
        manifest = {"format": FORMAT, "layers": {}}
        for i, (name, layer) in enumerate(sorted(layers.items())):
            file = f"layer_{i:03d}.safetensors"
            manifest["layers"][name] = cls._write_layer(directory, file, name, layer, step)
        _atomic_write_json(manifest, os.path.join(directory, MANIFEST))
        return cls.open(directory)

    @staticmethod
    def _write_layer(directory: str, file: str, name: str, layer: ResilientMoE, step: int) -> dict:
        w13, w2 = logical_expert_weights(layer)
        fp = layer_fingerprint(name, layer)
        _atomic_save({"w13": w13, "w2": w2}, os.path.join(directory, file),
                     {"layer": name, "fingerprint": fp, "step": str(step)})
        return {"file": file, "fingerprint": fp, "num_experts": w13.shape[0], "w13_shape": list(w13.shape[1:]),
                "w2_shape": list(w2.shape[1:]), "dtype": str(w13.dtype).replace("torch.", ""), "step": step}

    @classmethod
    def open(cls, directory: str) -> ShadowStore:
        """Open a store written by ``export``; every file is opened (memory-mapped) and checked."""
        path = os.path.join(directory, MANIFEST)
        try:
            with open(path) as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise ShadowStoreError(f"{path}: missing; not a shadow store directory") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ShadowStoreError(f"{path}: corrupt manifest ({exc})") from None
        if manifest.get("format") != FORMAT:
            raise ShadowStoreError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        entries = {}
        for name, m in manifest["layers"].items():
            file = os.path.join(directory, m["file"])
            entries[name] = _LayerEntry(
                name, m["num_experts"], tuple(m["w13_shape"]), tuple(m["w2_shape"]), m["dtype"], m["fingerprint"],
                m["step"], {"w13": file, "w2": file}, {"w13": "w13", "w2": "w2"}, "stacked",
            )
        store = cls(directory, entries)
        store._check_files()
        return store

    @classmethod
    def from_hf_checkpoint(cls, checkpoint_dir: str, *, prefix_map=None) -> ShadowStore:
        """Index the MoE experts of a Hugging Face safetensors checkpoint in place (no copy, no model).

        Layer names are the checkpoint's module paths (e.g. ``model.layers.0.mlp``), which are the
        names ``swap_moe_blocks`` gives the swapped layers; ``prefix_map`` renames them if needed."""
        files = sorted(f for f in os.listdir(checkpoint_dir) if f.endswith(".safetensors"))
        if not files:
            raise ShadowStoreError(f"{checkpoint_dir}: no .safetensors files")
        where: dict[str, tuple[str, list]] = {}
        for f in files:
            path = os.path.join(checkpoint_dir, f)
            try:
                with safe_open(path, framework="pt") as h:
                    for key in h.keys():
                        where[key] = (path, h.get_slice(key).get_shape(), h.get_slice(key).get_dtype())
            except Exception as exc:
                raise ShadowStoreError(f"{path}: cannot open as safetensors ({exc})") from None
        entries = {}
        fused = re.compile(r"^(.*)\.experts\.gate_up_proj$")
        per_expert = re.compile(r"^(.*)\.experts\.(\d+)\.(w1|gate_proj)\.weight$")
        for key in sorted(where):
            m = fused.match(key)
            if m and f"{m.group(1)}.experts.down_proj" in where:
                name = m.group(1)
                (f13, s13, dt), (f2, s2, _) = where[key], where[f"{name}.experts.down_proj"]
                entries[name] = (s13[0], tuple(s13[1:]), tuple(s2[1:]), dt, {"w13": f13, "w2": f2},
                                 {"w13": key, "w2": f"{name}.experts.down_proj"}, "stacked")
                continue
            m = per_expert.match(key)
            if m and m.group(2) == "0":
                name, gate = m.group(1), m.group(3)
                up, down = ("w3", "w2") if gate == "w1" else ("up_proj", "down_proj")
                E = 0
                while f"{name}.experts.{E}.{gate}.weight" in where:
                    E += 1
                keys = {r: f"{name}.experts.{{e}}.{k}.weight" for r, k in (("gate", gate), ("up", up), ("down", down))}
                fmap = {r: where[k.format(e=0)][0] for r, k in keys.items()}
                (_, sg, dt), (_, sd, _) = where[keys["gate"].format(e=0)], where[keys["down"].format(e=0)]
                entries[name] = (E, (2 * sg[0], sg[1]), tuple(sd), dt, fmap, keys, "per_expert")
        if not entries:
            raise ShadowStoreError(f"{checkpoint_dir}: no MoE expert weights found")
        prefix_map = prefix_map or {}
        out = {}
        for name, (E, s13, s2, dt, fmap, keys, layout) in entries.items():
            name = prefix_map.get(name, name)
            dtype = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(dt, dt.lower())
            out[name] = _LayerEntry(name, E, s13, s2, dtype, fingerprint(name, E, s13, s2, dtype), 0, fmap, keys,
                                    layout)
        store = cls(checkpoint_dir, out)
        store._check_files()
        return store

    def _handle(self, path: str):
        with self._lock:
            h = self._handles.get(path)
            if h is None:
                try:
                    h = safe_open(path, framework="pt")
                except FileNotFoundError:
                    raise ShadowStoreError(f"{path}: missing") from None
                except Exception as exc:
                    raise ShadowStoreError(f"{path}: truncated or corrupt safetensors file ({exc})") from None
                self._handles[path] = h
            return h

    def _check_files(self) -> None:
        """Open every file and check each tensor's presence, shape and dtype against the manifest."""
        for entry in self._entries.values():
            for role, path in entry.files.items():
                h = self._handle(path)
                key = entry.keys[role].format(e=0)
                if key not in h.keys():
                    raise ShadowStoreError(f"{path}: tensor {key!r} missing (layer {entry.name})")
                shape = h.get_slice(key).get_shape()
                if entry.layout == "stacked":
                    want = [entry.num_experts, *(entry.w13_shape if role == "w13" else entry.w2_shape)]
                    if list(shape) != want:
                        raise ShadowStoreError(f"{path}: tensor {key!r} has shape {list(shape)}, expected {want}")
                dtype = h.get_slice(key).get_dtype()
                want_dt = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(entry.dtype, entry.dtype)
                if dtype != want_dt:
                    raise ShadowStoreError(f"{path}: tensor {key!r} has dtype {dtype}, expected {entry.dtype}")

    # ----------------------------------------------------------------------------------- use
    @property
    def layers(self) -> list[str]:
        return sorted(self._entries)

    def step(self, layer_name: str) -> int:
        """Optimizer step at which ``layer_name``'s experts were written."""
        return self._entry(layer_name).step

    def _entry(self, layer_name: str) -> _LayerEntry:
        try:
            return self._entries[layer_name]
        except KeyError:
            raise ShadowStoreError(f"{self.directory}: no layer {layer_name!r} (has {self.layers})") from None

    def validate(self, model: nn.Module) -> None:
        """Every ResilientMoE layer of ``model`` has a matching entry (name, experts, shapes, dtype)."""
        for name, layer in resilient_layers(model).items():
            entry = self._entry(name)
            if entry.fingerprint != layer_fingerprint(name, layer):
                raise ShadowStoreError(
                    f"{entry.files['w13']}: layer {name!r} does not match the model (fingerprint {entry.fingerprint}, "
                    f"model {layer_fingerprint(name, layer)}: experts {entry.num_experts} vs "
                    f"{layer.config.num_experts}, w13 {list(entry.w13_shape)} vs {list(layer.experts.w13.shape[1:])}, "
                    f"dtype {entry.dtype} vs {layer.experts.w13.dtype})"
                )

    def read_expert(self, layer_name: str, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2I, H], w2 [H, I]) of one logical expert, read from the memory map."""
        entry = self._entry(layer_name)
        if not 0 <= expert < entry.num_experts:
            raise ShadowStoreError(f"layer {layer_name!r} has experts [0, {entry.num_experts}), not {expert}")
        try:
            if entry.layout == "stacked":
                w13 = self._handle(entry.files["w13"]).get_slice(entry.keys["w13"])[expert]
                w2 = self._handle(entry.files["w2"]).get_slice(entry.keys["w2"])[expert]
            else:
                part = {r: self._handle(entry.files[r]).get_tensor(entry.keys[r].format(e=expert))
                        for r in ("gate", "up", "down")}
                w13, w2 = torch.cat([part["gate"], part["up"]], 0), part["down"]
        except ShadowStoreError:
            raise
        except Exception as exc:
            raise ShadowStoreError(f"{entry.files['w13']}: reading expert {expert} of {layer_name!r} failed ({exc})") from None
        if tuple(w13.shape) != tuple(entry.w13_shape) or tuple(w2.shape) != tuple(entry.w2_shape):
            raise ShadowStoreError(f"{entry.files['w13']}: expert {expert} of {layer_name!r} has the wrong shape")
        return w13, w2

    def restore(self, layer: ResilientMoE, layer_name: str, expert: int, slot: int) -> int:
        """Read ``expert`` and write it into ``slot`` of ``layer`` in place, then route to it.
        Reading happens first: a failed read leaves the layer untouched. Returns bytes copied."""
        w13, w2 = self.read_expert(layer_name, expert)
        if w13.dtype != layer.experts.w13.dtype:
            raise ShadowStoreError(f"{self._entry(layer_name).files['w13']}: dtype {w13.dtype} does not match "
                                   f"layer {layer_name!r} ({layer.experts.w13.dtype})")
        layer.load_expert(expert, slot, w13, w2)
        return (w13.numel() + w2.numel()) * w13.element_size()

    # ----------------------------------------------------------------------------------- training
    def refresh(self, model: nn.Module, step: int, *, background: bool = True) -> Future | list[str]:
        """Rewrite the files of layers whose experts changed since they were written (atomic per file)
        and record ``step``. In the background by default: returns a Future of the rewritten names."""
        if not all(e.layout == "stacked" and e.files["w13"].startswith(self.directory) for e in self._entries.values()):
            raise ShadowStoreError("refresh needs a store written by ShadowStore.export")
        snapshot = {n: logical_expert_weights(layer) for n, layer in resilient_layers(model).items()}
        snapshot = {n: (a.clone(), b.clone()) for n, (a, b) in snapshot.items()}  # training goes on
        job = lambda: self._rewrite(snapshot, step)  # noqa: E731
        return self._pool.submit(job) if background else job()

    def _rewrite(self, snapshot, step: int) -> list[str]:
        changed = []
        for name, (w13, w2) in sorted(snapshot.items()):
            entry = self._entry(name)
            h = self._handle(entry.files["w13"])
            if torch.equal(h.get_tensor("w13"), w13) and torch.equal(h.get_tensor("w2"), w2):
                entry.step = step  # verified current at this step
                continue
            path = entry.files["w13"]
            _atomic_save({"w13": w13, "w2": w2}, path, {"layer": name, "fingerprint": entry.fingerprint, "step": str(step)})
            with self._lock:
                self._handles.pop(path, None)  # readers holding the old map keep the old inode
            entry.step = step
            changed.append(name)
        manifest = {"format": FORMAT, "layers": {
            n: {"file": os.path.basename(e.files["w13"]), "fingerprint": e.fingerprint, "num_experts": e.num_experts,
                "w13_shape": list(e.w13_shape), "w2_shape": list(e.w2_shape), "dtype": e.dtype, "step": e.step}
            for n, e in self._entries.items()}}
        _atomic_write_json(manifest, os.path.join(self.directory, MANIFEST))
        return changed
