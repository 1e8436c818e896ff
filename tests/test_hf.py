"""Swap-in for Hugging Face MoE blocks (built from tiny random configs, no downloads) and the
torchtitan / gpt-fast stacked layouts."""

import copy

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from moe_resilient import MoEConfig, ResilientMoE  # noqa: E402
from moe_resilient.hf import UnsupportedMoEBlockError, from_hf_block, load_stacked_state_dict, swap_moe_blocks  # noqa: E402
from reference import reference_moe  # noqa: E402

COMMON = dict(
    vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def _tiny(name):
    t = transformers
    if name == "mixtral":
        return t.MixtralForCausalLM(t.MixtralConfig(**COMMON, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2))
    if name == "qwen2_moe":
        return t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(
            **COMMON, intermediate_size=96, moe_intermediate_size=48, shared_expert_intermediate_size=80,
            num_experts=8, num_experts_per_tok=2))
    if name == "qwen3_moe":
        return t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(
            **COMMON, intermediate_size=96, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
            norm_topk_prob=True, head_dim=16))
    if name == "olmoe":
        return t.OlmoeForCausalLM(t.OlmoeConfig(**COMMON, intermediate_size=48, num_experts=8, num_experts_per_tok=2))
    if name == "deepseek_v3":
        model = t.DeepseekV3ForCausalLM(t.DeepseekV3Config(
            **COMMON, intermediate_size=96, moe_intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2,
            n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.0))
        for module in model.modules():  # a non-zero selection bias, so it is really exercised
            if getattr(module, "e_score_correction_bias", None) is not None:
                module.e_score_correction_bias.normal_(std=0.1)
        return model
    raise KeyError(name)


MODELS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


@pytest.mark.parametrize("name", MODELS)
def test_swap_gives_equal_logits_and_generation(name):
    model = _tiny(name).eval()
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref_tokens = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
        blocks = [m for m in model.modules() if type(m).__name__.endswith(("SparseMoeBlock", "MoE"))]
        x = torch.randn(3, 5, 64)
        block_ref = [b(x) for b in blocks]
        swapped = swap_moe_blocks(model, num_slots=11)  # 3 spare slots per layer
        assert swapped and all(isinstance(model.get_submodule(n), ResilientMoE) for n in swapped)
        for name_, want in zip(swapped, block_ref):
            layer = model.get_submodule(name_)
            assert want.abs().max() > 1e-3  # the block really contributes
            torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
            for e, s in zip((0, 3, 5), (8, 9, 10)):  # replicas change nothing
                layer.add_replica(e, s)
        torch.testing.assert_close(model(ids).logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(ids[:1], max_new_tokens=8, do_sample=False), ref_tokens)


def test_router_logits_still_recorded():
    model = _tiny("qwen2_moe").eval()
    ids = torch.randint(3, 96, (1, 9))
    with torch.no_grad():
        want = model(ids, output_router_logits=True)
        swap_moe_blocks(model)
        got = model(ids, output_router_logits=True)
    assert len(got.router_logits) == len(want.router_logits) == 2
    for g, w in zip(got.router_logits, want.router_logits):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.aux_loss, want.aux_loss)


def test_training_tracks_original_model():
    original = _tiny("mixtral").train()
    swapped = copy.deepcopy(original)
    swap_moe_blocks(swapped, num_slots=12)
    layers = [m for m in swapped.modules() if isinstance(m, ResilientMoE)]
    for layer in layers:
        for e, s in zip(range(4), range(8, 12)):
            layer.add_replica(e, s)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (original, swapped)]
    ids = torch.randint(3, 96, (4, 16))
    losses = {"original": [], "swapped": []}
    for _ in range(5):
        for key, model, opt in zip(losses, (original, swapped), opts):
            opt.zero_grad()
            loss = model(ids, labels=ids).loss
            loss.backward()
            if key == "swapped":
                for layer in layers:
                    layer.reduce_replica_grads()
            opt.step()
            losses[key].append(loss.item())
    assert losses["original"][-1] < losses["original"][0]  # it really trains
    torch.testing.assert_close(losses["swapped"], losses["original"], rtol=1e-4, atol=1e-4)
    for layer in layers:
        p2l = layer.placement.phy2log.tolist()
        for s in range(8, 12):
            assert torch.equal(layer.experts.w13[s], layer.experts.w13[p2l[s]])


class _V4Expert(nn.Module):  # transformers v4 Mixtral expert: w1 (gate), w3 (up), w2 (down)
    def __init__(self, h, i):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False), nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class MixtralSparseMoeBlock(nn.Module):  # the v4 layout, under the v4 class name
    def __init__(self, h=32, i=40, e=6, k=2):
        super().__init__()
        self.top_k = k
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = nn.ModuleList(_V4Expert(h, i) for _ in range(e))

    def forward(self, x):
        probs = torch.softmax(self.gate(x), -1)
        w, idx = probs.topk(self.top_k, -1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for k in range(self.top_k):
                out[t] += w[t, k] * self.experts[int(idx[t, k])](x[t])
        return out


def test_v4_per_expert_layout():
    block = MixtralSparseMoeBlock()
    layer = from_hf_block(block)
    x = torch.randn(10, 32)
    torch.testing.assert_close(layer(x), block(x), rtol=1e-5, atol=1e-5)


class FancyMoeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 2)
        self.experts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])


def test_unsupported_block_is_named_and_nothing_swapped():
    model = nn.Sequential(MixtralSparseMoeBlock(), FancyMoeBlock())
    with pytest.raises(UnsupportedMoEBlockError, match="FancyMoeBlock"):
        swap_moe_blocks(model)
    assert type(model[0]) is MixtralSparseMoeBlock


@pytest.mark.parametrize("layout", ["torchtitan", "torchtitan-legacy", "gpt-fast"])
def test_stacked_layouts(layout):
    H, I, E = 32, 40, 6
    w1, w3, w2 = torch.randn(E, I, H) / 6, torch.randn(E, I, H) / 6, torch.randn(E, H, I) / 6
    gate = torch.randn(E, H)
    if layout == "gpt-fast":
        sd, prefix = {"cond_ffn.w1": w1, "cond_ffn.w2": w2, "cond_ffn.w3": w3, "gate.weight": gate}, ""
    else:
        t = (lambda w: w.transpose(1, 2).contiguous()) if layout == "torchtitan-legacy" else (lambda w: w)
        prefix = "layers.3.moe."
        sd = {prefix + "experts.w1": t(w1), prefix + "experts.w2": t(w2), prefix + "experts.w3": t(w3),
              prefix + "router.gate.weight": gate}
    layer = ResilientMoE(MoEConfig(H, I, E, 2, num_slots=8))
    layer.add_replica(2, 6)
    load_stacked_state_dict(layer, sd, prefix, layout="gpt-fast" if layout == "gpt-fast" else "torchtitan")
    assert torch.equal(layer.experts.w13[6], layer.experts.w13[2])  # replicas loaded too
    x = torch.randn(9, H)
    torch.testing.assert_close(layer(x), reference_moe(layer, x, torch.cat([w1, w3], 1), w2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        load_stacked_state_dict(ResilientMoE(MoEConfig(H, I + 1, E, 2)), sd, prefix,
                                layout="gpt-fast" if layout == "gpt-fast" else "torchtitan")
    with pytest.raises(KeyError, match="lacks"):
        load_stacked_state_dict(layer, {}, prefix)
