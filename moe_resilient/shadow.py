"""ShadowStore: every logical expert's weights in safetensors files, memory-mapped, so a lost expert
can be restored into a free slot from host memory (page cache) or disk without touching the rest of
the model.

Layout of a store directory (``ShadowStore.export``)::

    manifest.json             {"format": "moe_resilient.shadow/1",
                               "layers": {name: {"file", "fingerprint", "num_experts",
                                                 "w13_shape", "w2_shape", "dtype", "step"}}}
    layer_000.safetensors     w13 [E, 2I, H], w2 [E, H, I]: logical expert e is row e
                              metadata: layer, fingerprint, step, checksums
                              ({"w13": [E hex], "w2": [E hex]}: one per expert row, see below)

A layer's fingerprint hashes its name, expert count, shapes and dtype: a store made for another
model fails ``validate``. ``from_hf_checkpoint`` indexes an existing Hugging Face checkpoint in place
(fused v5 ``experts.gate_up_proj`` / ``down_proj`` or v4 per-expert keys) instead of copying it.
Files are replaced atomically (write a temp file, fsync, rename), so a reader never sees a torn file:
an open memory map keeps the old inode. Checksums live in the file they describe, so data and checksums
are replaced together.

Every file is memory-mapped once (copy-on-write, never written) and its header parsed here, so a
restore copies an expert straight from the page cache into its slot, computing the row's checksum in
the same pass (``copy_checksum`` in csrc/cpu/checksum.cpp). A row whose checksum differs raises
``ShadowStoreError`` naming file, tensor and expert, and the slot stays out of routing. Stores indexed
from HF checkpoints carry no checksums and are not verified.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file
from torch import nn

from moe_resilient.layer import ResilientMoE

FORMAT = "moe_resilient.shadow/1"
MANIFEST = "manifest.json"
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool, "U8": torch.uint8}


def _dtype_name(code: str) -> str:
    """A safetensors dtype code as torch names it without the prefix ("BF16" -> "bfloat16")."""
    return str(_DTYPES[code]).removeprefix("torch.")


class ShadowStoreError(RuntimeError):
    """A shadow store file is missing, truncated, corrupt, foreign, or does not fit the model."""


def resilient_layers(model: nn.Module) -> dict[str, ResilientMoE]:
    """Qualified name -> ResilientMoE for every such layer in ``model`` ("layer" for a bare layer).
    Names are those of the eager modules: torch.compile's ``_orig_mod`` wrappers are looked through."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, ResilientMoE):
        return {"layer": model}
    return {name.replace("_orig_mod.", ""): m for name, m in model.named_modules() if isinstance(m, ResilientMoE)}


