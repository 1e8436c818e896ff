"""One process of the KV-restore test (tests/test_kv_checkpoint.py): a request of the seeded HF Mixtral
generated greedily, its KV cache checkpointed on a writer thread after every token.

    python kv_worker.py serve DIR KILL_AT   streams tokens to DIR/stream; SIGKILLs itself after KILL_AT
    python kv_worker.py resume DIR          restores the request, recomputes past the checkpoint, and
                                            streams the rest; prints the tokens recomputed
"""

import os
import signal
import sys
import time

from transformers import DynamicCache

from moe_resilient.kv_checkpoint import KVCheckpointer, KVLayout
from parallel_worker import hf_model
from test_kv_checkpoint import BLOCK, PROMPT, greedy

TOTAL = 24  # new tokens the request asks for

if __name__ == "__main__":
    mode, directory = sys.argv[1], sys.argv[2]
    model = hf_model("mixtral")
    ckpt = KVCheckpointer(os.path.join(directory, "kv"), model_id="mixtral-test",
                          layout=KVLayout.of(model, block_tokens=BLOCK), background=True)
    stream = open(os.path.join(directory, "stream"), "a")
    if mode == "serve":
        tokens, cache = list(PROMPT), DynamicCache(config=model.config)
    else:
        cache, _ = ckpt.restore("req", config=model.config)
        tokens = PROMPT + [int(t) for t in open(os.path.join(directory, "stream")).read().split()]
        print(f"recomputed {len(tokens) - cache.get_seq_length()}", flush=True)
    while len(tokens) < len(PROMPT) + TOTAL:
        tokens = greedy(model, tokens, cache, 1)
        stream.write(f"{tokens[-1]}\n")
        stream.flush()  # the client has it
        ckpt.save("req", cache, tokens)
        if mode == "serve" and len(tokens) - len(PROMPT) == int(sys.argv[3]):
            deadline = time.monotonic() + 30  # killed once a first block is on disk, the rest in flight
            while ckpt.covered("req") == 0 and time.monotonic() < deadline:
                time.sleep(0.001)
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.flush()
