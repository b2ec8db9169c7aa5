#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one call, each step under a time limit so the whole stays under
# 8 minutes (limits sum to 450 s; compiles included):
#   bash bench/gpu_checks.sh [OUT_DIR]        (RESULTS_MD=path to write another results file)
# 1. CUDA tests: the sync-free forward and its CUDA-graph replay, the kernel tests' sm_90 compile checks, placement,
#    incremental users against the kernel path, warmed-up score / rank / rank_many with no synchronization but the
#    read of the result (tests/serving/test_pipeline.py), int8 tables on the device and in pinned memory;
# 2. every kernel against its reference and timed (bf16, fp32), beside torch's stock attention (varlen_attn on the
#    packed batch, SDPA and SDPA-flash on the padded one, three head shapes), int8 and pinned-host gathers;
# 3. the attention kernel's tile configs swept (bf16);
# 4. the whole model forward, Triton vs the best PyTorch forward (SDPA attention, torch.compile), eager and graph-replayed.
# Then bench/gpu_report.py writes the "GPU checks on <device>" section of RESULTS.md from the logs (also copied to OUT_DIR).
set -uo pipefail
out=${1:-bench/results}
results_md=${RESULTS_MD:-bench/RESULTS.md}
mkdir -p "$out"
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
status=0
began=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: the command and its output in OUT/NAME.log, killed after SECONDS
    local name=$1 limit=$2
    shift 2
    echo "\$ $*" > "$out/$name.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ]; then echo "(stopped at the ${limit} s limit)" | tee -a "$out/$name.log"; fi
    if [ "$rc" -ne 0 ]; then status=1; fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
step gpu_tests 110 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_cuda_graph.py tests/serving/test_placement.py \
    tests/serving/test_incremental.py tests/serving/test_pipeline.py tests/serving/test_int8_scorer.py
step kernels_bf16 80 python3 -m bench.kernels --device cuda --dtype bfloat16 --csv "$out/kernels.csv"
step kernels_fp32 60 python3 -m bench.kernels --device cuda --dtype float32 --csv "$out/kernels.csv"
step attention_configs 70 python3 -m bench.attention_configs --dtype bfloat16 --csv "$out/attention_configs.csv"
step backends_bf16 90 python3 -m bench.backends --device cuda --dtype bfloat16 --compile --ms 16 128 1024
step backends_fp32 40 python3 -m bench.backends --device cuda --dtype float32 --models minilm --ms 16 128
python3 -m bench.gpu_report "$out" --results-md "$results_md" --seconds $(( $(date +%s) - began )) || status=1
cp "$results_md" "$out/RESULTS.md"
exit $status