def fingerprint(name: str, num_experts: int, w13_shape, w2_shape, dtype: torch.dtype | str) -> str:
    text = json.dumps([name, num_experts, list(w13_shape), list(w2_shape), str(dtype).replace("torch.", "")])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def layer_fingerprint(name: str, layer: ResilientMoE) -> str:
    return fingerprint(name, layer.config.num_experts, layer.experts.w13.shape[1:], layer.experts.w2.shape[1:],
                       layer.experts.w13.dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view."""
    return t.reshape(-1).view(torch.uint8)


def checksum(t: torch.Tensor) -> str:
    """The shadow store's checksum of a contiguous CPU tensor's bytes (csrc/cpu/checksum.cpp), as hex."""
    return f"{torch.ops.moe_resilient.checksum(_bytes(t.contiguous())) & (2**64 - 1):016x}"


def _copy_checksum(src: torch.Tensor, dst: torch.Tensor) -> str:
    """Copy ``src``'s bytes into contiguous ``dst`` and return their checksum, in one pass."""
    return f"{torch.ops.moe_resilient.copy_checksum(_bytes(src), _bytes(dst)) & (2**64 - 1):016x}"


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
    rows = [layer.experts.row(first[e]) for e in range(layer.config.num_experts)]  # held here: export before sharding
    return layer.experts.w13.detach()[rows], layer.experts.w2.detach()[rows]


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


def _save_experts(path: str, name: str, fp: str, step: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
    """One layer's logical experts with a checksum per expert row of each tensor."""
    sums = {role: [checksum(t[e]) for e in range(t.shape[0])] for role, t in (("w13", w13), ("w2", w2))}
    _atomic_save({"w13": w13, "w2": w2}, path,
                 {"layer": name, "fingerprint": fp, "step": str(step), "checksums": json.dumps(sums)})


class MappedSafetensors:
    """One safetensors file, memory-mapped copy-on-write (never written): its header parsed here, its
    tensors served as zero-copy views of the page cache. The map lives as long as this object, so a
    file replaced or removed on disk keeps serving the version that was opened."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise ValueError(f"{size} bytes")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            n = int.from_bytes(self._map[:8], "little")
            if 8 + n > size:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(bytes(self._map[8:8 + n]))
            self.metadata = header.pop("__metadata__", None) or {}
            self._file = torch.frombuffer(self._map, dtype=torch.uint8)
            self._data = 8 + n
            for key, info in header.items():
                begin, end = info["data_offsets"]
                if info["dtype"] not in _DTYPES or not 0 <= begin <= end <= size - self._data:
                    raise ValueError(f"tensor {key!r} lies outside the file or has an unknown dtype")
                if (end - begin) != math.prod(info["shape"]) * _DTYPES[info["dtype"]].itemsize:
                    raise ValueError(f"tensor {key!r} has {end - begin} bytes for shape {info['shape']}")
        except FileNotFoundError:
            raise ShadowStoreError(f"{path}: missing") from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise ShadowStoreError(f"{path}: truncated or corrupt safetensors file ({exc})") from None
        self._tensors = header

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> list[int]:
        return list(self._tensors[key]["shape"])

    def dtype_name(self, key: str) -> str:
        return self._tensors[key]["dtype"]

    def view(self, key: str, index: int | None = None) -> torch.Tensor:
        """Tensor ``key`` (or its row ``index``) as a zero-copy view of the mapped file."""
        info = self._tensors[key]
        begin, end = info["data_offsets"]
        shape = list(info["shape"])
        if index is not None:
            row = (end - begin) // shape[0]
            begin, end, shape = begin + index * row, begin + (index + 1) * row, shape[1:]
        raw = self._file[self._data + begin:self._data + end]
        dtype = _DTYPES[info["dtype"]]
        if (self._data + begin) % dtype.itemsize:  # safetensors aligns its tensors; copy if one is not
            raw = raw.clone()
        return raw.view(dtype).reshape(shape)


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
    checksums: dict = field(default_factory=dict)  # role -> [E] hex, from the file (stores we export)


class ShadowStore:
    """Memory-mapped logical expert weights for every ResilientMoE layer of a model."""

    def __init__(self, directory: str, entries: dict[str, _LayerEntry]):
        self.directory = directory
        self._entries = entries
        self._handles: dict[str, MappedSafetensors] = {}
        self._lock = threading.RLock()  # a handle and its checksums change together
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
        _save_experts(os.path.join(directory, file), name, fp, step, w13, w2)
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
    def from_hf_checkpoint(cls, checkpoint_dir: str, *, prefix_map=None, model: nn.Module | None = None
                           ) -> ShadowStore:
        """Index the MoE experts of a Hugging Face safetensors checkpoint in place (no copy).

        Layer names are the checkpoint's module paths (e.g. ``model.layers.0.mlp``), which are the
        names ``swap_moe_blocks`` gives the swapped layers; ``prefix_map`` renames them if needed.
        ``model`` (swapped): a checkpoint block whose name differs from the model's layer in the same
        parent module takes the model's name, as when transformers loads Mixtral's
        ``block_sparse_moe`` as ``mlp``."""
        files = sorted(f for f in os.listdir(checkpoint_dir) if f.endswith(".safetensors"))
        if not files:
            raise ShadowStoreError(f"{checkpoint_dir}: no .safetensors files")
        where: dict[str, tuple[str, list]] = {}
        for f in files:
            path = os.path.join(checkpoint_dir, f)
            h = MappedSafetensors(path)
            for key in h.keys():
                where[key] = (path, h.shape(key), h.dtype_name(key))
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
        prefix_map = dict(prefix_map or {})
        if model is not None:
            by_parent = {name.rpartition(".")[0]: name for name in resilient_layers(model)}
            for name in entries:
                mapped = prefix_map.get(name, name)
                prefix_map.setdefault(name, by_parent.get(mapped.rpartition(".")[0], mapped))
        out = {}
        for name, (E, s13, s2, dt, fmap, keys, layout) in entries.items():
            name = prefix_map.get(name, name)
            dtype = _dtype_name(dt)
            out[name] = _LayerEntry(name, E, s13, s2, dtype, fingerprint(name, E, s13, s2, dtype), 0, fmap, keys,
                                    layout)
        store = cls(checkpoint_dir, out)
        store._check_files()
        return store

    def _handle(self, path: str) -> MappedSafetensors:
        with self._lock:
            h = self._handles.get(path)
            if h is None:
                h = self._handles[path] = MappedSafetensors(path)
            return h

    def _check_files(self) -> None:
        """Open every file and check each tensor's presence, shape and dtype against the manifest, and
        read the checksums stored beside the data."""
        for entry in self._entries.values():
            for role, path in entry.files.items():
                h = self._handle(path)
                key = entry.keys[role].format(e=0)
                if key not in h.keys():
                    raise ShadowStoreError(f"{path}: tensor {key!r} missing (layer {entry.name})")
                shape = h.shape(key)
                if entry.layout == "stacked":
                    want = [entry.num_experts, *(entry.w13_shape if role == "w13" else entry.w2_shape)]
                    if list(shape) != want:
                        raise ShadowStoreError(f"{path}: tensor {key!r} has shape {list(shape)}, expected {want}")
                dtype = h.dtype_name(key)
                if _dtype_name(dtype) != entry.dtype:
                    raise ShadowStoreError(f"{path}: tensor {key!r} has dtype {dtype}, expected {entry.dtype}")
                if "checksums" in h.metadata:
                    entry.checksums[role] = self._read_checksums(h, role, entry.num_experts)

    @staticmethod
    def _read_checksums(h: MappedSafetensors, role: str, num_experts: int) -> list[str]:
        try:
            sums = json.loads(h.metadata["checksums"])[role]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ShadowStoreError(f"{h.path}: corrupt checksums for tensor {role!r}") from None
        if not isinstance(sums, list) or len(sums) != num_experts:
            raise ShadowStoreError(f"{h.path}: tensor {role!r} has checksums for {len(sums)} experts, not {num_experts}")
        return sums

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

    def _sources(self, layer_name: str, expert: int) -> list[tuple[str, torch.Tensor, str | None, str]]:
        """One expert's bytes in the map: (role, view, stored checksum or None, file) for w13's rows (gate
        then up, or the fused row) and w2."""
        entry = self._entry(layer_name)
        if not 0 <= expert < entry.num_experts:
            raise ShadowStoreError(f"layer {layer_name!r} has experts [0, {entry.num_experts}), not {expert}")
        try:
            if entry.layout == "stacked":
                with self._lock:
                    return [(r, self._handle(entry.files[r]).view(entry.keys[r], expert),
                             entry.checksums[r][expert] if r in entry.checksums else None, entry.files[r])
                            for r in ("w13", "w2")]
            return [(r, self._handle(entry.files[r]).view(entry.keys[r].format(e=expert)), None, entry.files[r])
                    for r in ("gate", "up", "down")]
        except ShadowStoreError:
            raise
        except Exception as exc:
            raise ShadowStoreError(f"{entry.files['w13']}: reading expert {expert} of {layer_name!r} failed ({exc})") from None

    def _copy_verified(self, layer_name: str, expert: int, sources, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Copy one expert's ``sources`` (from ``_sources``) into ``w13`` [2I, H] and ``w2`` [H, I]
        (contiguous), checking each row's checksum in the same pass."""
        gate_rows = sources[0][1].shape[0]
        dsts = [w13, w2] if len(sources) == 2 else [w13[:gate_rows], w13[gate_rows:], w2]
        for (role, view, stored, file), dst in zip(sources, dsts):
            if view.shape != dst.shape:
                raise ShadowStoreError(f"{file}: expert {expert} of {layer_name!r} has the wrong shape")
            read = _copy_checksum(view, dst)
            if stored is not None and stored != read:
                raise ShadowStoreError(f"{file}: tensor {role!r}, expert {expert} of layer {layer_name!r} fails its "
                                       f"checksum (stored {stored}, read {read}): the file is corrupt")

    def read_expert(self, layer_name: str, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2I, H], w2 [H, I]) of one logical expert: copies out of the memory map, checksums verified."""
        entry = self._entry(layer_name)
        sources = self._sources(layer_name, expert)
        dtype = getattr(torch, entry.dtype)
        w13, w2 = torch.empty(entry.w13_shape, dtype=dtype), torch.empty(entry.w2_shape, dtype=dtype)
        self._copy_verified(layer_name, expert, sources, w13, w2)
        return w13, w2

    def restore(self, layer: ResilientMoE, layer_name: str, expert: int, slot: int) -> int:
        """Copy ``expert`` from the memory map straight into ``slot`` of ``layer``, verifying each row's
        checksum in the same pass, then route to it. Everything that can be checked without reading
        the bytes is checked first and leaves the layer untouched; a row failing its checksum raises
        with ``slot`` left out of routing. Returns bytes copied."""
        entry = self._entry(layer_name)
        sources = self._sources(layer_name, expert)
        want = tuple(layer.experts.w13.shape[1:]), tuple(layer.experts.w2.shape[1:])
        if (tuple(entry.w13_shape), tuple(entry.w2_shape)) != want:
            raise ShadowStoreError(f"{entry.files['w13']}: expert {expert} of {layer_name!r} has shapes "
                                   f"{list(entry.w13_shape)}, {list(entry.w2_shape)}; slots take {list(want[0])}, {list(want[1])}")
        for role, view, _, file in sources:
            if view.dtype != layer.experts.w13.dtype:
                raise ShadowStoreError(f"{file}: dtype {view.dtype} does not match layer {layer_name!r} "
                                       f"({layer.experts.w13.dtype})")
        layer.write_expert(expert, slot, lambda w13, w2: self._copy_verified(layer_name, expert, sources, w13, w2))
        return sum(view.numel() for _, view, _, _ in sources) * layer.experts.w13.element_size()

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
            if torch.equal(h.view("w13"), w13) and torch.equal(h.view("w2"), w2):
                entry.step = step  # verified current at this step
                continue
            path = entry.files["w13"]
            _save_experts(path, name, entry.fingerprint, step, w13, w2)
            fresh = MappedSafetensors(path)  # readers holding the old map keep the old inode
            sums = {r: self._read_checksums(fresh, r, entry.num_experts) for r in ("w13", "w2")}
            with self._lock:
                self._handles[path], entry.checksums = fresh, sums
            entry.step = step
            changed.append(name)
        manifest = {"format": FORMAT, "layers": {
            n: {"file": os.path.basename(e.files["w13"]), "fingerprint": e.fingerprint, "num_experts": e.num_experts,
                "w13_shape": list(e.w13_shape), "w2_shape": list(e.w2_shape), "dtype": e.dtype, "step": e.step}
            for n, e in self._entries.items()}}
        _atomic_write_json(manifest, os.path.join(self.directory, MANIFEST))
        return changed
