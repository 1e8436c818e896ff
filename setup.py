"""Builds moe_resilient._C from csrc/ with torch's cpp_extension.

CPU sources always; csrc/cuda/*.cu only where a CUDA toolkit and a CUDA build of torch both exist.
Install with `pip install --no-build-isolation -e .` so the extension links the torch you run.
"""
import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # -fopenmp: at::parallel_for is a header template that runs serially unless the extension itself is
    # built with OpenMP (it then shares the libgomp torch already loaded).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-std=c++20"] + openmp  # C++20: torch 2.13's headers use its bit-field initialisers
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    if use_cuda and os.environ.get("MOE_RESILIENT_NO_CUDA") != "1":
        return CUDAExtension(
            "moe_resilient._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DMOE_RESILIENT_CUDA"], "nvcc": ["-O3"]},
            extra_link_args=openmp,
        )
    return CppExtension("moe_resilient._C", sources, extra_compile_args=cxx_flags, extra_link_args=openmp)


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
