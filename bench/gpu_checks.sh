#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one call (what bench/RESULTS.md's GPU section records):
#   bash bench/gpu_checks.sh [OUT_DIR]
# 1. the sync-free forward and its CUDA-graph replay (tests/kernels/test_cuda_graph.py), with the kernel
#    tests' sm_90 compile checks, incremental users against the kernel path (tests/serving/test_incremental.py), and
#    warmed-up score / rank / rank_many with no synchronization but the read of the result (tests/serving/test_pipeline.py);
# 2. every kernel against its reference and timed (bf16, fp32);
# 3. the whole model forward, Triton vs PyTorch references, eager and graph-replayed.
set -uo pipefail
out=${1:-bench/results}
mkdir -p "$out"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/kernels/test_cuda_graph.py tests/serving/test_placement.py tests/serving/test_incremental.py tests/serving/test_pipeline.py 2>&1 | tee "$out/gpu_tests.log" || status=1
python3 -m bench.kernels --device cuda --dtype bfloat16 --csv "$out/kernels.csv" 2>&1 | tee "$out/kernels_bf16.log" || status=1
python3 -m bench.kernels --device cuda --dtype float32 --csv "$out/kernels.csv" 2>&1 | tee "$out/kernels_fp32.log" || status=1
python3 -m bench.backends --device cuda --dtype bfloat16 2>&1 | tee "$out/backends_bf16.log" || status=1
python3 -m bench.backends --device cuda --dtype float32 --models minilm 2>&1 | tee "$out/backends_fp32.log" || status=1
exit $status
