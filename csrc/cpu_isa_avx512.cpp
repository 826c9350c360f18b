// The AVX-512 path of the CPU kernels (docs/cpu_kernels.md): x86-64-v4 (AVX512F/BW/CD/DQ/VL),
// 16 floats per zmm register, 32 registers.
#include "cpu_kernels.h"

#if CABATTN_X86_ISA_PATHS
#define CABATTN_ISA_TARGET "arch=x86-64-v4"
#include "cpu_kernels_impl.h"

namespace cabattn {
namespace {

// Tile shapes measured with bench/bench_tiles.py (docs/cpu_kernels.md, Tile shapes).
struct Avx512 {
  static constexpr int kVectorBytes = 64;
  static constexpr vector_kernels::TileShape kQkTile{14, 2}, kPvTile{6, 4};
};

}  // namespace

constinit const CpuKernels kAvx512Kernels = vector_kernels::kernels_for<Avx512>();

}  // namespace cabattn
#endif
