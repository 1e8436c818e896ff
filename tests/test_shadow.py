"""ShadowStore against real safetensors files, each error made on purpose; routing-state checkpoints."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from moe_resilient import (
    MoEConfig, ResilientMoE, ShadowStore, ShadowStoreError, load_routing_state, save_routing_state,
)

H, I, E = 32, 48, 8


def _layer(seed=0, slots=12, dtype=torch.float32):
    torch.manual_seed(seed)
    return ResilientMoE(MoEConfig(H, I, E, 2, num_slots=slots, world_size=4), dtype=dtype)


def test_export_open_restore_roundtrip(tmp_path):
    layer = _layer()
    store = ShadowStore.export(layer, str(tmp_path), step=7)
    manifest = json.load(open(tmp_path / "manifest.json"))
    assert manifest["layers"]["layer"]["num_experts"] == E and store.step("layer") == 7
    reopened = ShadowStore.open(str(tmp_path))
    reopened.validate(layer)
    w13, w2 = reopened.read_expert("layer", 5)
    assert torch.equal(w13, layer.experts.w13[5]) and torch.equal(w2, layer.experts.w2[5])
    x = torch.randn(20, H)
    want = layer(x).detach()
    layer.placement.clear(5, allow_uncovered=True)
    layer.experts.w13.data[8] = 0  # the spare slot gets overwritten by the restore
    assert reopened.restore(layer, "layer", 5, 8) == (2 * I * H + H * I) * 4
    assert layer.placement.slots_of(5) == [8]
    torch.testing.assert_close(layer(x), want)


def _broken(tmp_path, how):
    layer = _layer()
    ShadowStore.export(layer, str(tmp_path))
    f = tmp_path / "layer_000.safetensors"
    if how == "missing_file":
        os.remove(f)
    elif how == "truncated":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    elif how == "corrupt_header":
        data = bytearray(f.read_bytes())
        data[8:40] = b"\xff" * 32
        f.write_bytes(bytes(data))
    elif how == "wrong_shape":
        save_file({"w13": torch.zeros(E, 2 * I, H + 1), "w2": torch.zeros(E, H, I)}, str(f))
    elif how == "wrong_dtype":
        save_file({"w13": torch.zeros(E, 2 * I, H, dtype=torch.float16), "w2": torch.zeros(E, H, I)}, str(f))
    elif how == "missing_tensor":
        save_file({"w13": torch.zeros(E, 2 * I, H)}, str(f))
    elif how == "no_manifest":
        os.remove(tmp_path / "manifest.json")
    elif how == "corrupt_manifest":
        (tmp_path / "manifest.json").write_text("{not json")
    return layer


@pytest.mark.parametrize(
    "how, match",
    [
        ("missing_file", "layer_000.safetensors: missing"),
        ("truncated", "layer_000.safetensors: truncated or corrupt"),
        ("corrupt_header", "layer_000.safetensors: truncated or corrupt"),
        ("wrong_shape", r"layer_000.safetensors: tensor 'w13' has shape"),
        ("wrong_dtype", r"layer_000.safetensors: tensor 'w13' has dtype F16"),
        ("missing_tensor", r"layer_000.safetensors: tensor 'w2' missing"),
        ("no_manifest", "manifest.json: missing"),
        ("corrupt_manifest", "manifest.json: corrupt"),
    ],
)
def test_broken_files_raise_naming_file_and_tensor(tmp_path, how, match):
    _broken(tmp_path, how)
    with pytest.raises(ShadowStoreError, match=match):
        ShadowStore.open(str(tmp_path))


def test_foreign_model_rejected(tmp_path):
    store = ShadowStore.export(_layer(), str(tmp_path))
    other = ResilientMoE(MoEConfig(H, I + 8, E, 2, num_slots=12, world_size=4))
    with pytest.raises(ShadowStoreError, match="does not match the model"):
        store.validate(other)
    with pytest.raises(ShadowStoreError, match="no layer 'model.layers.3.mlp'"):
        store.read_expert("model.layers.3.mlp", 0)


def test_failed_restore_changes_nothing_and_open_maps_survive(tmp_path):
    layer = _layer()
    store = ShadowStore.export(layer, str(tmp_path))
    before = {n: t.detach().clone() for n, t in [*layer.named_parameters(), *layer.named_buffers()]}
    with pytest.raises(ShadowStoreError, match=r"experts \[0, 8\), not 11"):
        store.restore(layer, "layer", 11, 8)
    for n, t in [*layer.named_parameters(), *layer.named_buffers()]:
        assert torch.equal(t, before[n]), n
    os.remove(tmp_path / "layer_000.safetensors")  # the open memory map keeps serving the old inode
    store.restore(layer, "layer", 3, 8)
    assert torch.equal(layer.experts.w13[8], before["experts.w13"][3])
    with pytest.raises(ShadowStoreError, match="missing"):
        ShadowStore.open(str(tmp_path))


def test_from_hf_checkpoint_without_building_the_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from moe_resilient.hf import swap_moe_blocks

    cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      num_experts=6, num_experts_per_tok=2)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    model.save_pretrained(str(tmp_path))
    store = ShadowStore.from_hf_checkpoint(str(tmp_path))
    swapped = swap_moe_blocks(model)
    assert store.layers == sorted(swapped)
    store.validate(model)
    for name in swapped:
        layer = model.get_submodule(name)
        w13, w2 = store.read_expert(name, 4)
        torch.testing.assert_close(w13, layer.experts.w13[4], rtol=0, atol=0)
        torch.testing.assert_close(w2, layer.experts.w2[4], rtol=0, atol=0)


def test_v4_per_expert_checkpoint(tmp_path):
    E4, I4 = 3, 16
    tensors = {}
    for e in range(E4):
        for k, shape in (("w1", (I4, H)), ("w3", (I4, H)), ("w2", (H, I4))):
            tensors[f"model.layers.0.block_sparse_moe.experts.{e}.{k}.weight"] = torch.randn(shape)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    store = ShadowStore.from_hf_checkpoint(str(tmp_path))
    w13, w2 = store.read_expert("model.layers.0.block_sparse_moe", 2)
    pre = "model.layers.0.block_sparse_moe.experts.2."
    assert torch.equal(w13, torch.cat([tensors[pre + "w1.weight"], tensors[pre + "w3.weight"]]))
    assert torch.equal(w2, tensors[pre + "w2.weight"])


def test_refresh_rewrites_changed_layers_atomically(tmp_path):
    layer = _layer()
    store = ShadowStore.export(layer, str(tmp_path), step=0)
    assert store.refresh(layer, 1, background=False) == []  # unchanged: nothing rewritten
    with torch.no_grad():
        layer.experts.w13.add_(1.0)
    old_w13, _ = store.read_expert("layer", 2)  # a reader of the old version
    future = store.refresh(layer, 5)
    assert future.result(timeout=60) == ["layer"]
    assert store.step("layer") == 5 and ShadowStore.open(str(tmp_path)).step("layer") == 5
    new_w13, _ = store.read_expert("layer", 2)
    assert torch.equal(new_w13, layer.experts.w13[2]) and not torch.equal(old_w13, new_w13)
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]


def test_routing_state_checkpoint_roundtrip(tmp_path):
    layer = _layer()
    layer.add_replica(2, 8)
    layer.add_replica(6, 9)
    layer.placement.mark_dead(3, allow_uncovered=True)
    layer(torch.randn(16, H))
    path = str(tmp_path / "routing.safetensors")
    save_routing_state(layer, path)
    want = {n: b.clone() for n, b in layer.named_buffers()}
    x = torch.randn(10, H)
    out = layer(x).detach()
    layer.expert_load.zero_()

    fresh = _layer()  # same weights, default placement
    store = ShadowStore.export(fresh, str(tmp_path / "shadow"))
    ptrs = {n: b.data_ptr() for n, b in fresh.named_buffers()}
    load_routing_state(fresh, path, shadow=store)
    for n, b in fresh.named_buffers():
        assert torch.equal(b, want[n]), n
        assert b.data_ptr() == ptrs[n]
    out_fresh = fresh(x)
    torch.testing.assert_close(out_fresh, out)
    with pytest.raises(ShadowStoreError, match="no matching routing state"):
        load_routing_state(ResilientMoE(MoEConfig(H, I + 8, E, 2, num_slots=12, world_size=4)), path)


# --------------------------------------------------------------------------- checksums
def _data_offset(path, key, expert):
    """Byte offset in the file of row ``expert`` of tensor ``key``."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    info = json.loads(raw[8:8 + n])[key]
    begin, end = info["data_offsets"]
    return 8 + n + begin + expert * (end - begin) // info["shape"][0]


