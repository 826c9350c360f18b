#!/usr/bin/env bash
# The one prepared GPU check (KERNELS.md "The GPU machine"), for a machine with an NVIDIA GPU,
# torch, nvcc, ninja and compute-sanitizer, and no network; it must finish in under 8 minutes.
#
#   scripts/gpu_check.sh [OUTPUT_DIR]          (default: gpu_check_out)
#
# Steps, each with its own time limit and log: build cabattn._C in place for the card
# (TORCH_CUDA_ARCH_LIST=9.0 unless set), run the operator tests (tests/test_ops_*.py, CUDA
# included), run scripts/cuda_smoke.py under compute-sanitizer memcheck and racecheck, run the
# kernel benchmark (bench/bench_kernels.py --device cuda, when present). OUTPUT_DIR gets
# summary.md (the table printed last) and one log per step: at most 8 files, the most the
# device tool brings back. Exit code: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu_check_out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
SUMMARY="$OUT_DIR/summary.md"
FAILED=0

{
  echo "# cabattn GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
  echo "- torch: $($PY -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>&1)"
  echo "- nvcc: $(nvcc --version 2>&1 | tail -1)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
  echo "- TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  echo
  echo "| step | status | seconds | log |"
  echo "| --- | --- | --- | --- |"
} > "$SUMMARY"

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND, logs to NAME.log, adds a row to the table.
step() {
  local name=$1 limit=$2
  shift 2
  local log="$OUT_DIR/$name.log" start status
  start=$(date +%s)
  echo "== $name: $*" | tee "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  status=$?
  local seconds=$(( $(date +%s) - start ))
  local verdict=ok
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then verdict="TIMEOUT (${limit}s)";
  elif [ "$status" -ne 0 ]; then verdict="FAIL (exit $status)"; fi
  [ "$verdict" = ok ] || FAILED=$((FAILED + 1))
  echo "| $name | $verdict | $seconds | $name.log |" >> "$SUMMARY"
  tail -n 5 "$log"
  return $status
}

if ! step build 240 "$PY" setup.py build_ext --inplace; then
  echo "build failed: skipping the other steps" | tee -a "$SUMMARY"
  cat "$SUMMARY"
  exit 1
fi
step tests 180 "$PY" -m pytest -q -ra tests/test_ops_*.py tests/test_cuda_build.py

SANITIZE=(compute-sanitizer --error-exitcode 3 --print-limit 20)
step memcheck 90 "${SANITIZE[@]}" --tool memcheck "$PY" scripts/cuda_smoke.py
step racecheck 120 "${SANITIZE[@]}" --tool racecheck "$PY" scripts/cuda_smoke.py

if [ -f bench/bench_kernels.py ]; then
  # The tensor-core kernels (bf16) against SDPA's flash backend and FlexAttention, and
  # block_scores against one dense forward, at the issue-12 shapes (L=32K, 32/8 heads, d=128).
  step bench 150 "$PY" bench/bench_kernels.py --device cuda --lengths 4096 32768 \
    --sparsities 0 0.9
else
  echo "| bench | skipped: bench/bench_kernels.py not present | 0 | |" >> "$SUMMARY"
fi

{
  echo
  grep -E '(passed|failed|error)' "$OUT_DIR/tests.log" | tail -1 | sed 's/^/tests: /'
  echo
  echo "smoke (under memcheck):"
  grep -E ' error .* (ok|FAIL)$' "$OUT_DIR/memcheck.log" | sed 's/^/    /'
  grep -E 'ERROR SUMMARY' "$OUT_DIR/memcheck.log" "$OUT_DIR/racecheck.log" | sed "s|$OUT_DIR/||; s/^/    /"
} >> "$SUMMARY"
echo
cat "$SUMMARY"
exit $FAILED
