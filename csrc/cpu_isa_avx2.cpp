// The AVX2 path of the CPU kernels (docs/cpu_kernels.md): x86-64-v3 (AVX2, FMA), 8 floats per
// ymm register, 16 registers.
#include "cpu_kernels.h"

#if CABATTN_X86_ISA_PATHS
#define CABATTN_ISA_TARGET "arch=x86-64-v3"
#include "cpu_kernels_impl.h"

namespace cabattn {
namespace {

// 6 rows x 1 key panel: 12 ymm accumulators, 2 panel loads and 6 broadcasts per 12 FMAs, the
// classic AVX2 SGEMM shape; 5 x 1 measures the same, wider shapes spill (bench/bench_tiles.py,
// docs/cpu_kernels.md, Tile shapes).
struct Avx2 {
  static constexpr int kVectorBytes = 32;
  static constexpr vector_kernels::TileShape kQkTile{6, 1}, kPvTile{6, 1};
};

}  // namespace

constinit const CpuKernels kAvx2Kernels = vector_kernels::kernels_for<Avx2>();

}  // namespace cabattn
#endif
