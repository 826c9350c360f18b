#!/usr/bin/env bash
# Nsight Compute on one cabattn::block_sparse_attention launch (tools/ncu_driver, built with
# CMake and CUDA), with the card's own clocks (--clock-control none). Prints the kernel time,
# achieved DRAM bandwidth, the tensor-core (HMMA) rate and pipe utilisation (the driver runs
# bf16, so the tensor-core kernel of flash_tc.cuh), and the FP32 FMA rate (softmax work).
#
#   bench/profile_ncu.sh [length] [head_dim] [kept_blocks]     (driver defaults: 16384 128 L/1280)
#
# BUILD_DIR (default build-cmake) and TORCH_CUDA_ARCH_LIST (default 9.0) pick the build;
# the ncu report is left in $BUILD_DIR/block_sparse_attention.ncu-rep for the GUI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=${BUILD_DIR:-build-cmake}
if [ ! -x "$BUILD/ncu_driver" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DCABATTN_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
    -DTORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    -DCMAKE_PREFIX_PATH="$($PY -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
  cmake --build "$BUILD" --parallel "$(nproc)" --target ncu_driver
fi

REPORT="$BUILD/block_sparse_attention"
METRICS=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum
METRICS+=,smsp__sass_thread_inst_executed_op_ffma_pred_on.sum
METRICS+=,smsp__inst_executed_pipe_tensor_op_hmma.sum
METRICS+=,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed
METRICS+=,dram__throughput.avg.pct_of_peak_sustained_elapsed
METRICS+=,sm__throughput.avg.pct_of_peak_sustained_elapsed
ncu --clock-control none --kernel-name regex:block_sparse_attention --launch-count 1 \
  --metrics "$METRICS" --section SpeedOfLight --force-overwrite --export "$REPORT" \
  "$BUILD/ncu_driver" cuda "$@"
ncu --import "$REPORT.ncu-rep" --csv --page raw --metrics "$METRICS" > "$REPORT.csv"

"$PY" - "$REPORT.csv" <<'PYEOF'
import csv
import sys

rows = list(csv.reader(open(sys.argv[1])))
header, units, values = rows[0], rows[1], rows[2]
get = lambda name: float(values[header.index(name)].replace(",", ""))
scale = {"ns": 1e-9, "us": 1e-6, "usecond": 1e-6, "ms": 1e-3, "msecond": 1e-3, "s": 1.0,
         "nsecond": 1e-9, "second": 1.0}
seconds = get("gpu__time_duration.sum") * scale[units[header.index("gpu__time_duration.sum")]]
byte_scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}
moved = sum(get(n) * byte_scale[units[header.index(n)]]
            for n in ("dram__bytes_read.sum", "dram__bytes_write.sum"))
flops = 2 * get("smsp__sass_thread_inst_executed_op_ffma_pred_on.sum")
# One warp-wide mma.m16n8k16 is 16 * 8 * 16 multiply-adds.
tensor_flops = 2 * 16 * 8 * 16 * get("smsp__inst_executed_pipe_tensor_op_hmma.sum")
print(f"kernel time        {seconds * 1e3:.3f} ms")
print(f"DRAM traffic       {moved / 1e6:.1f} MB -> {moved / seconds / 1e9:.1f} GB/s "
      f"({get('dram__throughput.avg.pct_of_peak_sustained_elapsed'):.1f}% of peak)")
print(f"tensor-core work   {tensor_flops / 1e9:.2f} GFLOP -> {tensor_flops / seconds / 1e12:.1f} TFLOP/s"
      f" (HMMA pipe {get('sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed'):.1f}% busy)")
print(f"FP32 FMA work      {flops / 1e9:.2f} GFLOP -> {flops / seconds / 1e12:.2f} TFLOP/s")
print(f"SM throughput      {get('sm__throughput.avg.pct_of_peak_sustained_elapsed'):.1f}% of peak")
PYEOF
