"""Builds moe_resilient._C from csrc/ (C++ CPU ops) with torch's cpp_extension.

Install with `pip install --no-build-isolation -e .` so the extension links the torch you run.
"""
import glob
import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "process", "*.cpp")))
    # -fopenmp: at::parallel_for is a header template that runs serially unless the extension itself is
    # built with OpenMP (it then shares the libgomp torch already loaded).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-std=c++20"] + openmp  # C++20: torch 2.13's headers use its bit-field initialisers
    return CppExtension("moe_resilient._C", sources, extra_compile_args=cxx_flags, extra_link_args=openmp)

setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
