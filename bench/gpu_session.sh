#!/usr/bin/env bash
# The checks only a GPU can run, one step per call, each writing its results and log to OUT_DIR:
#
#   bash bench/gpu_session.sh OUT_DIR STEP...
#
#   kernels     CUDA varlen kernels' bottom-right alignment; FlexAttention compiled, forward and backward,
#               across batch shapes (tests/test_varlen.py, tests/test_flex.py; about a minute)
#   matrix      the compatibility matrix on CUDA: bfloat16 cells, FlexAttention gradients, the CUDA varlen
#               kernels (full and LoRA; QLoRA needs bitsandbytes, absent from the lent machines' image)
#   bench-1b    prefixshare bench, a Llama-3.2-1B-shaped model, full fine-tuning, bfloat16
#   bench-8b    prefixshare bench, a Llama-3-8B-shaped model, LoRA, bfloat16
#               (both with gradient checkpointing, so that the paired baselines of the long profiles fit)
#
# Runs from the repository root with the machine's own torch and transformers (nothing is installed:
# the package is put on PYTHONPATH). Each step is bounded by STEP_TIMEOUT seconds (default 540).
# BENCH_ARGS is added to the bench steps, e.g. BENCH_ARGS="--profiles tldr,hh-rlhf --name bench-cuda-8b-a"
# to split a benchmark that would outlast one call (six profiles x three backends x five formats).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_session.sh OUT_DIR kernels|matrix|bench-1b|bench-8b ...}
shift
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
limit=${STEP_TIMEOUT:-540}
# the benches start no cell after this many seconds, so that they end with their tables before the step's timeout
# (every finished cell is also in OUT_DIR/NAME.jsonl the moment it ends)
budget=${BENCH_BUDGET:-$(( limit - 90 ))}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    python3 -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null || echo "flash_attn: not installed"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

status=0
for step in "$@"; do
    case $step in
        kernels) command=(python3 -m pytest -q -p no:cacheprovider -rs tests/test_varlen.py tests/test_varlen_kernels.py tests/test_flex.py) ;;
        matrix) command=(python3 compat/run_matrix.py --adapter full,lora --out "$out/MATRIX.md" --json "$out/matrix.json") ;;
        bench-1b) command=(python3 -m prefixshare bench --shape 1b --gradient-checkpointing --time-budget "$budget" --out-dir "$out" ${BENCH_ARGS:-}) ;;
        bench-8b) command=(python3 -m prefixshare bench --shape 8b --lora --gradient-checkpointing --time-budget "$budget" --out-dir "$out" ${BENCH_ARGS:-}) ;;
        *) echo "unknown step $step (kernels, matrix, bench-1b, bench-8b)" >&2; exit 2 ;;
    esac
    echo "== $step: ${command[*]}"
    start=$(date +%s)
    timeout "$limit" "${command[@]}" 2>&1 | tee "$out/$step.log"
    code=${PIPESTATUS[0]}
    echo "== $step: exit $code after $(( $(date +%s) - start )) s"
    (( code == 0 )) || status=1
done
exit $status