def test_checksum_kernel_matches_its_definition():
    for n in (0, 1, 7, 8, 9, 4095, 1 << 20):  # tails, and more than one thread's share
        t = torch.randint(0, 256, (n,), dtype=torch.uint8)
        padded = torch.cat([t, torch.zeros(-n % 8, dtype=torch.uint8)]).view(torch.int64)
        want = int((padded * (2 * torch.arange(padded.numel()) + 1)).sum()) & (2**64 - 1)  # wraps mod 2^64
        assert int(torch.ops.moe_resilient.checksum(t)) & (2**64 - 1) == want, n
        dst = torch.empty_like(t)
        assert torch.ops.moe_resilient.copy_checksum(t, dst) == torch.ops.moe_resilient.checksum(t)
        assert torch.equal(dst, t)


@pytest.mark.parametrize("role, damage", [("w13", "bitflip"), ("w2", "nan")])
def test_corrupt_expert_is_refused_naming_the_tensor(tmp_path, role, damage):
    layer = _layer()
    store = ShadowStore.export(layer, str(tmp_path))
    f = str(tmp_path / "layer_000.safetensors")
    at = _data_offset(f, role, 5) + 4 * 17
    data = bytearray(open(f, "rb").read())
    if damage == "bitflip":
        data[at] ^= 0x10
    else:
        data[at:at + 4] = torch.tensor([float("nan")]).view(torch.uint8).numpy().tobytes()
    with open(f, "r+b") as fh:  # in place, as bit rot would: the page cache the map reads changes too
        fh.write(bytes(data))
    for s in (ShadowStore.open(str(tmp_path)), store):
        layer.placement.clear(5, allow_uncovered=True)
        with pytest.raises(ShadowStoreError, match=rf"tensor '{role}', expert 5 of layer 'layer' fails its checksum"):
            s.restore(layer, "layer", 5, 8)
        assert layer.placement.slots_of(5) == [] and int(layer.placement.phy2log[8]) == -1  # never routed
        with pytest.raises(ShadowStoreError, match="fails its checksum"):
            s.read_expert("layer", 5)
        s.restore(layer, "layer", 4, 8)  # the other experts' rows still restore
        layer.placement.clear(8, allow_uncovered=True)


