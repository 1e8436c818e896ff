"""Expert parallelism for whole HF models across real processes: ``parallelize(model, group)`` after
``swap_moe_blocks``, then ``model(ids)`` and ``model.generate()`` unchanged on every rank, each rank
holding only its own experts; a rank SIGKILLed mid-serving is repaired from the shadow store."""

import json
import os
import signal
import sys

import pytest
import torch

pytest.importorskip("transformers")

from moe_resilient import MoEConfig, ResilientMoE, ShadowStore  # noqa: E402
from moe_resilient.experts import SlotNotHeldError  # noqa: E402
from moe_resilient.launch import Launcher  # noqa: E402
from parallel_worker import W, build  # noqa: E402

HERE = os.path.dirname(__file__)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_hf_model_expert_parallel_over_four_ranks_survives_a_kill(tmp_path, name):
    shadow = str(tmp_path / "shadow")
    ShadowStore.export(build(name), shadow)
    victim = 3
    cmd = [sys.executable, os.path.join(HERE, "parallel_worker.py"), str(tmp_path), name, shadow, str(victim)]
    with Launcher(W, cmd, log_dir=str(tmp_path / "logs")) as launcher:
        codes = launcher.wait(240)
    logs = {r: open(tmp_path / "logs" / f"rank{r}.log").read()[-3000:] for r in range(W)}
    assert codes == {r: (-signal.SIGKILL if r == victim else 0) for r in range(W)}, (codes, logs)
    for r in range(W):
        if r == victim:
            continue
        got = json.load(open(tmp_path / f"rank{r}.json"))
        assert got["sharded"] and got["held_bytes"] * W == got["full_bytes"], got  # a quarter of the experts
        assert got["logits_err"] < 1e-4 and got["tokens_equal"], got
        assert got["lost"] == [victim] and got["after_err"] < 1e-4, got


def test_sharded_layer_refuses_what_needs_other_ranks_slots():
    """Rank 1 of 2 holds slots 4..7 (experts 3, 0, 1, a spare). Edits write only the slots it holds;
    one that would copy from another rank's slot into its own is refused with nothing changed."""
    layer = ResilientMoE(MoEConfig(16, 32, 4, 2, num_slots=8, world_size=2), phy2log=[0, 1, 2, -1, 3, 0, 1, -1])
    layer.shard(1)
    assert layer.experts.held == range(4, 8) and layer.experts.w13.shape[0] == 4
    with pytest.raises(RuntimeError, match="run it through its group"):
        layer(torch.randn(3, 16))
    with pytest.raises(SlotNotHeldError, match="slot 2 is held by another rank"):
        layer.experts.write_slot(2, layer.experts.w13[0], layer.experts.w2[0])
    before = layer.placement.phy2log.clone()
    with pytest.raises(SlotNotHeldError):  # needs peer transfer: nothing changes
        layer.add_replica(2, 7, src_slot=2)
    assert torch.equal(layer.placement.phy2log, before)
    layer.add_replica(0, 7, src_slot=5)  # both held: a local copy
    assert torch.equal(layer.experts.w13[3], layer.experts.w13[1]) and int(layer.placement.phy2log[7]) == 0
    layer.add_replica(3, 3, src_slot=4)  # slot 3's owner (rank 0) writes it; here only the placement changes
    assert int(layer.placement.phy2log[3]) == 3
    held = (layer.experts.w13.numel() + layer.experts.w2.numel()) * layer.experts.w13.element_size()
    assert layer.memory_overhead()["held_bytes"] == held  # 4 of the 8 slots
