#!/usr/bin/env bash
# The whole GPU suite in one command: the arch it runs on, the GPU parity tests (pytest -m gpu),
# kernel and training-step benchmarks (pytest-benchmark), the memory model with a measured check,
# and the report (markdown + chart + roofline).
#
#   bash bench/run_gpu.sh [OUT_DIR] [extra pytest args]       # default OUT_DIR: bench_results
#   bash bench/run_gpu.sh --quick [gpu_check args]            # the budgeted <= 8-minute check: bench/gpu_check.py
#
# Environment knobs: FASTGPT_BENCH_MODEL (gpt2), FASTGPT_BENCH_BATCH (16), FASTGPT_BENCH_SEQ (1024),
# FASTGPT_BENCH_WIDTHS (768,1024,1280,1600), FASTGPT_BENCH_DTYPE (bf16; fp16, fp32), FASTGPT_BENCH_COMPILE (1; 0 skips torch.compile variants),
# FASTGPT_BENCH_STEPS (10 timed training steps), FASTGPT_PEAK_TFLOPS / FASTGPT_PEAK_TBPS (unknown GPUs).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--quick" ]; then
    shift
    exec python -m bench.gpu_check "$@"
fi
OUT=${1:-bench_results}
shift || true
mkdir -p "$OUT"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA GPU: run the CPU suite instead: pytest bench/ --benchmark-json out.json" >&2
    exit 1
fi
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# The arch and what fastgpt runs on it (config table, training dtype, attention route).
python -c "import torch, kernels; (ma, mi), p = torch.cuda.get_device_capability(), kernels.device_plan(); \
print(f'arch: sm_{ma}{mi} ({torch.cuda.get_device_name()}), table {p.table}, dtype {p.dtype}, attention {p.attention}'); \
print(f'plan: {p.reason}')" | tee -a "$OUT/gpu.txt"
python -m pytest tests -m gpu -p no:cacheprovider -q | tee "$OUT/gpu-tests.txt"
python -m pytest bench/ -p no:cacheprovider -q --benchmark-json "$OUT/results.json" "$@" | tee "$OUT/pytest.txt"
python -m bench.memory --model gpt2 --batch 16 --seq 1024 --measure --json "$OUT/memory-gpt2-b16.json" \
    | tee "$OUT/memory-gpt2-b16.md"
python -m bench.memory --model gpt2-xl --batch 4 --seq 1024 --measure --json "$OUT/memory-gpt2-xl-b4.json" \
    | tee "$OUT/memory-gpt2-xl-b4.md"
python -m bench.report "$OUT/results.json" --out "$OUT" --memory "$OUT"/memory-*.json > /dev/null
echo "report: $OUT/report.md, chart: $OUT/chart.png"
