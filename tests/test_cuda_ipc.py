"""The CUDA IPC transport (moe_resilient/cuda_ipc.py, csrc/cuda/ipc_exchange.cu): its sources compile
with nvcc wherever nvcc exists; on a GPU, three processes sharing it exchange rows eagerly and in a
replayed CUDA graph, go on without a rank cleared in the device mask, and clear a killed one at the
deadline."""

import ctypes
import glob
import json
import os
import shutil
import signal
import sys

import pytest
import torch

from moe_resilient import cuda_ipc

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(not (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")), reason="no nvcc")
def test_sources_compile_with_nvcc(tmp_path):
    lib = cuda_ipc.load(cuda_ipc.build(cache=str(tmp_path)))
    for name in ("mr_ipc_create", "mr_ipc_open", "mr_ipc_close", "mr_ipc_exchange"):
        assert isinstance(getattr(lib, name), ctypes._CFuncPtr)
    assert lib.mr_ipc_area_bytes(4, 1024) == 256 + 4 * 1024  # header padded to 256 bytes, then payloads
    assert cuda_ipc.build(cache=str(tmp_path)) == glob.glob(str(tmp_path / "*.so"))[0]  # built once


def test_a_failing_build_names_the_compiler_error(tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text("this is not CUDA\n")
    fake_nvcc = tmp_path / "nvcc"
    fake_nvcc.write_text("#!/bin/sh\necho 'bad.cu(1): error: expected a declaration' >&2\nexit 1\n")
    fake_nvcc.chmod(0o755)
    with pytest.raises(cuda_ipc.CudaIpcError, match="expected a declaration"):
        cuda_ipc.build(str(bad), cache=str(tmp_path / "cache"), nvcc=str(fake_nvcc))
    with pytest.raises(cuda_ipc.CudaIpcError, match="nvcc not found"):
        cuda_ipc.build(str(bad), cache=str(tmp_path / "cache"), nvcc=str(tmp_path / "missing"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_three_processes_on_one_gpu_exchange_replay_and_survive_a_kill(tmp_path):
    from moe_resilient.launch import Launcher

    cuda_ipc.build()  # once, before the ranks race to
    cmd = [sys.executable, os.path.join(HERE, "cuda_ipc_worker.py"), str(tmp_path)]
    with Launcher(3, cmd, env={"MOE_RESILIENT_TRANSPORT": "gloo"}, log_dir=str(tmp_path / "logs")) as launcher:
        codes = launcher.wait(300)
    logs = {r: open(tmp_path / "logs" / f"rank{r}.log").read()[-2000:] for r in range(3)}
    assert codes == {0: 0, 1: -signal.SIGKILL, 2: 0}, logs
    results = {r: json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1, 2) if os.path.exists(tmp_path / f"rank{r}.json")}
    for r in (0, 2):
        assert results[r]["eager"] == [True] * 3 and results[r]["graph"] == [True] * 2, results[r]
    assert results[0]["graph_without_2"] and results[0]["after_kill"] and results[0]["live"] == [1, 0, 0]
