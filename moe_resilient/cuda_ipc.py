"""All-to-all over CUDA IPC among the processes of one host that share GPUs: the shared-memory
protocol (shm.py) with device receive areas; the kernels are csrc/cuda/ipc_exchange.cu.

The sources are plain CUDA with a C interface, compiled by nvcc on first use (``build``) into a
cache folder and loaded with ctypes, so they need no CUDA build of torch to compile. Each exchange has
a fixed capacity per pair (bytes), so its shapes never depend on the counts and it can be captured in
a CUDA graph; the exchange number and the live-rank mask live in device memory, so a replayed graph
numbers its own exchanges and sees the current mask. A source that misses the deadline is cleared in
the mask and counts no rows.

This transport has not yet run on a GPU: it compiles here (``tests/test_cuda_ipc.py``), and its GPU
tests skip without a device.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import os
import shutil
import subprocess

import torch

SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda", "ipc_exchange.cu")
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "moe_resilient")


class CudaIpcError(RuntimeError):
    """nvcc missing or failing, or a CUDA call of the transport failing (names the call and code)."""


def build(source: str = SOURCE, cache: str = CACHE, nvcc: str | None = None) -> str:
    """Compile ``source`` into a shared library under ``cache`` (once per source text); its path."""
    nvcc = nvcc or shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(nvcc):
        raise CudaIpcError("nvcc not found (PATH or CUDA_HOME): the CUDA IPC transport cannot be built")
    text = open(source, "rb").read()
    path = os.path.join(cache, f"ipc_exchange_{hashlib.sha256(text).hexdigest()[:16]}.so")
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        done = subprocess.run([nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-shared", "-o", tmp, source],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise CudaIpcError(f"nvcc failed on {source}:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)
    return path


def load(path: str | None = None) -> ctypes.CDLL:
    lib = ctypes.CDLL(path or build())
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.mr_ipc_area_bytes.argtypes, lib.mr_ipc_area_bytes.restype = [i64, i64], i64
    lib.mr_ipc_create.argtypes = [i64, i64, ctypes.POINTER(ptr), ctypes.c_char_p]
    lib.mr_ipc_open.argtypes = [ctypes.c_char_p, ctypes.POINTER(ptr)]
    lib.mr_ipc_close.argtypes = [ptr, ctypes.c_int]
    lib.mr_ipc_exchange.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, i64, ptr]
    return lib


def _check(code: int, what: str) -> None:
    if code != 0:
        raise CudaIpcError(f"{what} failed with cudaError {code}")


class CudaIpcExchange:
    """This rank's receive area, and its peers' opened over IPC, for the members of ``group`` (an
    ElasticGroup: the handles travel through its store). ``capacity``: bytes per pair, a multiple of
    16. ``timeout_cycles``: each spin's deadline in GPU clock cycles.

    ``exchange(send, send_bytes)``: send [W, capacity] uint8 (the rows for each destination rank) and
    send_bytes [W] int64, both on the device -> (recv [W, capacity] uint8, recv_bytes [W] int64). A
    dead or late source is cleared in ``live`` [W] uint8 (device) and its recv_bytes is 0."""

    def __init__(self, group, capacity: int, device: torch.device | int | None = None,
                 timeout_cycles: int = 2_000_000_000, lib: ctypes.CDLL | None = None):
        if capacity <= 0 or capacity % 16:
            raise ValueError(f"capacity {capacity} must be a positive multiple of 16 bytes")
        self.lib = lib or load()
        self.rank, self.world = group.rank, group.world_size
        self.capacity, self.timeout_cycles = capacity, timeout_cycles
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else torch.device(device).index)
        with torch.cuda.device(self.device):
            base, handle = ctypes.c_void_p(), ctypes.create_string_buffer(64)
            _check(self.lib.mr_ipc_create(self.world, capacity, ctypes.byref(base), handle), "cudaMalloc/IpcGetMemHandle")
            self._own = base
            handles = group.gather("cuda_ipc", base64.b64encode(handle.raw).decode())
            missing = sorted(set(group.members) - set(handles))
            if missing:
                raise CudaIpcError(f"ranks {missing} did not publish their IPC handles")
            self._opened, pointers = [], [0] * self.world
            for r, text in handles.items():
                if r == self.rank:
                    pointers[r] = base.value
                    continue
                peer = ctypes.c_void_p()
                _check(self.lib.mr_ipc_open(base64.b64decode(text), ctypes.byref(peer)), f"IpcOpenMemHandle of rank {r}")
                self._opened.append(peer)
                pointers[r] = peer.value
            self.areas = torch.tensor(pointers, dtype=torch.int64, device=self.device)
            self.epoch = torch.zeros(1, dtype=torch.int64, device=self.device)
            self.live = torch.zeros(self.world, dtype=torch.uint8, device=self.device)
            self.live[list(group.members)] = 1

    def exchange(self, send: torch.Tensor, send_bytes: torch.Tensor,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.world, self.capacity)
        if send.shape != shape or send.dtype != torch.uint8 or not send.is_contiguous() or send.device != self.device:
            raise ValueError(f"send must be contiguous uint8 {list(shape)} on {self.device}, got {send.dtype} "
                             f"{list(send.shape)} on {send.device}")
        if send_bytes.shape != (self.world,) or send_bytes.dtype != torch.int64 or send_bytes.device != self.device:
            raise ValueError(f"send_bytes must be int64 [{self.world}] on {self.device}")
        recv, recv_bytes = out if out is not None else (torch.empty_like(send), torch.empty_like(send_bytes))
        stream = torch.cuda.current_stream(self.device).cuda_stream
        _check(self.lib.mr_ipc_exchange(send.data_ptr(), send_bytes.data_ptr(), recv.data_ptr(), recv_bytes.data_ptr(),
                                        self.areas.data_ptr(), self.rank, self.world, self.capacity,
                                        self.epoch.data_ptr(), self.live.data_ptr(), self.timeout_cycles, stream),
               "exchange launch")
        return recv, recv_bytes

    def close(self) -> None:
        for peer in self._opened:
            self.lib.mr_ipc_close(peer, 0)
        self.lib.mr_ipc_close(self._own, 1)
        self._opened = []
