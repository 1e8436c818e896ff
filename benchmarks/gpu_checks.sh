#!/usr/bin/env bash
# Every check that needs the lent GPU machine, in one run: the GPU tests (CUDA ops, CUDA graphs, the
# CUDA IPC transport with processes sharing the GPU), the GPU forward benchmark, and the shared-memory
# transport's benchmarks and kill drill on that machine's 16 cores (4 ranks without sharing cores).
# Logs and JSON land in $OUT (default ./gpu-results); it uses the machine's own python3 and torch.
# Each part has its own deadline, all together under 10 minutes.
#
#   bash benchmarks/gpu_checks.sh            # device tool: run(command="bash benchmarks/gpu_checks.sh")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step() { echo "== $1 ($(date +%T))"; }

step environment
{ nvidia-smi; nproc; python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"; } \
  > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step "build moe_resilient._C against this torch"
MAX_JOBS=16 timeout 120 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }

step "GPU tests"
timeout 160 python3 -m pytest tests/test_cuda.py tests/test_cuda_kernels.py tests/test_cuda_ipc.py -q -rs \
  -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25

step "GPU forward benchmark"
timeout 70 python3 -m pytest benchmarks/test_forward_cuda.py -q -s -p no:cacheprovider \
  --benchmark-json="$OUT/forward_cuda.json" 2>&1 | tail -12

step "shared-memory all-to-all against gloo, 4 ranks on 16 cores"
timeout 140 python3 -m pytest benchmarks/test_shm_alltoall.py benchmarks/test_ep_step.py -q -s -p no:cacheprovider \
  --benchmark-json="$OUT/transport_16_cores.json" 2>&1 | grep -E "tokens x|step|passed|failed|Error" | tail -12

step "kill drill, 4 ranks on 16 cores"
timeout 90 python3 -m moe_resilient.cli drill --json "$OUT/drill_kill_16_cores.json" 2>&1 | tail -3
step done