def test_refresh_keeps_checksums_current(tmp_path):
    layer = _layer()
    store = ShadowStore.export(layer, str(tmp_path))
    with torch.no_grad():
        layer.experts.w2.mul_(2.0)
    store.refresh(layer, 3, background=False)
    layer.placement.clear(5, allow_uncovered=True)
    store.restore(layer, "layer", 5, 8)
    assert torch.equal(layer.experts.w2[8], layer.experts.w2[5])
    assert ShadowStore.open(str(tmp_path)).read_expert("layer", 5)[1].equal(layer.experts.w2[5])


# --------------------------------------------------------------------------- routing state: all or nothing
def _two_layers(seed=0):
    torch.manual_seed(seed)
    cfg = MoEConfig(H, I, E, 2, num_slots=12, world_size=4)
    return torch.nn.Sequential(ResilientMoE(cfg), ResilientMoE(cfg))


def _snapshot(model):
    return {n: (t.detach().clone(), t.data_ptr()) for n, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("checksummed", [True, False])
def test_bad_routing_state_changes_no_layer(tmp_path, checksummed):
    saved = _two_layers()
    for layer in saved:  # a placement that would rewrite slots and weights in both layers
        layer.move_expert(1, 9)
        layer.add_replica(3, 10)
    path = str(tmp_path / "routing.safetensors")
    save_routing_state(saved, path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["1/phy2log"][2] ^= 1 << 4  # one flipped bit in layer 1: expert 2 -> 18, which does not exist
    if not checksummed:  # a file without checksums (or one whose checksums were rewritten to match)
        meta.pop("__checksums__")
    save_file(tensors, path, metadata=meta)

    fresh = _two_layers()
    store = ShadowStore.export(fresh, str(tmp_path / "shadow"))
    before = _snapshot(fresh)
    with pytest.raises((ShadowStoreError, __import__("moe_resilient").PlacementError),
                       match="'1/phy2log' fails its checksum" if checksummed else "layer '1'.*unknown expert 18"):
        load_routing_state(fresh, path, shadow=store)
    for n, (t, ptr) in _snapshot(fresh).items():
        assert torch.equal(t, before[n][0]) and ptr == before[n][1], n
