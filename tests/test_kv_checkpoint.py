"""Per-request KV-cache checkpoints on a real HF model (the seeded Mixtral of the EP tests): a request
restored from its last checkpoint, in a fresh checkpointer, continues with exactly the tokens of an
uninterrupted greedy run, recomputing fewer tokens than a block; saves write only new blocks; a
corrupt, truncated, foreign or misplaced block is refused with an error that names it."""

import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache

from moe_resilient.kv_checkpoint import KVCheckpointer, KVCheckpointError, KVLayout
from parallel_worker import hf_model

BLOCK = 4
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def model():
    return hf_model("mixtral")


def greedy(model, tokens, cache, new):
    """``tokens`` extended by ``new`` greedy tokens, feeding ``cache`` every token it has not seen."""
    tokens = list(tokens)
    with torch.no_grad():
        for _ in range(new):
            seen = cache.get_seq_length()
            logits = model(torch.tensor([tokens[seen:]]), cache=cache, use_cache=True).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tokens


PROMPT = [5, 17, 42, 8, 63, 11, 29]


def _checkpointer(model, path, **kw):
    return KVCheckpointer(str(path), model_id=kw.pop("model_id", "mixtral-test"),
                          layout=kw.pop("layout", KVLayout.of(model, block_tokens=BLOCK)), **kw)


@pytest.mark.parametrize("background", [False, True])
def test_restored_request_continues_with_the_same_tokens(model, tmp_path, background):
    reference = greedy(model, PROMPT, DynamicCache(config=model.config), 20)
    ckpt = _checkpointer(model, tmp_path, background=background)
    cache = DynamicCache(config=model.config)
    streamed = greedy(model, PROMPT, cache, 9)  # what the client has seen when the rank dies
    covered = ckpt.save("req-1", cache, streamed)
    ckpt.flush()
    assert covered == cache.get_seq_length() // BLOCK * BLOCK == 12

    survivor = _checkpointer(model, tmp_path)  # another process: nothing but the files
    restored, tokens = survivor.restore("req-1", config=model.config)
    assert tokens == streamed[:covered] and restored.get_seq_length() == covered
    recomputed = len(streamed) - covered
    assert 0 < recomputed <= BLOCK
    assert greedy(model, streamed, restored, 20 - 9) == reference


def test_saves_write_only_new_blocks(model, tmp_path):
    ckpt = _checkpointer(model, tmp_path)
    cache = DynamicCache(config=model.config)
    tokens = greedy(model, PROMPT, cache, 2)  # 8 positions cached: 2 blocks
    assert ckpt.save("r", cache, tokens) == 8
    first = {name: os.stat(tmp_path / name).st_mtime_ns for name in os.listdir(tmp_path)}
    assert len(first) == 2
    assert ckpt.save("r", cache, tokens) == 8 and len(os.listdir(tmp_path)) == 2  # nothing new
    tokens = greedy(model, tokens, cache, 5)  # 13 positions: a third block
    assert ckpt.save("r", cache, tokens) == 12
    assert len(os.listdir(tmp_path)) == 3
    assert all(os.stat(tmp_path / name).st_mtime_ns == t for name, t in first.items())  # not rewritten
    assert _checkpointer(model, tmp_path).covered("r") == 12


@pytest.fixture
def saved(model, tmp_path):
    ckpt = _checkpointer(model, tmp_path)
    cache = DynamicCache(config=model.config)
    tokens = greedy(model, PROMPT, cache, 6)
    ckpt.save("req-a", cache, tokens)  # blocks at tokens 0, 4, 8
    return tmp_path


def _block(path, request, start):
    return path / f"{request}.{start:09d}-{start + BLOCK:09d}.safetensors"


def test_a_flipped_byte_is_refused_naming_the_block(model, saved):
    f = _block(saved, "req-a", 4)
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x10  # in the last tensor's bytes, as bit rot would
    f.write_bytes(bytes(data))
    with pytest.raises(KVCheckpointError, match=r"req-a'?, block at token 4 .*fails its checksum"):
        _checkpointer(model, saved).restore("req-a")


def test_a_truncated_block_is_refused(model, saved):
    f = _block(saved, "req-a", 8)
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(KVCheckpointError, match="block at token 8 .*unreadable"):
        _checkpointer(model, saved).restore("req-a")


def test_another_models_or_layouts_checkpoint_is_refused(model, saved):
    with pytest.raises(KVCheckpointError, match="model is 'mixtral-test', expected 'qwen-test'"):
        _checkpointer(model, saved, model_id="qwen-test").restore("req-a")
    wide = KVLayout.of(model, block_tokens=2 * BLOCK)
    with pytest.raises(KVCheckpointError, match="layout is"):
        _checkpointer(model, saved, layout=wide).restore("req-a")


def test_a_block_of_another_request_or_position_is_refused(model, saved):
    _block(saved, "req-b", 0).write_bytes(_block(saved, "req-a", 0).read_bytes())
    with pytest.raises(KVCheckpointError, match="request is 'req-a', expected 'req-b'"):
        _checkpointer(model, saved).restore("req-b")
    _block(saved, "req-a", 0).write_bytes(_block(saved, "req-a", 4).read_bytes())
    with pytest.raises(KVCheckpointError, match="start is '4', expected '0'"):
        _checkpointer(model, saved).restore("req-a")


def test_no_checkpoint_and_bad_inputs(model, tmp_path):
    ckpt = _checkpointer(model, tmp_path)
    with pytest.raises(KVCheckpointError, match="no checkpoint"):
        ckpt.restore("nobody")
    for bad in ("", "../escape", "a b", 7):
        with pytest.raises(ValueError, match="request id"):
            ckpt.save(bad, DynamicCache(config=model.config), [])
    cache = DynamicCache(config=model.config)
    greedy(model, PROMPT, cache, 1)
    with pytest.raises(ValueError, match="3 token ids for a cache of 7 positions"):
        ckpt.save("short", cache, PROMPT[:3])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_request_survives_its_process_being_killed_mid_stream(model, tmp_path, seed):
    """A process streams a request's tokens, checkpointing its cache on a writer thread after each one,
    and is SIGKILLed at a seeded random token; another process restores the request from the files,
    recomputes only what the checkpoint lacks, and streams the rest: the client's stream equals an
    uninterrupted greedy run, with no token lost or repeated."""
    from kv_worker import TOTAL

    kill_at = random.Random(seed).randint(3, TOTAL - 3)
    run = [sys.executable, os.path.join(HERE, "kv_worker.py")]
    env = {**os.environ, "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    served = subprocess.run([*run, "serve", str(tmp_path), str(kill_at)], env=env, capture_output=True, timeout=300)
    assert served.returncode == -signal.SIGKILL, served.stderr.decode()[-2000:]
    resumed = subprocess.run([*run, "resume", str(tmp_path)], env=env, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    recomputed = int(resumed.stdout.decode().split()[-1])
    stream = [int(t) for t in (tmp_path / "stream").read_text().split()]
    reference = greedy(model, PROMPT, DynamicCache(config=model.config), TOTAL)[len(PROMPT):]
    assert stream == reference
    assert 0 < recomputed < len(PROMPT) + kill_at  # restored from a checkpoint, not recomputed whole
