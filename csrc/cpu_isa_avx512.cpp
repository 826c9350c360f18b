// The AVX-512 path of the CPU kernels (docs/cpu_kernels.md): x86-64-v4 (AVX512F/BW/CD/DQ/VL),
// 16 floats per zmm register, 32 registers.
#include "cpu_kernels.h"

#if CABATTN_X86_ISA_PATHS
#define CABATTN_ISA_TARGET "arch=x86-64-v4"
#include "cpu_kernels_impl.h"

namespace cabattn {
namespace {

// 6 rows x 4 key panels: 24 zmm accumulators, 4 panel loads and 6 broadcasts per 24 FMAs, the
// fewest loads per FMA of the shapes that fit 32 registers. On Zen 4 (512-bit FMAs as two
// halves) every shape from 6 x 1 to 12 x 2 runs within 3% (bench/bench_tiles.py, docs/
// cpu_kernels.md, Tile shapes); cores with two 512-bit FMA pipes need the low load ratio.
struct Avx512 {
  static constexpr int kVectorBytes = 64;
  static constexpr vector_kernels::TileShape kQkTile{6, 4}, kPvTile{6, 4};
};

}  // namespace

constinit const CpuKernels kAvx512Kernels = vector_kernels::kernels_for<Avx512>();

}  // namespace cabattn
#endif
