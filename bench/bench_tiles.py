"""Register tile shapes of the CPU micro-kernel, per ISA path: how the shapes in
csrc/cpu_isa_*.cpp were chosen (docs/cpu_kernels.md, Tile shapes).

Compiles bench/tile_shapes.cpp once per x86 ISA path this CPU supports (the kernel source
csrc/cpu_kernels_impl.h under that path's target), runs each candidate (rows x key panels) on
QK^T and PV at the sizes of one attention tile, single-threaded, and prints best and median
GFLOP/s over interleaved rounds; appends the tables to bench/RESULTS.md unless --no-record.

  .venv/bin/python bench/bench_tiles.py                    # 128 rows, d 64, 512 keys, 15 rounds
  .venv/bin/python bench/bench_tiles.py --rows 64 --keys 1024
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cabattn import ops  # noqa: E402
from bench_common import cpu_model, report  # noqa: E402

# The ISA paths' compile targets and vector widths (csrc/cpu_isa_avx512.cpp, cpu_isa_avx2.cpp).
TARGETS = {"avx512": ("arch=x86-64-v4", 64), "avx2": ("arch=x86-64-v3", 32)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128, help="query rows of the tile")
    parser.add_argument("--dim", type=int, default=64, help="head dim")
    parser.add_argument("--keys", type=int, default=512, help="keys (a multiple of 16)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    for name in ("rows", "dim", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.keys < 16 or args.keys % 16:
        parser.error(f"--keys must be a positive multiple of 16 (one key panel), got {args.keys}")
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        sys.exit(f"bench_tiles: no C++ compiler {compiler!r} (set CXX)")
    paths = [isa for isa in ops.supported_cpu_isas() if isa in TARGETS]
    if not paths:
        sys.exit(f"bench_tiles: this CPU supports none of {', '.join(TARGETS)}")
    header = (f"{cpu_model()}; {args.rows} rows, d {args.dim}, {args.keys} keys, float32, "
              f"1 thread, best and median of {args.rounds} interleaved rounds; load average "
              f"{os.getloadavg()[0]:.1f} at the start")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for isa in paths:
            target, vector_bytes = TARGETS[isa]
            binary = Path(tmp) / f"tile_shapes_{isa}"
            subprocess.run([compiler, "-O3", "-std=c++20", f"-I{ROOT / 'csrc'}",
                            f'-DCABATTN_ISA_TARGET="{target}"', f"-DVECTOR_BYTES={vector_bytes}",
                            str(ROOT / "bench" / "tile_shapes.cpp"), "-o", str(binary)],
                           check=True)
            done = subprocess.run([str(binary), str(args.rows), str(args.dim), str(args.keys),
                                   str(args.rounds)], check=True, capture_output=True, text=True)
            rows += ["", f"{isa} ({target}):", ""] + done.stdout.strip().splitlines()
    rows += ["", f"load average {os.getloadavg()[0]:.1f} at the end"]
    report("Micro-kernel tile shapes per ISA path (bench_tiles.py)", header, rows,
           record=not args.no_record)


if __name__ == "__main__":
    main()
