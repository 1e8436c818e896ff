"""Tutorial 5: serve a tiny Qwen3-MoE on 4 ranks behind an OpenAI-style endpoint, kill the rank that
runs your request mid-stream, and watch the stream go on.

    python tutorials/05_serve_kill_watch_the_stream.py

It starts ``moe-resilient serve`` as you would in a shell, streams one completion over HTTP, SIGKILLs
the request's rank after 10 tokens, and checks the whole answer against one process's.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from moe_resilient.serving import models
from moe_resilient.serving.engine import Engine, Request

PORT, PROMPT, NEW = 8431, [17, 42, 99, 7, 250, 3, 61, 8], 40


def call(path: str, body: dict | None = None, tries: int = 1):
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(tries):
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", data=data, timeout=60)
        except urllib.error.URLError:  # the server is still binding its port
            if attempt == tries - 1:
                raise
            time.sleep(0.1)


def main() -> None:
    work = tempfile.mkdtemp(prefix="tutorial5-")
    # 1. the server: 4 ranks (attention data-parallel, experts spread over them), KV checkpoints every 8 tokens
    server = subprocess.Popen(["moe-resilient", "serve", "--nproc", "4", "--port", str(PORT), "--work-dir", work,
                               "--block-tokens", "8"], stdout=subprocess.PIPE, text=True)
    try:
        for line in server.stdout:
            if "serving" in line:
                print(line.strip())
                break
        ranks = json.load(call("/status", tries=100))["ranks"]
        # 2. a streamed completion: request 0 runs on rank 0
        stream = call("/v1/completions", {"prompt": PROMPT, "max_tokens": NEW, "stream": True})
        tokens, t_kill, gaps, last = [], None, [], time.time()
        for raw in stream:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            now = time.time()
            gaps.append(now - last)
            last = now
            tokens += json.loads(line[6:])["choices"][0]["token_ids"]
            print(tokens[-1], end=" ", flush=True)
            if len(tokens) == 10:  # 3. kill the rank that runs it
                os.kill(ranks["0"], signal.SIGKILL)
                t_kill = now
                print("<- rank 0 SIGKILLed", end=" ", flush=True)
        print()
        status = json.load(call("/status"))
        taken = status["adoptions"][0]
        print(f"rank {taken['by']} took request {taken['request_id']} over from its checkpoint of "
              f"{taken['covered']} tokens, recomputing {taken['recomputed']}; longest gap between tokens "
              f"{max(gaps[1:]) * 1e3:.0f} ms")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)
    # 4. what one process answers
    want = Engine(models.load(models.materialize(models.TINY, work)), num_blocks=64).generate(
        [Request("r0", PROMPT, NEW)])["r0"]
    assert t_kill is not None and tokens == want, (tokens, want)
    print("every token: same answers as one process")


if __name__ == "__main__":
    main()
    sys.exit(0)
