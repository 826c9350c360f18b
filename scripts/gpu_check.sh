#!/usr/bin/env bash
# The one prepared GPU check (docs/operators.md, On a GPU), for a machine with an NVIDIA GPU,
# torch, nvcc, ninja and compute-sanitizer, and no network; it finishes in under 8 minutes.
#
#   scripts/gpu_check.sh [OUTPUT_DIR]          (default: gpu_check_out)
#
# Steps, each with its own time limit and log, all within one overall budget
# (GPU_CHECK_SECONDS, default 460: a step never runs past it, one that cannot start is marked
# skipped): build cabattn._C in place for the card (TORCH_CUDA_ARCH_LIST=9.0 unless set; the
# build log's tail goes into the summary and the log itself is removed when it passes, to keep
# within the 8 files); `paths`: the self-check (python -m cabattn.selfcheck --force, every
# operator against the reference on this card) and then both kernel paths on a random Llama of
# realistic shape (scripts/compare_paths.py: 8 layers, 32/8 heads of 128, bf16, L 4096, every
# method under both protocols, per-cell loss agreement), one log; run the operator tests
# (tests/kernels/test_ops_*.py and test_cuda_graph.py, CUDA included; then the CUDA cases of
# test_model_features.py: soft-cap, sliding window, head dim 256; one log); run
# scripts/cuda_smoke.py (its three cases: block 128, L 200, head dim 128, fp16; block 16,
# L 200, head dim 64, bf16; block 64, L 200, head dim 256, bf16, soft-cap and window) under
# compute-sanitizer memcheck, racecheck, synccheck and initcheck, the four at once; run the
# kernel benchmark (bench/bench_kernels.py --device cuda) on two lengths and two sparsities, so
# that FlexAttention compiles for four layouts only. OUTPUT_DIR gets summary.md (the table
# printed last) and one log per step: 8 files, the most the device tool brings back.
# Exit code: the number of failed or timed-out steps.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT_DIR=${1:-gpu_check_out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
MAX_JOBS=${MAX_JOBS:-$(nproc)}
export MAX_JOBS
export PYTHONUNBUFFERED=1
SUMMARY="$OUT_DIR/summary.md"
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-460} ))

{
  echo "# cabattn GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
  echo "- torch: $($PY -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>&1)"
  echo "- nvcc: $(nvcc --version 2>&1 | tail -1)"
  echo "- compute-sanitizer: $(compute-sanitizer --version 2>&1 | tail -1)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
  echo "- TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
  echo
  echo "| step | status | seconds | log |"
  echo "| --- | --- | --- | --- |"
} > "$SUMMARY"

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND for at most LIMIT_SECONDS (less when the
# overall budget ends sooner), logs to NAME.log, adds a row to the table (one short append, so
# steps run at once do not interleave) and returns COMMAND's exit status.
step() {
  local name=$1 limit=$2
  shift 2
  local log="$OUT_DIR/$name.log" start status verdict seconds left
  start=$(date +%s)
  left=$(( DEADLINE - start ))
  if [ "$left" -lt 15 ]; then
    echo "| $name | SKIPPED (out of time) | 0 | |" >> "$SUMMARY"
    return 125
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit}s): $*" > "$log"
  timeout --kill-after=5 "$limit" "$@" >> "$log" 2>&1
  status=$?
  seconds=$(( $(date +%s) - start ))
  verdict=ok
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then verdict="TIMEOUT (${limit}s)"
  elif [ "$status" -ne 0 ]; then verdict="FAIL (exit $status)"; fi
  echo "| $name | $verdict | $seconds | $name.log |" >> "$SUMMARY"
  echo "== $name: $verdict in ${seconds}s"
  tail -n 5 "$log"
  return "$status"
}

if ! step build 240 "$PY" setup.py build_ext --inplace; then
  echo "build failed: skipping the other steps" | tee -a "$SUMMARY"
  cat "$SUMMARY"
  exit 1
fi
BUILD_TAIL=$(tail -n 8 "$OUT_DIR/build.log")
rm -f "$OUT_DIR/build.log"

# Nothing is measured with kernels that have not passed on this card: the self-check first
# (forced: this is the check itself, not a cached verdict), then the model-level comparison.
step paths 120 bash -c "$PY -m cabattn.selfcheck --device cuda --force \
  --cache-dir '$OUT_DIR/cache' && $PY scripts/compare_paths.py --device cuda"
rm -rf "$OUT_DIR/cache"

step tests 150 bash -c "$PY -m pytest -q -ra tests/kernels/test_ops_selection.py \
  tests/kernels/test_ops_attention.py tests/kernels/test_ops_cuda.py \
  tests/kernels/test_cuda_build.py tests/kernels/test_cuda_graph.py; first=\$?; \
  $PY -m pytest -q -ra tests/kernels/test_model_features.py -k cuda; exit \$((first | \$?))"

# The four sanitizer tools at once: each is bound by its own instrumentation on the CPU cores,
# and one small smoke run per tool covers the three cases.
SANITIZE=(compute-sanitizer --error-exitcode 3 --print-limit 20)
step memcheck 120 "${SANITIZE[@]}" --tool memcheck "$PY" scripts/cuda_smoke.py &
step racecheck 150 "${SANITIZE[@]}" --tool racecheck --racecheck-report hazard \
  "$PY" scripts/cuda_smoke.py &
step synccheck 120 "${SANITIZE[@]}" --tool synccheck "$PY" scripts/cuda_smoke.py &
step initcheck 120 "${SANITIZE[@]}" --tool initcheck "$PY" scripts/cuda_smoke.py &
wait

# The tensor-core kernels (bf16) against SDPA's flash backend and FlexAttention, and
# block_scores against one dense forward, at the issue-12 shapes (L=32K, 32/8 heads, d=128).
step bench 150 "$PY" bench/bench_kernels.py --device cuda --lengths 4096 32768 \
  --sparsities 0 0.9

{
  echo
  echo "build (tail):"
  printf '%s\n' "$BUILD_TAIL" | sed 's/^/    /'
  echo
  echo "self-check and both paths:"
  grep -E '^cabattn self-check|^  |^(mask|kv) |cells? (FAILED|within)' "$OUT_DIR/paths.log" \
    2>/dev/null | sed 's/^/    /'
  echo
  grep -E '(passed|failed|error).* in [0-9.]+s' "$OUT_DIR/tests.log" 2>/dev/null | tail -2 \
    | sed 's/^/tests: /'
  echo
  echo "smoke (under memcheck):"
  grep -E '^case | (ok|FAIL)$' "$OUT_DIR/memcheck.log" 2>/dev/null | sed 's/^/    /'
  for tool in memcheck racecheck synccheck initcheck; do
    grep -hE 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT_DIR/$tool.log" 2>/dev/null \
      | sed "s/^/    $tool: /"
  done
} >> "$SUMMARY"
echo
cat "$SUMMARY"
# Failed steps: the table rows whose status is not ok.
exit "$(grep -cE '^\| [a-z]+ \| (FAIL|TIMEOUT|SKIPPED)' "$SUMMARY")"
