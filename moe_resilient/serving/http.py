"""``moe-resilient serve``: an OpenAI-compatible completions endpoint over a ServingCluster (Starlette,
run by uvicorn).

    POST /v1/completions  {"prompt": [ids] or "text", "max_tokens": 16, "temperature": 0, "seed": 0,
                           "stream": true}
    GET  /v1/models, GET /status (ranks and their pids, requests taken over, mismatches)

With ``stream`` the answer is server-sent events, one ``text_completion`` chunk per token, then
``data: [DONE]``. Each chunk carries ``token_ids`` beside ``text``; a checkpoint directory without a
tokenizer takes token-id prompts only, and its ``text`` is the ids, space-separated.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from moe_resilient.serving.cluster import ServingCluster, StreamTimeout


def _tokenizer(checkpoint: str):
    if not any(os.path.exists(os.path.join(checkpoint, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


def app(cluster: ServingCluster, model_name: str, *, token_timeout: float = 60.0) -> Starlette:
    tokenizer = _tokenizer(cluster.checkpoint)

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids) if tokenizer is not None else "".join(f" {t}" for t in ids)

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)

    async def completions(request: Request):
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return error("the body is not JSON")
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            if tokenizer is None:
                return error(f"model {model_name} has no tokenizer: send the prompt as a list of token ids")
            prompt = tokenizer(prompt)["input_ids"]
        if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
            return error("prompt must be a string or a list of token ids")
        try:
            stream = cluster.submit(prompt, int(body.get("max_tokens", 16)),
                                    temperature=float(body.get("temperature", 0.0)), seed=int(body.get("seed", 0)))
        except ValueError as exc:
            return error(str(exc))
        created = int(time.time())

        def chunk(ids: list[int], finish: str | None) -> dict:
            return {"id": f"cmpl-{stream.request_id}", "object": "text_completion", "created": created,
                    "model": model_name, "choices": [{"index": 0, "text": text(ids), "token_ids": ids,
                                                      "logprobs": None, "finish_reason": finish}]}

        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()
        stream.listeners.append(lambda: loop.call_soon_threadsafe(arrived.set))

        async def tokens():
            """Batches of new tokens, and whether the batch ends the stream."""
            sent = 0
            while True:
                arrived.clear()  # before reading: a token that lands after the read sets it again
                new, done = stream.tokens[sent:], stream.finished
                sent += len(new)
                last = done and sent == len(stream.tokens)
                if new:
                    yield new, last
                if last:
                    return
                if not new:
                    try:
                        await asyncio.wait_for(arrived.wait(), token_timeout)
                    except asyncio.TimeoutError:
                        raise StreamTimeout(f"request {stream.request_id}: no token for {token_timeout} s") from None

        if body.get("stream"):
            async def events():
                async for new, last in tokens():
                    yield f"data: {json.dumps(chunk(new, 'length' if last else None))}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        async for _ in tokens():
            pass
        body = chunk(stream.tokens, "length")
        body["usage"] = {"prompt_tokens": len(prompt), "completion_tokens": len(stream.tokens),
                         "total_tokens": len(prompt) + len(stream.tokens)}
        return JSONResponse(body)

    async def models(_: Request):
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model",
                                                          "owned_by": "moe_resilient"}]})

    async def status(_: Request):
        return JSONResponse({"ranks": cluster.pids, "adoptions": cluster.adoptions,
                             "mismatches": cluster.mismatches, "requests": len(cluster.specs)})

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/models", models), Route("/status", status)])


def serve(model: str, nproc: int, work_dir: str, host: str, port: int, echo=print, **cluster_kwargs) -> None:
    """Start the ranks (their output goes to WORK_DIR/logs), then answer HTTP on host:port until
    interrupted."""
    import uvicorn

    log_dir = os.path.join(work_dir, "logs")
    with ServingCluster(model, nproc, work_dir, log_dir=log_dir, **cluster_kwargs) as cluster:
        echo(f"moe_resilient serving {model} on {nproc} ranks at http://{host}:{port}/v1/completions")
        sys.stdout.flush()
        uvicorn.run(app(cluster, os.path.basename(os.path.normpath(model))), host=host, port=port, log_level="warning")
