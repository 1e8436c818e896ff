"""Tutorial 4: a Hugging Face MoE model (a tiny Mixtral, seeded, no download) served with expert
parallelism over 4 processes. ``swap_moe_blocks`` then ``parallelize(model, group)``: each rank keeps a
quarter of the experts and ``model(ids)`` / ``model.generate()`` run unchanged. Rank 3 is SIGKILLed;
the others repair from the shadow store and serve on.

    python tutorials/04_parallelize_an_hf_model.py

Run directly, this file is the launcher; each rank it starts runs ``serve()``.
"""

import os
import signal
import sys
import tempfile

import torch
import transformers

from moe_resilient import ShadowStore, StepRunner, parallelize
from moe_resilient.group import ElasticGroup
from moe_resilient.hf import swap_moe_blocks
from moe_resilient.launch import Launcher

W, VICTIM = 4, 3


def build() -> torch.nn.Module:
    """The same model in every process: seeded weights, MoE blocks swapped, 3 slots per rank."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                        num_experts_per_tok=2)
    model = transformers.MixtralForCausalLM(config)
    swap_moe_blocks(model, num_slots=3 * W, world_size=W)
    return model.eval()


def serve(shadow_dir: str) -> None:
    rank = int(os.environ["RANK"])
    model = build()
    prompts = [torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(10 * step + rank))
               for step in range(3)]
    with torch.no_grad():  # what one process holding every expert answers
        want = [model.generate(p, max_new_tokens=5, min_new_tokens=5, do_sample=False) for p in prompts]
    group = ElasticGroup.from_env().start()
    parallelize(model, group)  # 1. each rank keeps its 3 of the 12 expert slots; forwards are now EP
    runner = StepRunner(model, group, shadow=ShadowStore.open(shadow_dir), shadow_current=True)
    held = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"rank {rank}: holds {held} expert weights", flush=True)
    with torch.no_grad():
        for step, prompt in enumerate(prompts):
            if step == 2 and rank == VICTIM:  # 2. every rank has served two prompts; rank 3 dies
                os.kill(os.getpid(), signal.SIGKILL)
            # 3. a generate that meets the dead rank is re-run once every survivor has repaired alike
            got = runner(model.generate, prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
            assert torch.equal(got, want[step]), (rank, step)
            print(f"rank {rank}, prompt {step}: {got[0, 6:].tolist()} (same as one process)", flush=True)
    for change in runner.changes:
        print(f"rank {rank}: lost {change.lost}; {change.report.summary()}", flush=True)
    group.finish()


def launch() -> None:
    shadow_dir = tempfile.mkdtemp(prefix="tutorial4-")
    ShadowStore.export(build(), shadow_dir)  # every expert in safetensors, for the slots rank 3 takes along
    logs = os.path.join(shadow_dir, "logs")
    with Launcher(W, [sys.executable, __file__, shadow_dir], log_dir=logs) as launcher:
        codes = launcher.wait(240)
    for rank in range(W):
        print(open(os.path.join(logs, f"rank{rank}.log")).read().strip() or f"rank {rank}: (no output)")
    assert codes == {r: -signal.SIGKILL if r == VICTIM else 0 for r in range(W)}, codes
    print("every prompt: same answers as one process")


if __name__ == "__main__":
    if "RANK" in os.environ:
        serve(sys.argv[1])
        sys.stdout.flush()
        os._exit(0)  # old gloo generations hold sockets to the dead rank: skip their destructors
    launch()
